"""``rsa-mlx info``, ``convert`` and ``export``: the machine, and models in
and out. Heavy layers are imported inside the commands, so ``rsa-mlx
--help`` starts fast."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import click
import mlx.core as mx

import rsa_mlx
from rsa_mlx.cli.common import guard, model_options
from rsa_mlx.io.formats import DTYPES, Q_MODES
from rsa_mlx.ops import fastmath
from rsa_mlx.util import blas


@click.command()
@click.option("--no-bench", is_flag=True, help="Skip the matmul measurement.")
def info(no_bench: bool):
    """Show versions, the MLX device and which BLAS MLX uses.

    \b
    Example:
      rsa-mlx info
    """
    try:
        mlx_lm_version = version("mlx-lm")
    except PackageNotFoundError:  # pragma: no cover - odd installs
        mlx_lm_version = "unknown"
    click.echo(f"rsa-mlx     {rsa_mlx.__version__}")
    click.echo(f"python      {platform.python_version()} ({sys.platform})")
    click.echo(f"mlx         {mx.__version__}")
    click.echo(f"mlx-lm      {mlx_lm_version}")
    click.echo(f"device      {mx.default_device()}")
    details = mx.device_info()  # keys differ between Metal and CPU
    for key in ("device_name", "architecture", "memory_size"):
        if key in details:
            click.echo(f"  {key:<12s} {details[key]}")
    click.echo(f"fast exp    {_fast_exp_note()}")
    status = blas.STATUS
    click.echo(f"openblas    {'loaded' if status.loaded else 'not loaded'}")
    click.echo(f"  reason    {status.reason}")
    if status.path:
        click.echo(f"  path      {status.path}")
    for key in sorted(k for k in os.environ if k.startswith("OPENBLAS_")):
        click.echo(f"  env       {key}={os.environ[key]}")
    for lib in blas.loaded_blas_libraries():
        click.echo(f"  mapped    {lib}")
    if not no_bench:
        gflops = blas.measure_gflops()
        click.echo(f"matmul      {gflops:.0f} GFLOP/s (float32 1024x1024, CPU)")


def _fast_exp_note() -> str:
    """Whether the CPU's polynomial exp (rsa_mlx.ops.fastmath) is used."""
    if not fastmath.enabled():
        return "off (RSA_MLX_FAST_EXP=0: MLX's own exp on the CPU)"
    if mx.default_device().type != mx.cpu:
        return "on for the CPU; not used on this device (its own exp is fast)"
    return "on (the CPU's polynomial exp; RSA_MLX_FAST_EXP=0 turns it off)"


@click.command(epilog="mlx-lm's spellings: the same flags as `mlx_lm.convert`.")
@click.option(
    "--hf-path",
    "--model",
    "hf_path",
    required=True,
    help="Local HF model folder, Hugging Face id (offline: from the cache), "
    "or a .gguf file (llama, mistral, qwen2; F32/F16/BF16, Q4_0..Q8_0, "
    "k-quants Q2_K..Q6_K).",
)
@click.option(
    "--mlx-path",
    default="mlx_model",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder (must not exist).",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantise the weights.")
@click.option("--q-bits", type=int, help="Bits per weight [mlx-lm default: 4].")
@click.option("--q-group-size", type=int, help="Group size [mlx-lm default: 64].")
@click.option(
    "--q-mode",
    type=click.Choice(Q_MODES),
    default="affine",
    show_default=True,
    help="Quantisation mode.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    help="Parameter dtype [default: the config's torch_dtype].",
)
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code.")
def convert(hf_path, mlx_path, quantize, q_bits, q_group_size, q_mode, dtype, **kw):
    """Convert a Hugging Face model to an mlx-lm folder (wraps mlx_lm.convert).

    \b
    Examples:
      rsa-mlx convert --hf-path Qwen/Qwen2.5-0.5B-Instruct --mlx-path qwen-mlx
      rsa-mlx convert --hf-path ./my-hf-model --mlx-path m-4bit -q --q-bits 4
      rsa-mlx convert --hf-path ./my-hf-model --mlx-path m-f32 --dtype float32
      rsa-mlx convert --hf-path SmolLM2-135M-Instruct.Q4_1.gguf --mlx-path smollm2
    """
    from rsa_mlx.io.convert import convert as run_convert  # heavy: not at --help

    def run():
        out = run_convert(
            hf_path, mlx_path, quantize, q_bits, q_group_size, q_mode, dtype, **kw
        )
        click.echo(f"wrote {out}")

    guard(run)


@click.command(epilog="Exit status 2 on bad input; nothing is left half-written.")
@model_options
@click.option(
    "--save-path",
    type=click.Path(file_okay=False),
    help="Output folder (must not exist).",
)
@click.option(
    "--peft", is_flag=True, help="Write the adapters alone, in PEFT's layout."
)
@click.option(
    "--gguf",
    "gguf_path",
    type=click.Path(dir_okay=False),
    help="Write one GGUF file for llama.cpp / Ollama instead (must not exist).",
)
@click.option(
    "--gguf-type",
    type=click.Choice(["f16", "q8_0"]),
    default="f16",
    show_default=True,
    help="Type of the GGUF file's matrices (norms stay F32).",
)
def export(model, adapter_path, merge, save_path, peft, gguf_path, gguf_type):
    """Export to Hugging Face (a fused folder or a PEFT adapter) or to GGUF.

    The merged folder holds de-quantised safetensors (format pt), the config
    without quantisation keys, the tokenizer and a model card; transformers
    loads it. With --peft, adapter_model.safetensors + adapter_config.json
    for `peft.PeftModel.from_pretrained(base, path)`. With --gguf, one file
    with the fused model, its tokenizer and chat template, for llama.cpp and
    Ollama (llama, mistral and qwen2 models).

    \b
    Examples:
      rsa-mlx export --adapter-path runs/x --save-path aligned-hf
      rsa-mlx export --adapter-path runs/x --merge 0.5 --save-path q05-hf
      rsa-mlx export --adapter-path runs/x --peft --save-path aligned-peft
      rsa-mlx export --adapter-path runs/x --gguf aligned.gguf --gguf-type q8_0
      rsa-mlx export --model qwen-mlx --save-path qwen-hf   # no adapters
    """
    if (save_path is None) == (gguf_path is None):
        raise click.UsageError("give one of --save-path and --gguf")
    if peft and gguf_path is not None:
        raise click.UsageError("--peft writes a folder: use --save-path")

    def run():
        # the heavy layers, here so that `rsa-mlx --help` starts fast
        from rsa_mlx.export.gguf import export_gguf
        from rsa_mlx.export.hf import export_model, export_peft
        from rsa_mlx.tuner.runs import check_merge

        check_merge(merge)
        if gguf_path is not None:
            out = export_gguf(gguf_path, model, adapter_path, merge, gguf_type)
        else:
            write = export_peft if peft else export_model
            out = write(save_path, model=model, adapter_path=adapter_path, merge=merge)
        click.echo(f"wrote {out}")

    guard(run)
