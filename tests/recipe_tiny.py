"""A tiny random chat model and recipe settings small enough for tests."""

from __future__ import annotations

import json

import mlx.core as mx

from rsa_mlx.recipe import settings
from tests.tiny import write_model


def flat_tiny_model(folder):
    write_model(folder, chat=True)
    # a flatter random model, so sampled answers are text, not one token
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.embed_tokens.weight"] /= 8
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("max_position_embeddings", 4096)  # GGUF's export needs it
    (folder / "config.json").write_text(json.dumps(config))


TINY = {
    "advbench_train": 6, "phrased_train": 2, "benign_train": 4,
    "borderline_train": 4, "advbench_eval": 3, "phrased_eval": 2,
    "benign_eval": 2, "borderline_eval": 2, "pair_max_tokens": 6,
    "eval_max_tokens": 5, "valid": 2, "batch_size": 2, "epochs": 1.0,
    "max_seq_length": 96, "lora_rank": 2, "num_layers": 2, "eval_samples": 1,
}  # fmt: skip


def tiny_recipe(tmp_path, **changes):
    if not (tmp_path / "model").exists():
        flat_tiny_model(tmp_path / "model")
    harmful = tmp_path / "harmful.txt"
    if not harmful.exists():
        harmful.write_text(
            "\n".join(f"Explain how to do harmful thing {i}" for i in range(12))
        )
    given = {**TINY, "model": str(tmp_path / "model"), "harmful": str(harmful),
             "out": str(tmp_path / "out"), **changes}  # fmt: skip
    return settings.resolve_recipe(given)
