"""TRL's DPOTrainer with a PEFT LoRA adapter, on torch (CPU), for bench_peers.py.

    .venv-peers/trl/bin/python benchmarks/peers/run_trl.py --model DIR --data pairs.json

Runs the installed TRL unchanged: ``DPOTrainer`` with ``peft_config`` (LoRA
rank 8 on every linear layer of every block, ``lora_alpha = 80`` i.e. the
scale 10 the MLX runs use), whose reference is the same network with the
adapter disabled, float32, its own data collator and sampler. The model
folder's word-level tokenizer maps ``w<id>`` to ``<id>``, so TRL's own
tokenisation gives the same token ids as the other systems (responses end
with the EOS token, so TRL adds none). A callback reports each step (the
time between two consecutive logging calls: batch, forward, backward,
optimizer and the per-step log) and then waits for the driver.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainerCallback,
)
from trl import DPOConfig, DPOTrainer

NAMES = {0: "<pad>", 1: "<unk>", 2: "</s>"}  # as bench_peers.write_tokenizer


def words(ids) -> str:
    return " ".join(NAMES.get(i, f"w{i}") for i in ids)


class Report(TrainerCallback):
    def __init__(self, session):
        self.session = session
        self.last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        seconds = time.perf_counter() - self.last
        self.session.record(seconds, float(logs["loss"]), None)
        self.last = time.perf_counter()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--no-gradient-checkpointing",
        action="store_true",
        help="turn off TRL's default gradient checkpointing",
    )
    cli = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    model = AutoModelForCausalLM.from_pretrained(cli.model, dtype=torch.float32)
    pairs = protocol.load_pairs(cli.data)
    dataset = Dataset.from_list(
        [
            {
                "prompt": words(p["prompt"]),
                "chosen": " " + words(p["chosen"]),
                "rejected": " " + words(p["rejected"]),
            }
            for p in pairs
        ]
    )
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=cli.batch_size,
        max_steps=10**6,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        max_length=2048,
        beta=0.1,
        loss_type=["sigmoid"],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if cli.no_gradient_checkpointing:
        config.gradient_checkpointing = False
    peft_config = LoraConfig(
        r=8,
        lora_alpha=80,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    session = protocol.Session()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Report(session)],
    )
    first = trainer.train_dataset[0]
    expect = pairs[0]
    assert first["prompt_ids"] == expect["prompt"], "tokenisation differs"
    assert first["chosen_ids"] == expect["chosen"], "tokenisation differs"
    session.ready(
        system="trl dpo + peft",
        gradient_checkpointing=bool(config.gradient_checkpointing),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    trainer.train()


if __name__ == "__main__":
    main()
