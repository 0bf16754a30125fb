"""MLX -> Hugging Face: a fused model folder, or a PEFT adapter.

``export_model`` loads the base model with the run's adapters (and merge
ratio q), fuses every LoRA layer into its base weight
(``W + s_1 B_1^T A_1^T + q s_2 B_2^T A_2^T``), de-quantises, casts to the
config's dtype and writes safetensors with ``{"format": "pt"}`` metadata,
the config without quantisation keys, the tokenizer and a model card.

``export_peft`` writes the adapters alone in PEFT's layout: both stages
folded into one LoRA of rank ``r1 + r2`` (:func:`rsa_mlx.tuner.adapters.combined_adapter`),
``lora_A = a^T``, ``lora_B = b^T`` and ``lora_alpha = r`` (PEFT scales by
``lora_alpha / r``; the scales are already inside ``b``).

Both are refused for architectures whose MLX weights are not the HF ones
(:data:`rsa_mlx.io.hf.EXPORTABLE`). Output is built in a temporary folder and
renamed into place when complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import yaml
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import dequantize_model, make_shards

import rsa_mlx
from rsa_mlx.io import hf
from rsa_mlx.ops.risk import MEASURES, resolve_mu
from rsa_mlx.tuner import adapters
from rsa_mlx.tuner.model import load
from rsa_mlx.tuner.runs import RUN_FILE, default_merge, read_run, resolve_adapter
from rsa_mlx.util.atomic import save_json
from rsa_mlx.util.errors import InputError

_QUANT_KEYS = ("quantization", "quantization_config")


def sources(model, adapter_path, merge) -> tuple[Path, dict, dict]:
    """The local base folder, its config, and what is known of the run.

    The run info gets ``merge``: the ratio :func:`rsa_mlx.tuner.model.load` applies.
    """
    run, info = None, {"merge": 1.0 if merge is None else merge}
    if adapter_path is not None:
        folder, run = resolve_adapter(adapter_path)
        if merge is None:
            info["merge"] = default_merge(run)
        run_dir = Path(adapter_path) if run else folder.parent
        if run is None and (run_dir / RUN_FILE).exists():  # a stage folder
            run = read_run(run_dir)
            names = [s["name"] for s in run.get("stages", [])]
            if folder.name in names:
                run["stages"] = run["stages"][: names.index(folder.name) + 1]
        if (run_dir / "config.yaml").exists():
            info["config"] = yaml.safe_load((run_dir / "config.yaml").read_text())
    if model is None:
        if run is None:
            raise InputError("give the base model (--model), or a run folder")
        model = run["model"]
    base = hf.snapshot(model, allow_patterns=hf.MODEL_PATTERNS)
    config = hf.check_model_folder(base)
    hf.check_exportable(base, config)
    return base, config, {**(run or {}), **info, "model": str(model)}


def fuse(model: nn.Module) -> nn.Module:
    """Fold every (stacked) LoRA layer into its base layer, de-quantised."""
    while True:
        ready = [
            (name, m.fuse(dequantize=True))
            for name, m in model.named_modules()
            if isinstance(m, adapters.LORA_TYPES)
            and not isinstance(_inner(m), adapters.LORA_TYPES)
        ]
        if not ready:
            return model
        model.update_modules(tree_unflatten(ready))


def _inner(m: nn.Module) -> nn.Module:
    return m.embedding if isinstance(m, adapters.LoRAEmbedding) else m.linear


def _dtype(config: dict):
    name = config.get("torch_dtype") or config.get("dtype")
    if name is None and isinstance(config.get("text_config"), dict):
        name = config["text_config"].get("dtype")
    return getattr(mx, name) if name in ("float16", "bfloat16", "float32") else None


def hf_weights(model: nn.Module, config: dict) -> dict[str, mx.array]:
    """The model's parameters as an HF state dict (fused, de-quantised, cast)."""

    dequantize_model(fuse(model))
    dtype = _dtype(config)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    return weights


def _save_weights(folder: Path, weights: dict[str, mx.array]) -> None:

    shards = make_shards(weights)
    name = "model-{:05d}-of-{:05d}.safetensors"
    index = {}
    for i, shard in enumerate(shards):
        file = (
            "model.safetensors" if len(shards) == 1 else name.format(i + 1, len(shards))
        )
        mx.save_safetensors(str(folder / file), shard, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        total = sum(v.nbytes for v in weights.values())
        save_json(
            folder / "model.safetensors.index.json",
            {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(index.items())),
            },
        )


