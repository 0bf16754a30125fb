"""The ``rsa-mlx`` command line."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import click

import rsa_mlx
from rsa_mlx import _blas
from rsa_mlx.convert import DTYPES, Q_MODES
from rsa_mlx.errors import InputError


def model_options(fn):
    """--model, --adapter-path and --merge: what `rsa_mlx.load` takes.

    The command body calls :func:`check_model_options` inside ``_guard`` (a
    bad value is then one ``error:`` line, exit 2).
    """
    fn = click.option(
        "--merge", type=float, help="Merge ratio q of the last stage, in [0, 1]."
    )(fn)
    fn = click.option(
        "--adapter-path", help="Run folder, stage folder or mlx-lm adapter folder."
    )(fn)
    return click.option(
        "--model", help="Base model folder or HF id (default: the run's)."
    )(fn)


def check_model_options(merge: float | None) -> None:
    from rsa_mlx.runs import check_merge

    check_merge(merge)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(rsa_mlx.__version__, prog_name="rsa-mlx")
def main():
    """Risk-aware Stepwise Alignment (RSA) for MLX.

    Align a language model for helpfulness and then for safety, with a
    token-level risk-aware regulariser (CVaR or entropic risk), on a laptop.
    """


@main.command()
@click.option("--no-bench", is_flag=True, help="Skip the matmul measurement.")
def info(no_bench: bool):
    """Show versions, the MLX device and which BLAS MLX uses.

    \b
    Example:
      rsa-mlx info
    """
    import mlx.core as mx

    try:
        from importlib.metadata import version

        mlx_lm_version = version("mlx-lm")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        mlx_lm_version = "unknown"
    click.echo(f"rsa-mlx     {rsa_mlx.__version__}")
    click.echo(f"python      {platform.python_version()} ({sys.platform})")
    click.echo(f"mlx         {mx.__version__}")
    click.echo(f"mlx-lm      {mlx_lm_version}")
    click.echo(f"device      {mx.default_device()}")
    details = mx.device_info()  # keys differ between Metal and CPU
    for key in ("device_name", "architecture", "memory_size"):
        if key in details:
            click.echo(f"  {key:12s}{details[key]}")
    status = _blas.STATUS
    click.echo(f"openblas    {'loaded' if status.loaded else 'not loaded'}")
    click.echo(f"  reason    {status.reason}")
    if status.path:
        click.echo(f"  path      {status.path}")
    for key in sorted(k for k in os.environ if k.startswith("OPENBLAS_")):
        click.echo(f"  env       {key}={os.environ[key]}")
    for lib in _blas.loaded_blas_libraries():
        click.echo(f"  mapped    {lib}")
    if not no_bench:
        gflops = _blas.measure_gflops()
        click.echo(f"matmul      {gflops:.0f} GFLOP/s (float32 1024x1024, CPU)")


@main.command()
@model_options
@click.option(
    "--prompts",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL with a 'prompt' per row (plus what the scorer needs).",
)
@click.option(
    "--scorer",
    default="demo",
    show_default=True,
    help="demo, refusal (AdvBench phrases; rows need harmful), judge:<model>, "
    "or package.module:function.",
)
@click.option(
    "-k",
    "--samples",
    "k",
    default=8,
    show_default=True,
    help="Sampled responses per prompt.",
)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--unsafe-threshold",
    type=float,
    help="judge: scorers: unsafe when P(unsafe) >= this [default: 0.5].",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Write the results (summary and every sample) as JSON here.",
)
@click.option(
    "--reference",
    metavar="MODEL",
    help="Base model (folder or HF id) to measure the model shift from "
    "[default: the adapter's base model].",
)
@click.option("--no-shift", is_flag=True, help="Skip the model shift.")
def evaluate(
    model,
    adapter_path,
    merge,
    prompts,
    scorer,
    k,
    max_tokens,
    temperature,
    seed,
    unsafe_threshold,
    output,
    reference,
    no_shift,
):
    """Sample K responses per prompt, score them, report helpfulness and tail risk.

    With adapters (or --reference), also the model shift from the base model
    on the sampled responses: the mean per-token KL(model || base), its
    CVaR0.9 over tokens (mean of the worst 10%) and that of the log-ratio.

    \b
    Examples:
      rsa-mlx evaluate --adapter-path runs/x --prompts test.jsonl --scorer demo
      rsa-mlx evaluate --model M --prompts p.jsonl --scorer judge:meta-llama/Llama-Guard-3-1B
      rsa-mlx evaluate --model M --prompts p.jsonl --scorer mypkg.scores:harm
      rsa-mlx evaluate --model M2 --reference M --prompts p.jsonl
    """
    from rsa_mlx import evaluate as ev
    from rsa_mlx.model import load

    def run():
        from rsa_mlx.distributed import rank_zero_only

        if rank_zero_only("rsa-mlx evaluate"):  # under mlx.launch
            return
        check_model_options(merge)
        ev.check_sampling(k=k, max_tokens=max_tokens, temperature=temperature)
        records = ev.read_prompts(prompts)
        judge = ev.load_scorer(scorer, unsafe_threshold)
        ev.check_scorer(judge, records)  # every row, before any model is loaded
        net, tokenizer = load(model, adapter_path=adapter_path, merge=merge)
        name = str(adapter_path or model)
        base = _shift_reference(model, adapter_path, reference, no_shift)
        base_net = None
        if base is not None:
            base_net, base_tokenizer = load(base)
            if base_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise InputError(
                    f"--reference {base}: its tokenizer differs from the model's; "
                    "the shift needs the same one"
                )
        result = ev.evaluate_model(
            net, tokenizer, records, judge, k, max_tokens, temperature, seed,
            label=name, reference=base_net,
        )  # fmt: skip
        result["model"] = {
            "model": model,
            "adapter_path": adapter_path,
            "merge": merge,
            "scorer": scorer,
            "reference": None if base is None else str(base),
        }
        if output:
            from rsa_mlx.atomic import save_json

            save_json(Path(output), result)
        summary = result["summary"]
        click.echo(
            ev.markdown_table(
                {name: summary},
                [
                    *(c for c in ev.COLUMNS if c not in ev.SHIFT_COLUMNS),
                    ("cvar_0.9", "CVaR0.9 cost"),
                    ("worst", "worst"),
                    *ev.SHIFT_COLUMNS,
                ],
            )
        )
        click.echo(
            f"unsafe rate {summary['unsafe_rate']:.4f} "
            f"(unsafe: {summary['unsafe_rule']}, scorer {judge.name})"
        )
        click.echo(_shift_line(summary, base, no_shift))

    _guard(run)


def _shift_reference(model, adapter_path, reference, no_shift) -> str | None:
    """The base model to measure `evaluate`'s model shift from, or None:
    --reference, else the adapter's base model (adapters switched off)."""
    if no_shift:
        return None
    if reference is not None:
        return reference
    if adapter_path is None:
        return None
    if model is None:
        from rsa_mlx.runs import resolve_adapter

        model = resolve_adapter(adapter_path)[1]["model"]  # load() checked it
    return model


