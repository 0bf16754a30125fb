"""Adapters: matching checks, config errors, and folding stacked stages."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama, mixtral
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import load_adapters

from rsa_mlx.tuner import adapters as A
from rsa_mlx.util.errors import InputError
from tests.tiny import model_args

VOCAB = 64
TOKENS = mx.array([[1, 5, 9, 2, 33, 60, 7, 7, 12, 40]])


def tiny_llama(layers: int = 2) -> nn.Module:
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(model_args(VOCAB, layers=layers)))
    mx.eval(model.parameters())
    return model


def tiny_mixtral() -> nn.Module:
    mx.random.seed(0)
    args = mixtral.ModelArgs(
        model_type="mixtral",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = mixtral.Model(args)
    mx.eval(model.parameters())
    return model


class EmbedBlock(nn.Module):
    """A block holding an embedding, used both ways (lookup and as_linear)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)

    def __call__(self, ids):
        return self.emb.as_linear(self.proj(self.emb(ids)))


class EmbedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [EmbedBlock(), EmbedBlock()]

    def __call__(self, ids):
        return sum(layer(ids) for layer in self.layers)


def tiny_embed() -> nn.Module:
    mx.random.seed(0)
    model = EmbedModel()
    mx.eval(model.parameters())
    return model


def randomize(layers, seed: int) -> None:
    """Non-zero B (LoRA starts with B = 0, which would fold trivially)."""
    mx.random.seed(seed)
    for m in layers:
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    mx.eval([m.parameters() for m in layers])


def two_stages(make, keys=None, num_layers=-1):
    model = make()
    stage1 = A.add_adapter(
        model, A.LoRAConfig(rank=4, scale=2.0, num_layers=num_layers, keys=keys)
    )
    randomize(stage1, 1)
    stage2 = A.add_adapter(
        model, A.LoRAConfig(rank=3, scale=5.0, num_layers=num_layers, keys=keys)
    )
    randomize(stage2, 2)
    return model, stage1, stage2


