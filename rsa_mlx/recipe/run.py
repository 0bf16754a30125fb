"""The real-model recipe, end to end and resumable: ``python -m rsa_mlx.recipe``.

Steps, each skipped when its output exists (so an interrupted run continues
where it stopped; training resumes from its checkpoints):

1. ``model/``: the base model (a GGUF file is converted; a folder is used
   as it is).
2. ``data/``: the prompt sets split into training and held-out prompts
   (:mod:`rsa_mlx.recipe.sets`; the held-out ones in ``eval.jsonl``), and
   preference pairs from the model's own answers
   (:mod:`rsa_mlx.recipe.pairs`): ``reward/`` (stage 1: answers over
   over-refusals on benign and borderline requests) and ``safety/`` (stage
   2: refusals over compliance on harmful requests, plus answer-vs-refusal
   contrast pairs so the stage also learns when not to refuse).
3. ``runs/<method>``: every method of ``--methods`` (both stages each).
4. ``eval/<model>.json``: the base model, stage 1 and every method answer
   every held-out set greedily and sampled (:mod:`rsa_mlx.recipe.evaluate`;
   redone when the evaluation settings change);
   ``report.md``, ``plot.svg``/``plot.png`` and ``results.json`` put them
   side by side with example answers (:mod:`rsa_mlx.recipe.report`).
5. ``export-hf/`` and ``aligned.gguf``: the last method fused into a
   Hugging Face folder and into one GGUF file (F16) for llama.cpp and Ollama.

The settings are saved in ``recipe.json``; run again with settings that
change the data or the training and it is refused by name. The output and
evaluation settings (:data:`FREE`) may change: a finished run can be
evaluated again, e.g. with sampled answers, without training again.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path

from rsa_mlx.eval.sampling import check_sampling
from rsa_mlx.export.gguf import check_gguf_exportable, export_gguf
from rsa_mlx.export.hf import export_model
from rsa_mlx.io.gguf import gguf_to_hf
from rsa_mlx.recipe.evaluate import RecipeEvaluator
from rsa_mlx.recipe.pairs import generate_pairs, write_splits
from rsa_mlx.recipe.prompts import read_harmful
from rsa_mlx.recipe.report import write_report
from rsa_mlx.recipe.sets import HARMFUL, build_sets
from rsa_mlx.recipe.settings import RecipeConfig
from rsa_mlx.study.methods import METHODS
from rsa_mlx.tuner.config import resolve
from rsa_mlx.tuner.model import load
from rsa_mlx.tuner.trainer import train
from rsa_mlx.util import progress as bars
from rsa_mlx.util.atomic import plain, save_json, save_text
from rsa_mlx.util.errors import ConfigError, InputError, quote

SETTINGS_FILE = "recipe.json"
TIMES_FILE = "times.json"
# Settings a rerun may change: what is written, and how the models are
# evaluated (an evaluation made otherwise is redone; no training is).
OUTPUT = ("out", "export", "methods", "eval_stage1")
EVALUATION = ("eval_samples", "eval_max_tokens", "eval_temperature")
FREE = OUTPUT + EVALUATION


@contextmanager
def timed(out: Path, step: str):
    """Add the seconds the block takes to ``step`` in ``out/times.json``, so
    that a resumed recipe reports what every step cost over all its calls
    (a step cut short by a kill loses its partial time)."""
    tic = time.perf_counter()
    yield
    times = step_times(out)
    times[step] = times.get(step, 0.0) + time.perf_counter() - tic
    save_json(out / TIMES_FILE, times)


def step_times(out: Path) -> dict[str, float]:
    """``out/times.json``: seconds per step over every call so far."""
    path = out / TIMES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _step_done(path: Path, what: str) -> bool:
    if path.exists():
        bars.echo(f"{what}: done before, using {path}")
        return True
    return False


def check_rerun(cfg: RecipeConfig, out: Path) -> dict | None:
    """Refuse a folder made with other data or training settings, by name;
    returns the folder's saved settings (None for a new folder)."""
    path = out / SETTINGS_FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    given = dataclasses.asdict(cfg)
    changed = [
        f"{k} {saved[k]!r} -> {given[k]!r}"
        for k in given
        if k not in FREE and k in saved and saved[k] != given[k]
    ]
    if changed:
        raise ConfigError(
            f"{quote(out)} was made with other settings: {'; '.join(changed)}. "
            "Choose another --out, or restore them"
        )
    return saved


def evaluation(settings: dict) -> dict:
    """The settings an evaluation depends on (kept in each ``eval/*.json``)."""
    return {k: settings.get(k) for k in EVALUATION}