def _shift_line(summary: dict, base, no_shift: bool) -> str:
    if no_shift:
        return "model shift: skipped (--no-shift)"
    if base is None:
        return "model shift: none (no adapter; give --reference MODEL to measure it)"
    if not summary.get("shift_tokens"):
        return f"model shift from {base}: no response tokens to measure"
    mu = summary["shift_mu"]
    return (
        f"model shift from {base}: KL {summary['shift_kl']:.4g} per token "
        f"(CVaR{mu:g} {summary['shift_kl_cvar']:.4g}; mean log-ratio "
        f"{summary['shift_logratio']:.4g}), CVaR{mu:g} log-ratio {summary['shift_logratio_cvar']:.4g}, "
        f"over {summary['shift_tokens']} response tokens"
    )


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--output", type=click.Path(dir_okay=False), help="Write the table (Markdown)."
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), help="Write helpfulness vs harm (SVG)."
)
def compare(results, output, plot):
    """One table (and plot) for several `rsa-mlx evaluate --output` files.

    \b
    Example:
      rsa-mlx compare base.json dpo.json rsa.json --output table.md --plot plot.svg
    """
    from rsa_mlx import compare as compare_results
    from rsa_mlx import evaluate as ev

    def run():
        summaries = compare_results.read_results(results)
        table = ev.markdown_table(
            summaries, [*ev.COLUMNS, ("cvar_0.9", "CVaR0.9 cost")]
        )
        click.echo(table)
        rules = {s.get("unsafe_rule") for s in summaries.values()} - {None}
        if rules:
            click.echo("unsafe: " + "; ".join(sorted(rules)))
        chart = compare_results.harm_chart(summaries) if plot else None
        if output:
            from rsa_mlx.atomic import save_text

            save_text(output, table + "\n")
        if chart is not None:
            from rsa_mlx.plot import write_figure

            svg = write_figure(plot, [chart], columns=1)
            click.echo(f"wrote {svg} and {svg.with_suffix('.png')}")

    _guard(run)


