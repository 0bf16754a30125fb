"""LoRA adapters for the two stages, the in-network reference, and their files.

Both stages train mlx-lm LoRA layers. Stage 1 wraps the base layers; stage 2
wraps the (frozen) stage-1 LoRA layers, so the network computes
``base(x) + s1 * x A1 B1 + s2 * x A2 B2``. A stage's reference policy is the
same network with that stage's adapters switched off (``scale = 0``), which
leaves every other output bit-for-bit as it was: the stage-1 reference is the
base model and the stage-2 reference is the stage-1 policy, with no second
copy of the weights.

Files are mlx-lm's (``adapters.safetensors`` + ``adapter_config.json``):

* ``<run>/reward/`` (stage 1) loads in ``mlx_lm.load(base, adapter_path=...)``;
* ``<run>/safety/`` holds the stage-2 tensors, relative to the stage-1 model,
  under the same names; its ``adapter_config.json`` names the adapter it
  stacks on (``rsa_mlx.base_adapter``), and :func:`load` applies both;
* ``<run>/final/`` is both stages folded into one mlx-lm adapter of rank
  ``r1 + r2`` (the stage-2 part scaled by the merge ratio q), for
  ``mlx_lm.load``/``mlx_lm.generate --adapter-path`` directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from rsa_mlx.io.hf import check_safetensors
from rsa_mlx.tuner.config import LoRAConfig
from rsa_mlx.tuner.fold import LORA_TYPES, combined_adapter, relative_key
from rsa_mlx.util.atomic import save_json, save_safetensors
from rsa_mlx.util.errors import ConfigError, InputError, quote

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_BASE_TYPES = (
    nn.Linear,
    nn.QuantizedLinear,
    SwitchLinear,
    QuantizedSwitchLinear,
    nn.Embedding,
    nn.QuantizedEmbedding,
)


def _blocks(model: nn.Module, num_layers: int):
    layers = model.layers
    return (
        layers
        if num_layers < 0
        else layers[len(layers) - min(num_layers, len(layers)) :]
    )


def _wrap(module: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """A new LoRA layer on top of ``module`` (a base layer or a frozen LoRA)."""
    r, scale, dropout = cfg.rank, cfg.scale, cfg.dropout
    if isinstance(module, LoRALinear):
        (in_dims, _), (_, out_dims) = module.lora_a.shape, module.lora_b.shape
        new = LoRALinear(in_dims, out_dims, r=r, dropout=dropout, scale=scale)
        new.linear = module
    elif isinstance(module, LoRASwitchLinear):
        experts, _, in_dims = module.lora_a.shape
        out_dims = module.lora_b.shape[1]
        new = LoRASwitchLinear(
            in_dims, out_dims, experts, r=r, dropout=dropout, scale=scale
        )
        new.linear = module
    elif isinstance(module, LoRAEmbedding):
        (num, _), (_, dims) = module.lora_a.shape, module.lora_b.shape
        new = LoRAEmbedding(num, dims, r=r, dropout=dropout, scale=scale)
        new.embedding = module
    elif isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        new = LoRALinear.from_base(module, r=r, dropout=dropout, scale=scale)
    elif isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        new = LoRASwitchLinear.from_base(module, r=r, dropout=dropout, scale=scale)
    elif isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
        new = LoRAEmbedding.from_base(module, r=r, dropout=dropout, scale=scale)
    else:
        raise InputError(f"cannot put a LoRA layer on {type(module).__name__}")
    return new


def _targets(block: nn.Module, keys: list[str] | None) -> list[str]:
    """Paths in a block to adapt: outermost LoRA layers and bare base layers."""
    found = []
    for path, module in block.named_modules():
        if any(path.startswith(p + ".") for p in found):
            continue  # inside a LoRA layer already chosen
        if isinstance(module, LORA_TYPES) or (
            isinstance(module, _BASE_TYPES) and not _inside_lora(block, path)
        ):
            found.append(path)
    return found if keys is None else [p for p in found if p in set(keys)]


def _inside_lora(block: nn.Module, path: str) -> bool:
    parts = path.split(".")
    for i in range(1, len(parts)):
        parent = block
        for name in parts[:i]:
            parent = (
                parent[int(name)] if isinstance(parent, list) else getattr(parent, name)
            )
        if isinstance(parent, LORA_TYPES):
            return True
    return False


def add_adapter(model: nn.Module, cfg: LoRAConfig) -> list[nn.Module]:
    """Freeze ``model`` and add one trainable LoRA adapter; return its layers.

    On a model without LoRA this is mlx-lm's ``linear_to_lora_layers``; on a
    model that has one (an earlier stage), the new layers wrap the old ones.
    """
    model.freeze()
    before = {id(m) for _, m in model.named_modules() if isinstance(m, LORA_TYPES)}
    if not before:
        linear_to_lora_layers(model, cfg.num_layers, cfg.lora_parameters())
    else:
        for block in _blocks(model, cfg.num_layers):
            new = [(p, _wrap(_get(block, p), cfg)) for p in _targets(block, cfg.keys)]
            if new:
                block.update_modules(tree_unflatten(new))
    added = [
        m
        for _, m in model.named_modules()
        if isinstance(m, LORA_TYPES) and id(m) not in before
    ]
    if not added:
        raise InputError(
            f"no layers to adapt (num_layers={cfg.num_layers}, keys={cfg.keys})"
        )
    return added


def _get(block: nn.Module, path: str) -> nn.Module:
    module = block
    for name in path.split("."):
        module = (
            module[int(name)] if isinstance(module, list) else getattr(module, name)
        )
    return module


@contextmanager
def disabled(layers: list[nn.Module]) -> Iterator[None]:
    """Switch adapter ``layers`` off: ``y + 0 * update`` is ``y`` bit for bit.

    Used inside the compiled step, where the change is traced, to run the
    reference policy through the same weights.
    """
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable (current stage's) adapter tensors, by mlx-lm name."""
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(cfg: LoRAConfig, extra: dict | None = None) -> dict:
    """``adapter_config.json`` content that ``mlx_lm.load_adapters`` reads."""
    config = {
        "fine_tune_type": "lora",
        "num_layers": cfg.num_layers,
        "lora_parameters": cfg.lora_parameters(),
    }
    if extra:
        config["rsa_mlx"] = extra
    return config