def stamp_evaluations(out: Path, saved: dict) -> None:
    """Write into every ``eval/*.json`` made before evaluations carried their
    settings the settings of the run that made them, before ``recipe.json``
    is overwritten and they would be lost."""
    for cache in sorted((out / "eval").glob("*.json")):
        found = json.loads(cache.read_text())
        if "evaluation" not in found:
            save_json(cache, {**found, "evaluation": evaluation(saved)})


def prepare_model(model: str, out: Path) -> str:
    """A model folder: ``model`` itself, or its GGUF converted to ``out``."""
    if not str(model).endswith(".gguf"):
        return model
    target = out / "model"
    if not _step_done(target, "convert"):
        bars.echo(f"convert: {model} -> {target}")
        with timed(out, "convert"):
            gguf_to_hf(model, target, dtype="float32")
    return str(target)


def write_eval_sets(path: Path, sets) -> None:
    rows = [
        {"prompt": p, "set": name, "harmful": name in HARMFUL}
        for name, prompts in sets.eval.items()
        for p in prompts
    ]
    save_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def stage_rows(built: dict, cfg: RecipeConfig) -> dict[str, list[dict]]:
    """Stage 1: the answer-vs-refusal pairs; stage 2: the refusal pairs plus
    ``contrast_pairs`` of those, shuffled together (seeded)."""
    contrast = list(built["reward"])
    if cfg.contrast_pairs >= 0:
        contrast = contrast[: cfg.contrast_pairs]
    safety = built["safety"] + contrast
    random.Random(cfg.seed).shuffle(safety)
    return {"reward": built["reward"], "safety": safety}


def prepare_data(model_dir: str, cfg: RecipeConfig, out: Path) -> Path:
    """Prompt sets, held-out prompts and self-generated pairs in ``out/data``."""
    data = out / "data"
    if _step_done(data / "pairs.json", "pairs"):
        return data
    with timed(out, "pairs"):
        make_pairs(model_dir, cfg, data)
    return data


def make_pairs(model_dir: str, cfg: RecipeConfig, data: Path) -> None:
    """The held-out prompts (``eval.jsonl``) and each stage's pairs."""
    sets = build_sets(
        read_harmful(cfg.harmful), cfg.train_sizes(), cfg.eval_sizes(), cfg.seed,
        rephrased=cfg.advbench_rephrased,
    )  # fmt: skip
    write_eval_sets(data / "eval.jsonl", sets)
    harmful, benign = sets.harmful("train"), sets.benign("train")
    bars.echo(
        f"pairs: sampling the model's answers to {len(harmful)} harmful and "
        f"{len(benign)} benign requests ({sets.excluded} AdvBench requests kept "
        "out of training: paraphrased by held-out ones)"
    )
    tic = time.perf_counter()
    net, tokenizer = load(model_dir)
    built = generate_pairs(
        net, tokenizer, harmful, benign, samples=1, max_tokens=cfg.pair_max_tokens,
        temperature=cfg.pair_temperature, seed=cfg.seed, refusals=cfg.refusals,
        refusal_sentences=cfg.refusal_sentences, cut=cfg.cut_answers,
    )  # fmt: skip
    del net
    counts = {"seconds": time.perf_counter() - tic, "skipped": built["counts"]}
    counts["prompts"] = {
        "train": {k: len(v) for k, v in sets.train.items()},
        "eval": {k: len(v) for k, v in sets.eval.items()},
        "advbench_excluded": sets.excluded,
    }
    for stage, rows in stage_rows(built, cfg).items():
        counts[stage] = write_splits(data / stage, rows, cfg.valid)
        counts[stage]["truncated"] = {
            side: sum(bool(r.get(f"{side}_truncated")) for r in rows)
            for side in ("chosen", "rejected")
        }
        if counts[stage]["train"] == 0:
            raise InputError(
                f"no {stage} pairs could be built ({built['counts']}); the model "
                "may already refuse everything, or never"
            )
    save_json(data / "pairs.json", counts)
    bars.echo(f"pairs: {json.dumps(counts)}")


def method_settings(
    cfg: RecipeConfig,
    name: str,
    model_dir: str,
    data: Path,
    run_dir: Path,
    resume: bool,
) -> dict:
    return {
        "model": model_dir,
        "data": str(data),
        "adapter_path": str(run_dir),
        "resume": resume,
        **cfg.training(),
        "steps_per_report": 5,
        "steps_per_eval": 0,
        "save_every": 10,
        **METHODS[name],
    }