def _risk_text(cfg: dict) -> str:

    risk = cfg.get("risk", "?")
    if cfg.get("loss") == "dpo" or risk not in MEASURES:
        return "none (plain DPO)" if cfg.get("loss") == "dpo" else str(risk)
    mu = resolve_mu(risk, cfg.get("mu"))
    return risk if mu is None else f"{risk} (mu = {mu})"


def model_card(run: dict, kind: str) -> str:
    """A README.md stating the base model, method, risk measure and settings."""
    cfg = run.get("config") or {}
    stages = [s["name"] for s in run.get("stages", [])]
    method = "none (the base model as it is)"
    if stages:
        method = (
            f"{cfg.get('loss', '?')} loss, stages {' -> '.join(stages)} "
            "(Risk-aware Stepwise Alignment, arXiv 2512.24263)"
        )
    rows = {
        "base model": run["model"],
        "method": method,
        "risk measure": _risk_text(cfg) if stages else "-",
        "merge ratio q": run.get("merge", 1.0),
        "export": kind,
        "rsa_mlx": rsa_mlx.__version__,
    }
    keys = (
        "beta", "lam", "safety_beta", "alpha", "learning_rate", "iters", "epochs",
        "batch_size", "max_seq_length", "num_layers", "lora_parameters", "seed",
    )  # fmt: skip
    settings = {k: cfg[k] for k in keys if k in cfg}
    lines = [
        "---",
        f"base_model: {run['model']}",
        "library_name: " + ("peft" if kind == "peft" else "transformers"),
        "tags: [rsa-mlx, mlx, safety, dpo, lora]",
        "---",
        "",
        "# Aligned with rsa_mlx",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows.items()),
        "",
    ]
    if settings:
        lines += [
            "Hyperparameters:",
            "",
            "```json",
            json.dumps(settings, indent=2),
            "```",
            "",
        ]
    return "\n".join(lines)


def export_model(
    save_path: str | Path,
    model: str | None = None,
    adapter_path: str | Path | None = None,
    merge: float | None = None,
) -> Path:
    """Write base model + adapters (+ merge q) as a Hugging Face folder."""
    with hf.staged_folder(save_path, "--save-path") as out:
        base, config, run = sources(model, adapter_path, merge)
        net, tokenizer = load(str(base), adapter_path, merge)
        out.mkdir()
        _save_weights(out, hf_weights(net, config))
        config = {k: v for k, v in config.items() if k not in _QUANT_KEYS}
        save_json(out / "config.json", config)
        tokenizer._tokenizer.save_pretrained(str(out))
        for name in ("generation_config.json", "tokenizer.model"):
            if (base / name).exists() and not (out / name).exists():
                shutil.copy2(base / name, out / name)
        (out / "README.md").write_text(model_card(run, "merged"))
    return Path(save_path)


def peft_tensors(net: nn.Module) -> tuple[dict[str, mx.array], int, list[str]]:
    """PEFT state dict, rank and module names for the adapters on ``net``."""
    if any(
        isinstance(m, (adapters.LoRAEmbedding, adapters.LoRASwitchLinear))
        for _, m in net.named_modules()
    ):
        raise InputError(
            "PEFT export supports LoRA on linear layers only (this adapter "
            "adapts embeddings or MoE experts); export the merged model instead"
        )
    weights, rank = adapters.combined_adapter(net)
    tensors, modules = {}, set()
    for key, value in weights.items():
        module, part = key.rsplit(".", 1)
        name = "lora_A" if part == "lora_a" else "lora_B"
        tensors[f"base_model.model.{module}.{name}.weight"] = value.T.astype(mx.float32)
        modules.add(module)
    return tensors, rank, sorted(modules)


def export_peft(
    save_path: str | Path,
    model: str | None = None,
    adapter_path: str | Path | None = None,
    merge: float | None = None,
) -> Path:
    """Write the adapters (both stages folded, merge q applied) for PEFT."""
    if adapter_path is None:
        raise InputError("--peft exports adapters: give --adapter-path")
    with hf.staged_folder(save_path, "--save-path") as out:
        base, _, run = sources(model, adapter_path, merge)
        net, _ = load(str(base), adapter_path, merge)
        tensors, rank, modules = peft_tensors(net)
        peft_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": run["model"],
            "r": rank,
            "lora_alpha": rank,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            # exact module names, as PEFT's full-match pattern
            "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$",
        }
        out.mkdir()
        mx.save_safetensors(
            str(out / "adapter_model.safetensors"), tensors, metadata={"format": "pt"}
        )
        save_json(out / "adapter_config.json", peft_config)
        (out / "README.md").write_text(model_card(run, "peft"))
    return Path(save_path)
