"""``rsa-mlx evaluate``, ``generate`` and ``compare``: sample and score a
model, talk to it, and put several evaluations in one table. Heavy layers are
imported inside the commands, so ``rsa-mlx --help`` starts fast."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rsa_mlx.cli.common import guard, model_options, stdin_is_terminal
from rsa_mlx.util.errors import InputError


@click.command()
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
def evaluate(**options):
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
    guard(lambda: _evaluate(**options))


def _evaluate(model, adapter_path, merge, prompts, scorer, k, max_tokens,
              temperature, seed, unsafe_threshold, output, reference, no_shift):  # fmt: skip
    # the heavy layers, here so that `rsa-mlx --help` starts fast
    import rsa_mlx.demo.scorer  # noqa: F401  (registers the demo's scorer)
    from rsa_mlx.eval import evaluate as ev
    from rsa_mlx.eval.prompts import read_prompts
    from rsa_mlx.eval.sampling import check_sampling
    from rsa_mlx.eval.scorers import load_scorer
    from rsa_mlx.tuner.distributed import rank_zero_only
    from rsa_mlx.tuner.model import load
    from rsa_mlx.tuner.runs import check_merge
    from rsa_mlx.util.atomic import save_json

    if rank_zero_only("rsa-mlx evaluate"):  # under mlx.launch
        return
    check_merge(merge)
    check_sampling(k=k, max_tokens=max_tokens, temperature=temperature)
    records = read_prompts(prompts)
    judge = load_scorer(scorer, unsafe_threshold)
    ev.check_scorer(judge, records)  # every row, before any model is loaded
    net, tokenizer = load(model, adapter_path=adapter_path, merge=merge)
    name = str(adapter_path or model)
    base = _shift_reference(model, adapter_path, reference, no_shift)
    base_net = None if base is None else _load_reference(base, tokenizer)
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
        save_json(Path(output), result)
    summary = result["summary"]
    click.echo(_summary_table(name, summary))
    click.echo(
        f"unsafe rate {summary['unsafe_rate']:.4f} "
        f"(unsafe: {summary['unsafe_rule']}, scorer {judge.name})"
    )
    click.echo(_shift_line(summary, base, no_shift))


def _load_reference(base: str, tokenizer):
    """The base model to measure the shift from; it must share the
    tokenizer, or per-token KLs compare different tokens."""
    from rsa_mlx.tuner.model import load  # heavy: not at --help

    base_net, base_tokenizer = load(base)
    if base_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise InputError(
            f"--reference {base}: its tokenizer differs from the model's; "
            "the shift needs the same one"
        )
    return base_net


def _summary_table(name: str, summary: dict) -> str:
    """One row: the harm columns, both CVaRs and the worst case, then the shift."""
    from rsa_mlx.eval import evaluate as ev  # heavy: not at --help

    columns = [
        *(c for c in ev.COLUMNS if c not in ev.SHIFT_COLUMNS),
        ("cvar_0.9", "CVaR0.9 cost"),
        ("worst", "worst"),
        *ev.SHIFT_COLUMNS,
    ]
    return ev.markdown_table({name: summary}, columns)


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
        from rsa_mlx.tuner.runs import resolve_adapter  # heavy: not at --help

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


@click.command()
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
    # the heavy layers, here so that `rsa-mlx --help` starts fast
    from rsa_mlx.eval import evaluate as ev
    from rsa_mlx.study import compare as compare_results
    from rsa_mlx.study.plot import write_figure
    from rsa_mlx.util.atomic import save_text

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
            save_text(output, table + "\n")
        if chart is not None:
            svg = write_figure(plot, [chart], columns=1, note=compare_results.NOTE)
            click.echo(f"wrote {svg} and {svg.with_suffix('.png')}")

    guard(run)


@click.command()
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
    # the heavy layers, here so that `rsa-mlx --help` starts fast
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from rsa_mlx.eval.sampling import check_sampling
    from rsa_mlx.tuner.distributed import rank_zero_only
    from rsa_mlx.tuner.model import load
    from rsa_mlx.tuner.runs import check_merge

    def run():
        if rank_zero_only("rsa-mlx evaluate"):  # under mlx.launch
            return
        check_merge(merge)
        check_sampling(max_tokens=max_tokens, temperature=temp)
        if num_samples < 1:
            raise InputError(f"-n/--num-samples must be at least 1, not {num_samples}")
        if not 0.0 <= top_p <= 1.0:
            raise InputError(f"--top-p must be in [0, 1], not {top_p}")
        if prompt == "-" and stdin_is_terminal():
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

    guard(run)