def train_methods(model_dir: str, data: Path, out: Path, cfg: RecipeConfig):
    """Train every method (resuming unfinished runs); return the run folders."""
    runs = {}
    for name in cfg.method_names():
        run_dir = out / "runs" / name
        runs[name] = run_dir
        started = (run_dir / "run.json").exists()
        if started and "final" in json.loads((run_dir / "run.json").read_text()):
            bars.echo(f"train {name}: done before, using {run_dir}")
            continue
        bars.echo(f"train {name}: {METHODS[name]}")
        with timed(out, f"train {name}"):
            train(
                resolve(method_settings(cfg, name, model_dir, data, run_dir, started))
            )
    return runs


def models_to_evaluate(model_dir: str, runs: dict, stage1: bool = True) -> dict:
    """``name -> rsa_mlx.load`` arguments, in report order: the base model,
    the first method's stage 1 (when ``stage1``), then every method."""
    first = next(iter(runs.values()))
    models = {"base": {"model": model_dir}}
    if stage1:
        models["stage1"] = {"model": model_dir, "adapter_path": str(first / "reward")}
    for name, run_dir in runs.items():
        models[name] = {"model": model_dir, "adapter_path": str(run_dir)}
    return models


def evaluate_models(models: dict, data: Path, out: Path, cfg: RecipeConfig) -> dict:
    """Every model on the held-out sets (cached per model, and redone when
    the evaluation settings differ from the cached ones)."""
    evaluator = RecipeEvaluator(
        str(data / "eval.jsonl"), cfg.eval_samples, cfg.eval_max_tokens,
        cfg.eval_temperature, cfg.seed, reference=models["base"]["model"],
    )  # fmt: skip
    evaluator.check()
    wanted = evaluation(dataclasses.asdict(cfg))
    results = {}
    with bars.task("evaluate", len(models), "models") as bar:
        for name, spec in models.items():
            cache = out / "eval" / f"{name}.json"
            found = json.loads(cache.read_text()) if cache.exists() else {}
            if found.get("evaluation") == wanted:
                results[name] = found
            else:
                with timed(out, f"evaluate {name}"):
                    net, tokenizer = evaluator.load(**spec)
                    found = evaluator.answers(net, tokenizer, name)
                # as the cache reads back (a metric with no value: None)
                results[name] = plain(
                    {
                        "metrics": found["metrics"],
                        "answers": found["answers"],
                        "evaluation": wanted,
                    }
                )
                save_json(cache, results[name])
                del net
            bar.advance()
    return results


def export_last(model_dir: str, runs: dict, out: Path) -> None:
    """The last method, fused: ``export-hf/`` (transformers) and
    ``aligned.gguf`` (llama.cpp, Ollama); each skipped when it exists."""
    last = list(runs)[-1]
    if not (out / "export-hf").exists():
        with timed(out, "export"):
            export_model(out / "export-hf", model=model_dir, adapter_path=runs[last])
        bars.echo(f"export: {out / 'export-hf'} ({last}; transformers can load it)")
    if not (out / "aligned.gguf").exists():
        with timed(out, "export"):
            export_gguf(out / "aligned.gguf", model=model_dir, adapter_path=runs[last])
        bars.echo(f"export: {out / 'aligned.gguf'} ({last}; llama.cpp and Ollama)")


def run(cfg: RecipeConfig) -> dict:
    """The whole recipe (see the module docstring); returns the metrics."""
    out = Path(cfg.out)
    check_sampling(k=max(cfg.eval_samples, 1), max_tokens=cfg.eval_max_tokens)
    saved = check_rerun(cfg, out)
    tic = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if saved is not None:
        stamp_evaluations(out, saved)
    save_json(out / SETTINGS_FILE, dataclasses.asdict(cfg))
    model_dir = prepare_model(cfg.model, out)
    if cfg.export:
        check_gguf_exportable(model_dir)  # before hours of work, not after
    data = prepare_data(model_dir, cfg, out)
    runs = train_methods(model_dir, data, out, cfg)
    models = models_to_evaluate(model_dir, runs, cfg.eval_stage1)
    results = evaluate_models(models, data, out, cfg)
    meta = {
        "model": cfg.model,
        "settings": dataclasses.asdict(cfg),
        "pairs": json.loads((data / "pairs.json").read_text()),
    }
    meta["steps"] = step_times(out)
    meta["seconds"] = sum(meta["steps"].values())
    table = write_report(out, results, meta)
    bars.echo("\n" + table)
    if cfg.export:
        export_last(model_dir, runs, out)
    summary = {n: r["metrics"] for n, r in results.items()}
    meta["steps"] = step_times(out)  # the export's too
    meta["seconds"] = sum(meta["steps"].values())
    save_json(out / "results.json", {**meta, "results": summary})
    bars.echo(
        f"wall time {time.perf_counter() - tic:.0f}s (every step over all calls: "
        f"{meta['seconds']:.0f}s); report: {out / 'report.md'}"
    )
    return summary