@main.command(epilog="mlx-lm's spellings: the same flags as `mlx_lm.convert`.")
@click.option(
    "--hf-path",
    "--model",
    "hf_path",
    required=True,
    help="Local HF model folder, Hugging Face id (offline: from the cache), "
    "or a .gguf file (llama, mistral, qwen2; F32/F16/BF16/Q4_0/Q4_1/Q8_0).",
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
    from rsa_mlx.convert import convert as run_convert

    def run():
        out = run_convert(
            hf_path, mlx_path, quantize, q_bits, q_group_size, q_mode, dtype, **kw
        )
        click.echo(f"wrote {out}")

    _guard(run)


@main.command(epilog="Exit status 2 on bad input; nothing is left half-written.")
@model_options
@click.option(
    "--save-path",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder (must not exist).",
)
@click.option(
    "--peft", is_flag=True, help="Write the adapters alone, in PEFT's layout."
)
def export(model, adapter_path, merge, save_path, peft):
    """Export to Hugging Face: a fused model folder, or a PEFT adapter.

    The merged folder holds de-quantised safetensors (format pt), the config
    without quantisation keys, the tokenizer and a model card; transformers
    loads it. With --peft, adapter_model.safetensors + adapter_config.json
    for `peft.PeftModel.from_pretrained(base, path)`.

    \b
    Examples:
      rsa-mlx export --adapter-path runs/x --save-path aligned-hf
      rsa-mlx export --adapter-path runs/x --merge 0.5 --save-path q05-hf
      rsa-mlx export --adapter-path runs/x --peft --save-path aligned-peft
      rsa-mlx export --model qwen-mlx --save-path qwen-hf   # no adapters
    """
    from rsa_mlx.export import export_model, export_peft

    def run():
        check_model_options(merge)
        write = export_peft if peft else export_model
        out = write(save_path, model=model, adapter_path=adapter_path, merge=merge)
        click.echo(f"wrote {out}")

    _guard(run)


@main.command()
@model_options
@click.option(
    "-p", "--prompt", default="-", show_default=True, help="Prompt; '-' reads stdin."
)
@click.option("--system-prompt", help="System message for the chat template.")
@click.option(
    "--ignore-chat-template", is_flag=True, help="Use the prompt text as it is."
)
@click.option("-m", "--max-tokens", default=256, show_default=True)
@click.option("--temp", default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("-n", "--num-samples", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
def generate(model, adapter_path, merge, prompt, system_prompt, ignore_chat_template,
             max_tokens, temp, top_p, num_samples, seed):  # fmt: skip
    """Sample from a model with its adapters (and merge ratio q).

    \b
    Examples:
      rsa-mlx generate --adapter-path runs/x --prompt "How do I pick a lock?"
      rsa-mlx generate --adapter-path runs/x --merge 0.5 --temp 0.7 -n 4 -p "Hi"
      echo "Hello" | rsa-mlx generate --model qwen-mlx
    """
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from rsa_mlx import evaluate as ev
    from rsa_mlx.model import load

    def run():
        from rsa_mlx.distributed import rank_zero_only

        if rank_zero_only("rsa-mlx evaluate"):  # under mlx.launch
            return
        check_model_options(merge)
        ev.check_sampling(max_tokens=max_tokens, temperature=temp)
        if num_samples < 1:
            raise InputError(f"-n/--num-samples must be at least 1, not {num_samples}")
        if not 0.0 <= top_p <= 1.0:
            raise InputError(f"--top-p must be in [0, 1], not {top_p}")
        if prompt == "-" and _stdin_is_terminal():
            click.echo(
                "reading the prompt from stdin (end it with Ctrl-D), or give -p TEXT",
                err=True,
            )
        text = sys.stdin.read() if prompt == "-" else prompt
        net, tokenizer = load(model, adapter_path=adapter_path, merge=merge)
        if ignore_chat_template or tokenizer.chat_template is None:
            ids = tokenizer.encode(text)
        else:
            messages = [{"role": "user", "content": text}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        mx.random.seed(seed)
        sampler = make_sampler(temp=temp, top_p=top_p)
        for i in range(num_samples):
            if num_samples > 1:
                click.echo(f"--- sample {i + 1}")
            for chunk in stream_generate(
                net, tokenizer, ids, max_tokens=max_tokens, sampler=sampler
            ):
                click.echo(chunk.text, nl=False)
            click.echo()

    _guard(run)


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script for rsa-mlx.

    \b
    Examples:
      eval "$(rsa-mlx completion bash)"        # in ~/.bashrc
      eval "$(rsa-mlx completion zsh)"         # in ~/.zshrc
      rsa-mlx completion fish > ~/.config/fish/completions/rsa-mlx.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    click.echo(cls(main, {}, "rsa-mlx", "_RSA_MLX_COMPLETE").source())


def _stdin_is_terminal() -> bool:
    return bool(getattr(sys.stdin, "isatty", lambda: False)())


def _guard(fn):
    """Run a command body: bad input gives one line on stderr and exit 2."""
    from rsa_mlx.errors import RsaMlxError

    try:
        fn()
    except (RsaMlxError, OSError) as e:
        if os.environ.get("RSA_MLX_DEBUG"):
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def _register():
    from rsa_mlx.cli_sweep import sweep
    from rsa_mlx.train import main as align

    main.add_command(align, "align")
    main.add_command(sweep, "sweep")


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