CASES = {
    "linear": (tiny_llama, None, LoRALinear),
    "switch": (tiny_mixtral, None, LoRASwitchLinear),
    "embedding": (tiny_embed, ["emb", "proj"], LoRAEmbedding),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_stages_fold_into_one_mlx_lm_adapter(tmp_path, case):
    make, keys, kind = CASES[case]
    model, stage1, stage2 = two_stages(make, keys)
    assert any(isinstance(m, kind) for m in stage1)
    assert any(isinstance(m, kind) for m in stage2)
    stacked = np.array(model(TOKENS))
    with A.disabled(stage2):  # the fold must carry both stages
        assert not np.allclose(np.array(model(TOKENS)), stacked, atol=1e-3)

    weights, rank = A.combined_adapter(model)
    assert all(w.shape[-1] == rank or w.shape[-2] == rank for w in weights.values())
    assert rank == 4 + 3
    A.save_combined(tmp_path, model, num_layers=-1)
    config = json.loads((tmp_path / A.CONFIG_FILE).read_text())
    assert config["lora_parameters"]["rank"] == 7
    assert config["lora_parameters"]["scale"] == 1.0

    fresh = make()
    load_adapters(fresh, str(tmp_path))  # mlx-lm's own loader
    assert any(isinstance(m, kind) for _, m in fresh.named_modules())
    folded = np.array(fresh(TOKENS))
    scale = np.abs(stacked).max()
    np.testing.assert_allclose(folded, stacked, rtol=1e-5, atol=1e-5 * scale)
    # and through rsa_mlx's loader too
    other = make()
    A.apply_adapter(other, tmp_path)
    np.testing.assert_allclose(
        np.array(other(TOKENS)), stacked, rtol=1e-5, atol=1e-5 * scale
    )


def test_fold_pads_layers_with_fewer_stages(tmp_path):
    model = tiny_llama(layers=2)
    randomize(A.add_adapter(model, A.LoRAConfig(rank=4, scale=2.0, num_layers=2)), 1)
    randomize(A.add_adapter(model, A.LoRAConfig(rank=2, scale=3.0, num_layers=1)), 2)
    stacked = np.array(model(TOKENS))
    A.save_combined(tmp_path, model, num_layers=2)
    fresh = tiny_llama(layers=2)
    load_adapters(fresh, str(tmp_path))
    np.testing.assert_allclose(np.array(fresh(TOKENS)), stacked, rtol=1e-5, atol=1e-4)


def save_plain(folder, layers: int, num_layers: int):
    model = tiny_llama(layers)
    cfg = A.LoRAConfig(rank=4, num_layers=num_layers)
    randomize(A.add_adapter(model, cfg), 3)
    A.save_adapter(folder, model, cfg)
    return folder


@pytest.mark.parametrize("num_layers", [2, 16, -1])
def test_adapter_from_a_model_with_fewer_layers_is_refused(tmp_path, num_layers):
    folder = save_plain(tmp_path / "small", layers=2, num_layers=num_layers)
    with pytest.raises(InputError) as err:
        A.apply_adapter(tiny_llama(layers=4), folder)
    message = str(err.value)
    assert "\n" not in message
    assert "trained for a different model" in message
    assert "it adapts layers 0-1" in message
    # the same adapter on its own model is fine
    A.apply_adapter(tiny_llama(layers=2), folder)


def test_adapter_from_a_model_with_more_layers_is_refused(tmp_path):
    folder = save_plain(tmp_path / "big", layers=4, num_layers=-1)
    with pytest.raises(InputError, match="trained for a different model"):
        A.apply_adapter(tiny_llama(layers=2), folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: [c], "expected a JSON object"),
        (lambda c: {**c, "num_layers": "2"}, "'num_layers' must be an integer"),
        (lambda c: {k: v for k, v in c.items() if k != "num_layers"}, "'num_layers'"),
        (
            lambda c: {k: v for k, v in c.items() if k != "lora_parameters"},
            "'lora_parameters' must be an object",
        ),
        (
            lambda c: {**c, "lora_parameters": {"rank": 0, "scale": 1, "dropout": 0}},
            "'lora_parameters.rank' must be a positive integer",
        ),
        (
            lambda c: {**c, "lora_parameters": {"rank": 4, "dropout": 0.0}},
            "'lora_parameters.scale' must be a number",
        ),
        (
            lambda c: {**c, "lora_parameters": {"rank": 4, "scale": 20.0}},
            "'lora_parameters.dropout' must be a number",
        ),
        (
            lambda c: {**c, "lora_parameters": {**c["lora_parameters"], "keys": "q"}},
            "'lora_parameters.keys' must be a list",
        ),
        (lambda c: {**c, "fine_tune_type": "dora"}, "only LoRA adapters"),
        (lambda c: {**c, "rsa_mlx": {"base_adapter": 3}}, "base_adapter"),
    ],
)
def test_bad_adapter_config_is_an_input_error(tmp_path, change, message):
    folder = save_plain(tmp_path / "a", layers=2, num_layers=2)
    config = json.loads((folder / A.CONFIG_FILE).read_text())
    (folder / A.CONFIG_FILE).write_text(json.dumps(change(config)))
    with pytest.raises(InputError, match=message) as err:
        A.apply_adapter(tiny_llama(layers=2), folder)
    assert "\n" not in str(err.value)


def test_malformed_adapter_config_is_an_input_error(tmp_path):
    folder = save_plain(tmp_path / "a", layers=2, num_layers=2)
    (folder / A.CONFIG_FILE).write_text("{not json")
    with pytest.raises(InputError, match="malformed JSON"):
        A.apply_adapter(tiny_llama(layers=2), folder)


def test_stage_one_config_with_empty_base_adapter_loads(tmp_path):
    folder = save_plain(tmp_path / "a", layers=2, num_layers=2)
    config = json.loads((folder / A.CONFIG_FILE).read_text())
    config["rsa_mlx"] = {"base_adapter": None, "beta": 0.1}
    (folder / A.CONFIG_FILE).write_text(json.dumps(config))
    assert A.apply_adapter(tiny_llama(layers=2), folder)
    config["rsa_mlx"] = ["not", "an", "object"]
    (folder / A.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(InputError, match="base_adapter"):
        A.apply_adapter(tiny_llama(layers=2), folder)