def save_adapter(folder: Path, model: nn.Module, cfg: LoRAConfig, extra=None) -> None:
    """Write the current stage's adapter in mlx-lm's format (atomically)."""
    folder = Path(folder)
    save_safetensors(folder / ADAPTER_FILE, adapter_weights(model))
    save_json(folder / CONFIG_FILE, adapter_config(cfg, extra))


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no adapter config (not an adapter folder?)"
        ) from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON ({e.msg})") from None


def config_from_file(config: dict) -> LoRAConfig:
    """The :class:`LoRAConfig` of an ``adapter_config.json`` (mlx-lm's
    defaults for what it leaves out)."""
    params = config.get("lora_parameters") or {}
    known = {"rank", "scale", "dropout", "keys"}
    return LoRAConfig(
        **{k: v for k, v in params.items() if k in known},
        num_layers=config.get("num_layers", LoRAConfig.num_layers),
    )


def _check_config(config: object, folder: Path) -> None:
    """``adapter_config.json`` holds what loading needs, of the right types.

    A plain mlx-lm adapter needs ``num_layers`` and ``lora_parameters`` with
    ``rank``, ``scale`` and ``dropout``; an rsa_mlx stage-2 adapter (one with
    ``rsa_mlx.base_adapter``) may leave them to the defaults.
    """
    where = quote(Path(folder) / CONFIG_FILE)
    if not isinstance(config, dict):
        raise InputError(f"{where}: expected a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise InputError(
            f"{quote(folder)}: only LoRA adapters are supported, not {kind!r}"
        )
    extra = config.get("rsa_mlx") or {}
    base = extra.get("base_adapter") if isinstance(extra, dict) else 0
    if base is not None and not isinstance(base, str):
        raise InputError(f"{where}: 'rsa_mlx.base_adapter' must be a folder name")
    required = base is None
    params = config.get("lora_parameters", None if required else {})
    if not isinstance(params, dict):
        raise InputError(f"{where}: 'lora_parameters' must be an object")
    checks = [
        ("num_layers", config, int, "an integer"),
        ("rank", params, int, "a positive integer"),
        ("scale", params, (int, float), "a number"),
        ("dropout", params, (int, float), "a number"),
    ]
    for key, holder, kinds, what in checks:
        name = key if holder is config else f"lora_parameters.{key}"
        if key not in holder and not required:
            continue
        value = holder.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or (key == "rank" and value < 1)
        ):
            raise InputError(f"{where}: {name!r} must be {what}, got {value!r}")
    keys = params.get("keys")
    if keys is not None and not (
        isinstance(keys, list) and all(isinstance(k, str) for k in keys)
    ):
        raise InputError(f"{where}: 'lora_parameters.keys' must be a list of names")


def _layer_span(names) -> str:
    found = sorted({int(m.group(1)) for n in names if (m := _LAYER.search(n))})
    if not found:
        return "none"
    if found == list(range(found[0], found[-1] + 1)):
        return f"{found[0]}-{found[-1]}" if len(found) > 1 else str(found[0])
    return ",".join(map(str, found))


