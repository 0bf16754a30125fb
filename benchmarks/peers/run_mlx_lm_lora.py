"""mlx-lm-lora's own DPO training loop for bench_peers.py.

    .venv-peers/mlx-lm-lora/bin/python benchmarks/peers/run_mlx_lm_lora.py \
        --model DIR --data pairs.json

Runs the installed mlx-lm-lora unchanged: its ``from_pretrained`` (LoRA on
every linear layer of every block), its ``load_reference_model`` (a second,
frozen copy of the model) and its ``train_model`` -> ``train_dpo`` loop
(batch iterator, compiled step, one ``mx.eval`` per step), with a training
callback that reports every step and then waits for the driver. Two
things are set up first, as a Linux CPU user must:

* ``mx.device_info()`` gets the ``max_recommended_working_set_size`` key that
  its trainers read unguarded (the CPU backend reports only architecture and
  device name; without it every trainer stops with a ``KeyError``);
* OpenBLAS is loaded before MLX, as rsa_mlx does, so both use the same BLAS.

The data are token ids, given as mlx-lm-lora's tokenised DPO items
(``chosen``/``rejected`` = prompt + response ids, and the prompt lengths),
so its tokenisation is skipped and every system trains on the same ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol

if os.environ.get("BENCH_OPENBLAS", "1") != "0":
    protocol.preload_openblas()

# isort: split
import mlx.core as mx

_device_info = mx.device_info


def _device_info_with_limit(*args, **kwargs):
    info = dict(_device_info(*args, **kwargs))
    info.setdefault(
        "max_recommended_working_set_size",
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    )
    return info


mx.device_info = _device_info_with_limit

# isort: split
from mlx_lm.tuner.callbacks import TrainingCallback  # noqa: E402
from mlx_lm_lora import train as lora_train  # noqa: E402
from mlx_lm_lora.utils import from_pretrained  # noqa: E402


class Report(TrainingCallback):
    def __init__(self, session):
        self.session = session

    def on_train_loss_report(self, info):
        # The loop's own timing: from after the previous report to after this
        # step's mx.eval (batch building included).
        self.session.record(
            1.0 / info["iterations_per_second"], info["train_loss"], info["peak_memory"]
        )

    def on_val_loss_report(self, info):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    cli = parser.parse_args()

    args = vars(lora_train.build_parser().parse_args([]))
    for key, value in lora_train.CONFIG_DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    adapter_path = tempfile.mkdtemp(prefix="bench-mlx-lm-lora-")
    args.update(
        model=cli.model,
        train=True,
        train_mode="dpo",
        train_type="lora",
        batch_size=cli.batch_size,
        iters=10**9,
        learning_rate=1e-5,
        steps_per_report=1,
        steps_per_eval=10**9,
        save_every=10**9,
        num_layers=-1,
        lora_parameters={"rank": 8, "dropout": 0.0, "scale": 10.0},
        max_seq_length=2048,
        adapter_path=adapter_path,
        fuse=False,
        wandb=None,
        seed=0,
    )
    args = argparse.Namespace(**args)

    model, tokenizer, adapter_file = from_pretrained(
        model=args.model,
        new_adapter_path=args.adapter_path,
        lora_config=lora_train.build_lora_config(args),
        quantized_load=None,
    )
    reference = lora_train.load_reference_model(args)
    train_set = [
        {
            "chosen": p["prompt"] + p["chosen"],
            "rejected": p["prompt"] + p["rejected"],
            "chosen_prompt_length": len(p["prompt"]),
            "rejected_prompt_length": len(p["prompt"]),
        }
        for p in protocol.load_pairs(cli.data)
    ]
    session = protocol.Session()
    session.ready(system="mlx-lm-lora dpo", mlx=mx.__version__)
    lora_train.train_model(
        args=args,
        model=model,
        tokenizer=tokenizer,
        adapter_file=adapter_file,
        reference_model=reference,
        train_set=train_set,
        valid_set=[],
        training_callback=Report(session),
    )


if __name__ == "__main__":
    main()
