"""mlx-lm models: logits at response positions only, and loading runs.

Only response positions need vocabulary-sized work, so the step gathers the
transformer's hidden states at those positions and applies the output head
to them alone: prompt and padding positions never become logits. The split
``model.model`` (trunk) + ``lm_head`` / tied embedding (head) is checked once
against the model's own forward; models whose head does more (logit
soft-capping, scaling) fall back to full logits and a gather.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load as mlx_load

from rsa_mlx.io import hf
from rsa_mlx.ops.fastmath import cpu_kernels
from rsa_mlx.tuner import adapters

# Run-folder resolution lives in rsa_mlx.tuner.runs; re-exported here for the
# callers (the trainer) that import these names from rsa_mlx.tuner.model.
from rsa_mlx.tuner.runs import (
    RUN_FILE,
    check_merge,
    default_merge,
    read_run,
    resolve_adapter,
)
from rsa_mlx.util.errors import InputError

__all__ = [
    "RUN_FILE",
    "ResponseLogits",
    "default_merge",
    "load",
    "read_run",
    "resolve_adapter",
]


def _head(model: nn.Module):
    """A function hidden -> logits matching ``model``'s output layer, or None.

    Looked up at call time, so LoRA layers added later are used.
    """
    trunk = getattr(model, "model", None)
    if trunk is None or not callable(trunk):
        return None
    if "lm_head" in model:
        return lambda h: model.lm_head(h)
    embed = getattr(trunk, "embed_tokens", None)
    if embed is not None and hasattr(embed, "as_linear"):
        return lambda h: model.model.embed_tokens.as_linear(h)
    return None


class ResponseLogits:
    """``logits[i] = head(trunk(tokens).reshape(S * T, d)[index[i]])``.

    ``index`` holds flat positions (row times ``T`` plus column) of the
    hidden states to score: only those become vocabulary-sized logits.
    ``split`` is decided once by comparing against ``model(tokens)`` on a
    short input; when the split does not reproduce the model's logits, full
    logits are computed and gathered instead (correct, slower).
    """

    def __init__(self, model: nn.Module, vocab_check: bool = True):
        self.model = model
        self.head = _head(model)
        self.split = self.head is not None and (not vocab_check or self._agrees())

    def _agrees(self) -> bool:
        tokens = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]], mx.int32)
        full = self.model(tokens).astype(mx.float32)
        mine = self.head(self.model.model(tokens)).astype(mx.float32)
        if full.shape != mine.shape:
            return False
        gap = mx.abs(full - mine).max().item()
        return gap <= 1e-4 * (1.0 + mx.abs(full).max().item())

    def __call__(self, tokens: mx.array, index: mx.array) -> mx.array:
        # On the CPU, attention and SiLU use rsa_mlx.ops.fastmath's exp.
        with cpu_kernels():
            if self.split:
                hidden = self.model.model(tokens)
                hidden = hidden.reshape(-1, hidden.shape[-1])
                return self.head(mx.take(hidden, index, axis=0))
            logits = self.model(tokens)
        return mx.take(logits.reshape(-1, logits.shape[-1]), index, axis=0)


def load(
    model: str | None = None,
    adapter_path: str | Path | None = None,
    merge: float | None = None,
    **load_kwargs,
):
    """Load a base model and rsa_mlx adapters in one call.

    Args:
        model: local folder or Hugging Face id of the base model; taken from
            the run when ``adapter_path`` is a run folder and this is None.
        adapter_path: a run folder (both stages as trained), one stage's
            folder (a stage-2 folder brings its stage-1 adapter along), or a
            plain mlx-lm adapter folder.
        merge: P-SACPO merge ratio q for the last stage (``W1 + q dW2``);
            default: the run's own, else 1.

    Returns ``(model, tokenizer)`` as ``mlx_lm.load`` does.
    """

    check_merge(merge)
    folder, run = (
        (None, None) if adapter_path is None else resolve_adapter(adapter_path)
    )
    if model is None:
        if run is None:
            raise InputError("give the base model (model=...), or a run folder")
        model = run["model"]
    model = hf.snapshot(model, allow_patterns=hf.MODEL_PATTERNS)
    trust = load_kwargs.get("trust_remote_code", False)
    config = hf.check_model_folder(model, trust)  # one-line errors before mlx-lm's
    if fixes := hf.config_fixes(config):
        load_kwargs["model_config"] = {**fixes, **load_kwargs.get("model_config", {})}
    net, tokenizer = mlx_load(str(model), **load_kwargs)
    if folder is not None:
        merge = default_merge(run) if merge is None else merge
        adapters.apply_adapter(net, folder, merge=merge)
        net.eval()
    return net, tokenizer