def _check_match(folder: Path, weights: dict, expected: dict, num_layers) -> None:
    """Refuse an adapter whose tensors are not exactly the model's LoRA ones.

    mlx-lm puts an adapter on the *last* ``num_layers`` blocks and loads
    leniently, so an adapter trained on a model with fewer blocks can find
    names to fill and leave other LoRA layers at zero: every expected tensor
    must be there, with its shape, and nothing else.
    """
    problems = [
        f"{k}: {'unexpected' if k not in expected else 'shape ' + str(v.shape)}"
        for k, v in weights.items()
        if k not in expected or expected[k].shape != v.shape
    ]
    missing = sorted(set(expected) - set(weights))
    if not (problems or missing):
        return
    have, want = _layer_span(weights), _layer_span(expected)
    if have != want:
        detail = (
            f"it adapts layers {have}, but with num_layers={num_layers} this "
            f"model's adapter would be on layers {want}"
        )
    else:
        detail = (problems + [f"{k}: missing" for k in missing])[0]
    raise InputError(
        f"{quote(folder)}: adapter does not match the model: it was trained for a "
        f"different model ({detail})"
    )


def _lora_tensors(model: nn.Module) -> dict[str, mx.array]:
    return {
        k: v
        for k, v in tree_flatten(model.parameters())
        if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }


def apply_adapter(
    model: nn.Module, folder: Path, merge: float = 1.0, with_base: bool = True
) -> list[nn.Module]:
    """Add the adapter saved in ``folder`` (and, first, any it stacks on).

    Returns the layers of ``folder``'s own adapter. ``merge`` scales this
    adapter only (the P-SACPO ratio q for a stage-2 adapter). With
    ``with_base=False`` the adapter it stacks on must be on ``model`` already.
    Raises :class:`~rsa_mlx.util.errors.InputError` (one line) for a bad
    ``adapter_config.json`` or an adapter trained for a different model.
    """
    folder = Path(folder)
    config = read_config(folder)
    _check_config(config, folder)
    base = (config.get("rsa_mlx") or {}).get("base_adapter")
    if base is None and not any(
        isinstance(m, LORA_TYPES) for _, m in model.named_modules()
    ):
        weights = mx.load(str(check_safetensors(folder / ADAPTER_FILE)))
        try:
            load_adapters(model, str(folder))  # plain mlx-lm adapter
            failure = None
        except (ValueError, KeyError) as e:
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            failure = lines[-1] if lines else type(e).__name__
        _check_match(folder, weights, _lora_tensors(model), config["num_layers"])
        if failure is not None:
            raise InputError(f"{quote(folder)}: cannot load the adapter ({failure})")
        layers = [m for _, m in model.named_modules() if isinstance(m, LORA_TYPES)]
    else:
        if base is not None and with_base:
            apply_adapter(model, (folder / base).resolve())
        cfg = config_from_file(config)
        layers = add_adapter(model, cfg)
        weights = mx.load(str(check_safetensors(folder / ADAPTER_FILE)))
        _check_match(folder, weights, adapter_weights(model), cfg.num_layers)
        model.load_weights(list(weights.items()), strict=False)
    if merge != 1.0:
        for m in layers:
            m.scale = merge * m.scale
    model.freeze()
    return layers


def save_combined(folder: Path, model: nn.Module, num_layers: int, extra=None) -> None:
    """Write all of ``model``'s adapters as one plain mlx-lm adapter."""
    weights, rank = combined_adapter(model)
    keys = sorted({relative_key(model, k.rsplit(".", 1)[0]) for k in weights})
    cfg = LoRAConfig(
        rank=rank, scale=1.0, dropout=0.0, num_layers=num_layers, keys=keys
    )
    folder = Path(folder)
    save_safetensors(folder / ADAPTER_FILE, weights)
    save_json(folder / CONFIG_FILE, adapter_config(cfg, extra))


def check_targets(model: nn.Module, lora: LoRAConfig) -> None:
    """Refuse ``keys`` that name no linear or embedding module of a block."""
    if lora.keys is None:
        return
    kinds = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)
    kinds += (SwitchLinear, QuantizedSwitchLinear, *LORA_TYPES)
    block = model.layers[-1]
    names = [p for p, m in block.named_modules() if isinstance(m, kinds) and p]
    if unknown := [k for k in lora.keys if k not in names]:
        raise ConfigError(
            f"lora keys: {unknown[0]!r} is not a linear layer of the model's blocks "
            f"(these are: {', '.join(sorted(set(names)))})"
        )
