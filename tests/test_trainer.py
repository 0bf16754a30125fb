"""The training engine on tiny random mlx-lm models (no network)."""

from __future__ import annotations

import json
import math
import os
import signal

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_load
from mlx_lm.utils import quantize_model

from rsa_mlx.ops.losses import LOSSES
from rsa_mlx.ops.risk import MEASURES
from rsa_mlx.tuner import adapters, config, data, loop, stage, trainer
from rsa_mlx.tuner.checkpoint import Progress
from rsa_mlx.tuner.config import resolve
from rsa_mlx.tuner.model import ResponseLogits, load
from rsa_mlx.tuner.stage import schedule, train_mode, validate
from rsa_mlx.tuner.step import Objective, make_step
from tests.tiny import pku_rows, write_jsonl, write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_model(root / "model", chat=True, tied=True)
    write_model(root / "untied", chat=True, tied=False, seed=1)
    write_jsonl(root / "data" / "train.jsonl", pku_rows(16))
    write_jsonl(root / "data" / "valid.jsonl", pku_rows(4, seed=1))
    return root


def batches(model_dir, n_pairs=4, count=3, seed=0):
    _, tok = mlx_load(str(model_dir))
    pairs, _ = data.load_pairs(model_dir.parent / "data", "reward")
    enc = data.encode_pairs(pairs, tok, 128)
    sampler = data.BatchSampler(enc, n_pairs, seed)
    stream = iter(sampler)
    return [next(stream).arrays() for _ in range(count)]


def setup(model_dir, lora=None, seed=0):
    model, _ = mlx_load(str(model_dir))
    mx.random.seed(seed)
    layers = adapters.add_adapter(model, lora or adapters.LoRAConfig(num_layers=-1))
    optimizer = optim.AdamW(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    return model, layers, optimizer


def trainable(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("measure", MEASURES)
def test_parameters_move_after_one_step(tiny, loss, measure):
    model, layers, optimizer = setup(tiny / "model")
    step = make_step(model, optimizer, layers, Objective(loss, measure))
    first, second = batches(tiny / "model", count=2)
    before = trainable(model)
    metrics, _ = step(first, None, True)
    mx.eval(model.parameters(), optimizer.state, metrics)
    after_one = trainable(model)
    assert np.isfinite(metrics["loss"].item())
    # lora_b starts at 0 (policy = reference): the first step's gradient
    # reaches it; lora_a's is proportional to lora_b, so it learns from step two
    b_names = [k for k in before if k.endswith("lora_b")]
    assert len(b_names) == len(before) // 2 > 0
    for name in b_names:
        assert not np.array_equal(before[name], after_one[name]), name
    mx.eval(step(second, None, True), model.parameters())
    after_two = trainable(model)
    for name in before:
        assert not np.array_equal(after_one[name], after_two[name]), name


@pytest.mark.parametrize(
    ("loss", "measure"), [("variant2", "cvar"), ("variant1", "erm")]
)
def test_compiled_and_eager_steps_agree(tiny, loss, measure):
    runs = []
    for compiled in (True, False):
        model, layers, optimizer = setup(tiny / "model", seed=3)
        step = make_step(
            model,
            optimizer,
            layers,
            Objective(loss, measure),
            grad_accumulation_steps=2,
            compile=compiled,
        )
        losses, grad = [], None
        for i, batch in enumerate(batches(tiny / "model", count=6)):
            metrics, grad = step(batch, grad, i % 2 == 1)
            mx.eval(model.parameters(), optimizer.state, metrics, grad)
            losses.append(metrics["loss"].item())
        runs.append((losses, trainable(model)))
    assert np.allclose(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-7)
    assert len(set(runs[0][0])) > 2  # the loss does change over the steps
    for name, value in runs[0][1].items():
        assert np.allclose(value, runs[1][1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_name", ["model", "untied"])
def test_adapter_off_reference_equals_frozen_base(tiny, model_name):
    model, layers, optimizer = setup(tiny / model_name)
    step = make_step(model, optimizer, layers, Objective("variant2", "cvar"))
    for batch in batches(tiny / model_name, count=2):
        mx.eval(step(batch, None, True), model.parameters())
    base, _ = mlx_load(str(tiny / model_name))  # a frozen copy of the weights
    tokens, index = batch[0], batch[1]
    forward = ResponseLogits(model)
    assert forward.split  # only response positions become logits
    with adapters.disabled(layers):
        reference = np.array(forward(tokens, index))
    frozen = np.array(ResponseLogits(base)(tokens, index))
    policy = np.array(forward(tokens, index))
    assert np.array_equal(reference, frozen)
    assert not np.allclose(policy, frozen)  # the adapter did learn something
    # and the response-only logits equal the full forward at those positions
    full = np.array(base(tokens))
    gathered = full.reshape(-1, full.shape[-1])[np.array(index)]
    assert np.allclose(frozen, gathered, atol=1e-5)


def test_stage2_reference_equals_stage1_policy(tiny):
    model, layers, optimizer = setup(tiny / "model")
    step = make_step(model, optimizer, layers, Objective("variant2", "cvar"))
    for batch in batches(tiny / "model", count=2):
        mx.eval(step(batch, None, True), model.parameters())
    tokens, index = batch[0], batch[1]
    forward = ResponseLogits(model)
    stage1 = np.array(forward(tokens, index))
    for layer in layers:
        layer.freeze()
    stage2 = adapters.add_adapter(model, adapters.LoRAConfig(num_layers=-1))
    with adapters.disabled(stage2):
        reference = np.array(forward(tokens, index))
    assert np.array_equal(reference, stage1)  # bit for bit
    # stage 2 trains its own adapter only; stage 1 stays as it was
    frozen = {
        k: np.array(v)
        for k, v in tree_flatten(model.parameters())
        if "linear.lora" in k
    }
    optimizer = optim.AdamW(learning_rate=1e-2)
    step = make_step(
        model, optimizer, stage2, Objective("variant2", "cvar", beta=0.025)
    )
    mx.eval(step(batch, None, True), model.parameters())
    with adapters.disabled(stage2):
        assert np.array_equal(np.array(forward(tokens, index)), stage1)
    after = {
        k: np.array(v)
        for k, v in tree_flatten(model.parameters())
        if "linear.lora" in k
    }
    assert frozen.keys() == after.keys() and len(frozen) > 0
    assert all(np.array_equal(frozen[k], after[k]) for k in frozen)


def test_qlora_on_a_quantized_model(tiny):
    model, _ = mlx_load(str(tiny / "model"))
    model, _ = quantize_model(model, {}, group_size=32, bits=4)
    base = [
        np.array(m.scales) for _, m in model.named_modules() if hasattr(m, "scales")
    ]
    assert base  # quantized layers exist
    mx.random.seed(0)
    layers = adapters.add_adapter(model, adapters.LoRAConfig(num_layers=-1))
    optimizer = optim.AdamW(learning_rate=1e-2)
    step = make_step(model, optimizer, layers, Objective("variant2", "erm"))
    before = trainable(model)
    for batch in batches(tiny / "model", count=2):
        mx.eval(step(batch, None, True), model.parameters())
    assert any(not np.array_equal(before[k], v) for k, v in trainable(model).items())
    tokens, index = batch[0], batch[1]
    quantized, _ = mlx_load(str(tiny / "model"))
    quantized, _ = quantize_model(quantized, {}, group_size=32, bits=4)
    with adapters.disabled(layers):
        ref = np.array(ResponseLogits(model)(tokens, index))
    assert np.array_equal(ref, np.array(ResponseLogits(quantized)(tokens, index)))


def test_head_fallback_for_models_with_extra_output_processing(tiny):
    model, _ = mlx_load(str(tiny / "model"))
    plain = ResponseLogits(model)
    original = type(model).__call__

    class Capped(type(model)):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return mx.tanh(original(self, inputs, cache, input_embeddings) / 5) * 5

    model.__class__ = Capped
    capped = ResponseLogits(model)
    assert plain.split and not capped.split
    tokens = mx.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    index = mx.array([1, 3, 7])  # row 0 at 1 and 3, row 1 at 2
    want = np.array(model(tokens)).reshape(10, -1)[[1, 3, 7]]
    # Float32 rounding apart: the step's attention and SiLU use rsa_mlx's exp.
    assert np.allclose(np.array(capped(tokens, index)), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- the loop


def cfg_for(tiny, run_dir, **overrides):
    settings = {
        "model": str(tiny / "model"),
        "data": str(tiny / "data"),
        "iters": 6,
        "batch_size": 4,
        "adapter_path": str(run_dir),
        "steps_per_report": 1,
        "steps_per_eval": 3,
        "save_every": 2,
        "learning_rate": 1e-3,
        "num_layers": -1,
        "seed": 1,
    }
    settings.update(overrides)
    return config.resolve(settings)


def losses_of(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["kind"] == "train":
            out.append((entry["stage"], entry["iteration"], entry["loss"]))
    return out


class Interrupt(trainer.Reporter):
    """A reporter that kills the run at once (an uncaught KeyboardInterrupt,
    like a crash or SIGKILL) after a given iteration."""

    def __init__(self, run_dir, stage, at):
        super().__init__(run_dir)
        self.stop = (stage, at)

    def tick(self, stage, it, iters, seconds):
        if (stage, it) == self.stop:
            raise KeyboardInterrupt


class Signal(trainer.Reporter):
    """A reporter that sends this process a real signal after an iteration."""

    def __init__(self, run_dir, stage, at, signum):
        super().__init__(run_dir)
        self.stop, self.signum = (stage, at), signum

    def tick(self, stage, it, iters, seconds):
        if (stage, it) == self.stop:
            os.kill(os.getpid(), self.signum)


def train_rows(run_dir):
    return [
        (e["stage"], e["iteration"])
        for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if e["kind"] == "train"
    ]


@pytest.mark.parametrize(("stage", "at"), [("reward", 5), ("safety", 3)])
def test_interrupted_and_resumed_run_reproduces_losses(tiny, tmp_path, stage, at):
    full = tmp_path / "full"
    trainer.train(cfg_for(tiny, full, grad_accumulation_steps=2, save_every=2))
    cut = tmp_path / "cut"
    cfg = cfg_for(tiny, cut, grad_accumulation_steps=2, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, reporter=Interrupt(cut, stage, at))
    resumed = config.resolve(
        {"adapter_path": str(cut), "resume": True}, cut / "config.yaml"
    )
    trainer.train(resumed)
    want = losses_of(full)
    # every iteration is in metrics.jsonl once: the killed attempt's rows
    # after the checkpoint are gone
    assert train_rows(cut) == [(s, i) for s, i, _ in want]
    assert losses_of(cut) == want
    # the adapters written at the end are identical too
    for name in ("reward", "safety", "final"):
        a = mx.load(str(full / name / "adapters.safetensors"))
        b = mx.load(str(cut / name / "adapters.safetensors"))
        assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def caller_handler(signum, frame):
    """Stands for whatever handler the caller had before training."""


@pytest.fixture
def own_handlers():
    """This test's own SIGINT and SIGTERM handlers, restored afterwards: what
    the process starts with is not the test's to assume (a terminal gives
    Python's default_int_handler; a background job of a non-interactive shell,
    as CI may run the suite, starts with SIGINT ignored)."""
    saved = {sig: signal.getsignal(sig) for sig in loop.StopSignals.SIGNALS}
    for sig in saved:
        signal.signal(sig, caller_handler)
    yield caller_handler
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(
    "before",
    [caller_handler, signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler],
    ids=["caller", "ignored", "default", "python"],
)
def test_stop_signals_restore_whatever_handlers_were_there(own_handlers, before):
    for sig in loop.StopSignals.SIGNALS:
        signal.signal(sig, before)
    with loop.StopSignals() as stop:
        for sig in loop.StopSignals.SIGNALS:
            assert signal.getsignal(sig) == stop._handle
    assert all(signal.getsignal(s) == before for s in loop.StopSignals.SIGNALS)


@pytest.mark.parametrize(
    ("signum", "stage", "at"),
    [(signal.SIGINT, "reward", 3), (signal.SIGTERM, "safety", 5)],
)
def test_signal_saves_a_checkpoint_and_resume_loses_nothing(
    tiny, tmp_path, signum, stage, at, own_handlers
):
    full = tmp_path / "full"
    trainer.train(cfg_for(tiny, full, save_every=0))
    cut = tmp_path / "cut"
    with pytest.raises(trainer.Interrupted) as err:
        trainer.train(
            cfg_for(tiny, cut, save_every=0), reporter=Signal(cut, stage, at, signum)
        )
    stop = err.value
    assert stop.signum == signum and stop.iteration == at
    assert stop.checkpoint == cut / stage / "checkpoints" / f"step_{at:07d}"
    assert f"--adapter-path {cut} --resume" in str(stop)
    # the caller's handlers are restored once training returns
    for sig in loop.StopSignals.SIGNALS:
        assert signal.getsignal(sig) is own_handlers, signal.Signals(sig).name
    trainer.train(
        config.resolve({"adapter_path": str(cut), "resume": True}, cut / "config.yaml")
    )
    assert losses_of(cut) == losses_of(full)  # no iteration lost or repeated


def test_loop_stops_on_non_finite_loss_and_keeps_last_good_checkpoint():
    saved, calls = [], []

    class FakeBatch:
        tokens, index, pairs, real_tokens = np.zeros((2, 4)), np.zeros(4), 1, 8

        def arrays(self):
            return ()

    def step(arrays, grad, do_update):
        calls.append(do_update)
        loss = mx.array(float("nan") if len(calls) == 5 else 0.5)
        return {"loss": loss, "accuracy": mx.array(1.0), "margins": mx.array(0.0)}, None

    progress = Progress()
    plan = loop.Plan("reward", iters=8, steps_per_report=1, save_every=2)
    with pytest.raises(
        trainer.TrainingError, match="NaN or infinite at iteration 5"
    ) as err:
        loop.loop(
            plan, step, iter([FakeBatch()] * 8), progress, [],
            reporter=Silent(), validate=lambda it: {},
            save=lambda: saved.append(progress.iteration) or f"step_{progress.iteration}",
            params_finite=lambda: True, learning_rate=lambda: 0.0,
        )  # fmt: skip
    assert saved == [2, 4] and "the last good checkpoint is step_4" in str(err.value)


def test_loop_checks_the_parameters_before_each_checkpoint():
    saved = []

    class FakeBatch:
        tokens, index, pairs, real_tokens = np.zeros((2, 4)), np.zeros(4), 1, 8

        def arrays(self):
            return ()

    def step(arrays, grad, do_update):
        return {"loss": mx.array(0.5)}, None

    progress = Progress()
    plan = loop.Plan("safety", iters=8, steps_per_report=100, save_every=2)
    with pytest.raises(trainer.TrainingError, match="at iteration 4") as err:
        loop.loop(
            plan, step, iter([FakeBatch()] * 8), progress, [],
            reporter=Silent(), validate=lambda it: {},
            save=lambda: saved.append(progress.iteration) or f"step_{progress.iteration}",
            params_finite=lambda: progress.iteration < 4, learning_rate=lambda: 0.0,
        )  # fmt: skip
    assert saved == [2] and "step_2" in str(err.value)


class Silent(trainer.Reporter):
    def __init__(self):
        self.rows, self.callback = [], None

    def record(self, entry):
        self.rows.append(entry)

    def note(self, text):
        pass


def test_infinite_gradient_norm_stops_the_run(tiny, tmp_path):
    run_dir = tmp_path / "run"
    cfg = cfg_for(tiny, run_dir, stages="reward", lora_parameters={"scale": 1e30})
    with pytest.raises(trainer.TrainingError, match="NaN or infinite at iteration 1"):
        trainer.train(cfg)


def test_run_folder_and_loading(tiny, tmp_path):
    run_dir = tmp_path / "run"
    run = trainer.train(cfg_for(tiny, run_dir, merge=0.5))
    for name in ("config.yaml", "run.json", "metrics.jsonl"):
        assert (run_dir / name).exists()
    for name in ("reward", "safety", "final"):
        assert (run_dir / name / "adapters.safetensors").exists()
        assert (run_dir / name / "adapter_config.json").exists()
    assert [s["name"] for s in run["stages"]] == ["reward", "safety"]
    assert run["stages"][1]["beta"] == pytest.approx(0.1 / 4)
    safety = json.loads((run_dir / "safety" / "adapter_config.json").read_text())
    assert safety["rsa_mlx"]["base_adapter"] == "../reward"
    # mlx-lm opens stage 1 and the folded final adapter directly
    tokens = mx.array([[1, 2, 3, 50, 60, 70]])
    via_mlx_lm, _ = mlx_load(str(tiny / "model"), adapter_path=str(run_dir / "final"))
    via_rsa, _ = load(adapter_path=str(run_dir))  # both stages, merge 0.5
    assert np.allclose(
        np.array(via_mlx_lm(tokens)), np.array(via_rsa(tokens)), atol=1e-4
    )
    stage1, _ = mlx_load(str(tiny / "model"), adapter_path=str(run_dir / "reward"))
    merged0, _ = load(adapter_path=str(run_dir), merge=0.0)
    assert np.array_equal(np.array(stage1(tokens)), np.array(merged0(tokens)))
    full, _ = load(adapter_path=str(run_dir), merge=1.0)
    half = np.array(via_rsa(tokens))
    assert not np.allclose(half, np.array(full(tokens)))
    # validation ran and training metrics were recorded for every iteration
    entries = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert {e["kind"] for e in entries} == {"train", "val"}
    assert sum(e["kind"] == "train" for e in entries) == 12


def test_existing_run_needs_resume(tiny, tmp_path):
    run_dir = tmp_path / "run"
    trainer.train(cfg_for(tiny, run_dir, iters=2, stages="reward"))
    with pytest.raises(trainer.TrainingError, match="pass --resume"):
        trainer.train(cfg_for(tiny, run_dir, iters=2, stages="reward"))
    with pytest.raises(trainer.TrainingError, match="nothing to resume"):
        trainer.train(cfg_for(tiny, tmp_path / "none", resume=True))


def test_resume_with_other_settings_is_refused_before_anything_is_written(
    tiny, tmp_path
):
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        trainer.train(
            cfg_for(tiny, run_dir, stages="reward"),
            reporter=Interrupt(run_dir, "reward", 3),
        )
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    changes = {
        "beta": 0.5,
        "iters": 7,
        "length_normalize": True,
        "max_grad_norm": 2.0,
        "learning_rate": 2e-3,
    }
    for key, value in changes.items():
        with pytest.raises(config.ConfigError) as err:
            trainer.train(
                cfg_for(tiny, run_dir, stages="reward", resume=True, **{key: value})
            )
        assert f"with other settings: {key} " in str(err.value)
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # config.yaml, metrics, checkpoints untouched
    # a checkpoint whose settings hash differs is refused too
    state = run_dir / "reward" / "checkpoints" / "step_0000002" / "state.json"
    state.write_text(state.read_text().replace('"config_hash": "', '"config_hash": "x'))
    with pytest.raises(trainer.TrainingError, match="other settings"):
        trainer.train(cfg_for(tiny, run_dir, stages="reward", resume=True))
    # settings that do not change the result may change on resume
    state.write_text(state.read_text().replace('"config_hash": "x', '"config_hash": "'))
    trainer.train(
        cfg_for(tiny, run_dir, stages="reward", resume=True, steps_per_report=3)
    )


class Lines(trainer.Reporter):
    def __init__(self, run_dir):
        super().__init__(run_dir)
        self.lines = []

    def note(self, text):
        self.lines.append(text)


@pytest.mark.parametrize("loss", ["dpo", "variant2"])
def test_a_run_reports_risk_only_where_its_loss_has_one(tiny, tmp_path, loss):
    """DPO's KL monitor is ``kl`` only, in metrics.jsonl, run.json and the
    progress lines; a variant2 run also reports its risk (here CVaR)."""
    run_dir = tmp_path / "run"
    lines = Lines(run_dir)
    cfg = cfg_for(tiny, run_dir, stages="reward", iters=2, loss=loss, risk="cvar")
    stage = trainer.train(cfg, lines)["stages"][0]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"train", "val"}
    has_risk = loss != "dpo"
    for row in [*rows, stage["train"], stage["valid"]]:
        assert {"kl", "kl/chosen", "kl/rejected"} <= set(row)
        assert any(k.startswith("risk") for k in row) == has_risk, row
    progress = [x for x in lines.lines if " it " in x or " val " in x]
    assert len(progress) == 3  # two iterations and the validation
    assert all(("| risk " in x) == has_risk for x in progress), progress


# ------------------------------------------------------------------- config


def test_yaml_reads_every_float_spelling(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\nbeta: 2E-1\nalpha: .5\nmax_grad_norm: 1\n")
    cfg = config.resolve({}, path)
    assert cfg.learning_rate == 1e-5 and cfg.beta == 0.2 and cfg.alpha == 0.5
    assert cfg.max_grad_norm == 1.0


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.3\nrisk: erm\nlora_parameters: {rank: 4}\nbatch_size: 2\n")
    cfg = config.resolve({"beta": 0.2, "lora_parameters": {"scale": 5.0}}, path)
    assert cfg.beta == 0.2 and cfg.risk == "erm" and cfg.batch_size == 2
    assert cfg.lora_parameters == {"rank": 4, "scale": 5.0, "dropout": 0.0}
    assert cfg.learning_rate == config.TrainConfig().learning_rate
    assert cfg.stage_beta("safety") == pytest.approx(0.2 / 4)
    assert config.resolve({"safety_beta": 0.05}).stage_beta("safety") == 0.05
    assert config.resolve({"stages": "both", "order": "safety-first"}).stage_names == [
        "safety",
        "reward",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bta: 0.1\n", "unknown setting 'bta'"),
        ("beta: fast\n", "beta: expected float, got 'fast'"),
        ("risk: var\n", "risk: 'var' is not one of kl, cvar, erm, truncated"),
        ("risk: cvar\nmu: 2\n", "mu: cvar needs 0 < mu <= 1"),
        ("merge: 1.5\n", "merge: the merge ratio q must be in [0, 1]"),
        ("lora_parameters: {alpha: 16}\n", "uses scale, not alpha"),
        ("beta: [1\n", "c.yaml:2: malformed YAML"),
        ("iters: 3\nepochs: 1\n", "give one of them"),
        ("lora_parameters: {rank: 0}\n", "lora rank: must be an integer >= 1"),
        ("lora_parameters: {rank: -2}\n", "lora rank: must be an integer >= 1"),
        ("lora_parameters: {dropout: 1.5}\n", "lora dropout: must be in [0, 1)"),
        ("lora_parameters: {keys: []}\n", "lora keys: must be a non-empty list"),
        ("num_layers: 0\n", "num_layers: must be -1 (all) or at least 1"),
        ("warmup: -1\n", "warmup: must be at least 0"),
        ("alpha: -0.5\n", "alpha: must be at least 0"),
        ("weight_decay: -1e-2\n", "weight_decay: must be at least 0"),
        ("steps_per_eval: -1\n", "steps_per_eval: must be at least 0"),
        ("val_batches: -2\n", "val_batches: must be at least -1"),
        ("keep_checkpoints: 0\n", "keep_checkpoints: must be at least 1"),
        ("merge: -0.1\n", "merge: the merge ratio q must be in [0, 1]"),
        ("risk: kl\nmu: 0.5\n", "mu: the kl measure has no level"),
    ],
)
def test_bad_config_values(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.resolve({}, path)
    assert message in str(err.value)


# ---------------------------------------------------- stage-2 reference, dropout


def test_stage2_reference_has_no_dropout_in_the_frozen_stage1_adapter(tiny):
    lora = adapters.LoRAConfig(num_layers=-1, dropout=0.5)
    model, stage1, _ = setup(tiny / "model", lora=lora)
    for layer in stage1:  # a trained stage 1: a non-zero update
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
        layer.freeze()
    tokens, index = batches(tiny / "model", count=1)[0][:2]
    forward = ResponseLogits(model)
    model.eval()
    stage1_policy = np.array(forward(tokens, index))
    stage2 = adapters.add_adapter(model, lora)
    train_mode(model, stage1)
    assert all(m.training for m in stage2) and not any(m.training for m in stage1)
    for _ in range(2):  # a fresh dropout mask would differ every call
        with adapters.disabled(stage2):
            reference = np.array(forward(tokens, index))
        assert np.allclose(reference, stage1_policy, atol=1e-5)
    model.train()  # what the trainer did before: dropout in the reference
    with adapters.disabled(stage2):
        assert not np.allclose(np.array(forward(tokens, index)), stage1_policy)


def first_rows(run_dir, stage):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["stage"] == stage and r["kind"] == "train")


class StopBeforeSafety(trainer.Reporter):
    def note(self, text):
        super().note(text)
        if text.startswith("[safety]"):
            raise KeyboardInterrupt


def test_first_stage2_step_with_dropout_has_zero_kl_and_rewards(tiny, tmp_path):
    lora = {"dropout": 0.1}
    run_dir = tmp_path / "run"
    trainer.train(cfg_for(tiny, run_dir, lora_parameters=lora))
    row = first_rows(run_dir, "safety")  # policy = reference at the first step
    for key in ("kl/chosen", "kl/rejected", "rewards/chosen", "rewards/rejected"):
        assert abs(row[key]) < 1e-6, (key, row[key])
    # the same when stage 2 starts from a resumed run (stage 1 read from disk)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg_for(tiny, cut, lora_parameters=lora), StopBeforeSafety(cut))
    assert json.loads((cut / "run.json").read_text())["stages"][0]["name"] == "reward"
    trainer.train(cfg_for(tiny, cut, lora_parameters=lora, resume=True))
    row = first_rows(cut, "safety")
    for key in ("kl/chosen", "kl/rejected", "rewards/chosen", "rewards/rejected"):
        assert abs(row[key]) < 1e-6, (key, row[key])
    # Bit for bit with MLX's own BLAS; with OpenBLAS loaded, stage 2 after a
    # resume between stages differs in float32's last bits (1.2e-7 relative
    # at its second iteration, measured; equal with RSA_MLX_OPENBLAS=0): its
    # GEMM results depend on more than their inputs (e.g. the arrays'
    # alignment). A wrong reference or dropout stream
    # would differ by orders of magnitude more.
    (resumed, full) = (losses_of(cut), losses_of(run_dir))
    assert [r[:2] for r in resumed] == [r[:2] for r in full]
    assert [r[2] for r in resumed] == pytest.approx([r[2] for r in full], rel=1e-5)


# ------------------------------------------------------- settings of the loop


def test_val_batches_limits_validation_and_zero_turns_it_off(tiny, tmp_path):
    _, tok = mlx_load(str(tiny / "model"))
    pairs, _ = data.load_pairs(tiny / "data", "reward")
    sampler = data.BatchSampler(data.encode_pairs(pairs, tok, 128), 2)
    calls = []

    def evaluate(arrays):
        calls.append(1)
        return {"loss": mx.array(1.0)}

    validate(evaluate, sampler, 3, ["loss"])
    assert len(calls) == 3
    calls.clear()
    validate(evaluate, sampler, -1, ["loss"])
    assert len(calls) == len(sampler) == 8
    run_dir = tmp_path / "run"
    run = trainer.train(cfg_for(tiny, run_dir, stages="reward", val_batches=0))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kinds = {json.loads(x)["kind"] for x in lines}
    assert kinds == {"train"} and run["stages"][0]["valid"] == {}
    assert (run_dir / "reward" / "adapters.safetensors").exists()


def test_warmup_then_cosine_schedule():
    cfg = config.resolve({"learning_rate": 1e-3, "warmup": 4})
    lr = schedule(cfg, 20)
    values = [lr(mx.array(i)).item() for i in range(21)]
    assert values[0] == pytest.approx(1e-3 / 4)
    # a linear ramp from lr/4 reaches the peak at update 4, then cosine decay
    assert values[1:4] == pytest.approx([0.4375e-3, 0.625e-3, 0.8125e-3])
    assert values[4] == pytest.approx(1e-3)
    assert values[4 + 8] == pytest.approx(0.5e-3, rel=1e-5)  # half-way down
    assert values[20] == pytest.approx(0.0, abs=1e-9)
    assert values[:4] == sorted(values[:4]) and values[4:] == sorted(values[4:])[::-1]
    # a fraction of the updates; 0 means no warm-up
    frac = schedule(config.resolve({"learning_rate": 1e-3, "warmup": 0.25}), 20)
    assert frac(mx.array(0)).item() == pytest.approx(1e-3 / 5)
    none = schedule(config.resolve({"learning_rate": 1e-3, "warmup": 0}), 20)
    assert none(mx.array(0)).item() == pytest.approx(1e-3)


def test_epochs_keep_checkpoints_and_grad_checkpoint(tiny, tmp_path):
    run_dir = tmp_path / "run"
    settings = {"iters": None, "epochs": 1.5, "stages": "reward", "save_every": 1}
    run = trainer.train(cfg_for(tiny, run_dir, keep_checkpoints=3, **settings))
    assert run["stages"][0]["iterations"] == 6  # 16 pairs / 4 = 4 batches x 1.5
    kept = sorted(p.name for p in (run_dir / "reward" / "checkpoints").iterdir())
    assert kept == ["step_0000004", "step_0000005", "step_0000006"]
    # recomputing activations in the backward changes nothing
    again = tmp_path / "ckpt"
    trainer.train(
        cfg_for(tiny, again, keep_checkpoints=3, grad_checkpoint=True, **settings)
    )
    want, got = losses_of(run_dir), losses_of(again)
    assert [x[:2] for x in want] == [x[:2] for x in got]
    assert np.allclose([x[2] for x in want], [x[2] for x in got], rtol=1e-5)


def test_lora_keys_choose_the_adapted_layers(tiny, tmp_path):
    run_dir = tmp_path / "run"
    keys = ["self_attn.q_proj", "self_attn.v_proj"]
    cfg = cfg_for(tiny, run_dir, stages="reward", lora_parameters={"keys": keys})
    trainer.train(cfg)
    names = mx.load(str(run_dir / "reward" / "adapters.safetensors"))
    assert {k.split(".")[-2] for k in names} == {"q_proj", "v_proj"}
    assert len(names) == 2 * 2 * 2  # 2 blocks x 2 modules x (lora_a, lora_b)
    bad = tmp_path / "bad"
    cfg = cfg_for(tiny, bad, lora_parameters={"keys": ["self_attn.q_proj", "nonsense"]})
    with pytest.raises(config.ConfigError, match="'nonsense' is not a linear layer"):
        trainer.train(cfg)
    assert not bad.exists()  # refused before the run folder was created


def test_model_and_data_paths_are_stored_resolved(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny)
    cfg = config.resolve(
        {"model": "model", "data": "data", "iters": 1, "stages": "reward",
         "adapter_path": str(tmp_path / "run"), "num_layers": -1}
    )  # fmt: skip
    trainer.train(cfg)
    saved = config.load_yaml(tmp_path / "run" / "config.yaml")
    assert saved["model"] == str(tiny / "model") and saved["data"] == str(tiny / "data")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["model"] == str(
        tiny / "model"
    )
    monkeypatch.chdir(tmp_path)  # the run folder works from anywhere
    model, _ = load(adapter_path="run")
    assert model is not None
    hub_id = config.resolve({"model": "org/not-a-local-folder"}).with_resolved_paths()
    assert hub_id.model == "org/not-a-local-folder"


def numpy_adamw(grads, lrs, bias_correction, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """Adam(W) written from its definition, float64: the parameter after
    each update, for a parameter starting at 1."""
    w, m, v, out = np.ones_like(grads[0]), 0.0, 0.0, []
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        w = w - lr * wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if bias_correction:
            step = lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        else:
            step = lr * m / (np.sqrt(v) + eps)
        w = w - step
        out.append(w.copy())
    return out


@pytest.mark.parametrize("bias_correction", [False, True])
def test_optimizer_with_and_without_bias_correction_against_numpy(bias_correction):
    cfg = resolve(
        {"learning_rate": 1e-2, "warmup": 2, "bias_correction": bias_correction}
    )
    updates = 6
    opt = stage.adamw(cfg, updates)
    sched = schedule(cfg, updates)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=5) for _ in range(updates)]
    lrs = [float(sched(mx.array(i))) for i in range(updates)]
    params = {"w": mx.ones((5,))}
    opt.init(params)
    got = []
    for g in grads:
        params = opt.apply_gradients({"w": mx.array(g, mx.float32)}, params)
        got.append(np.array(params["w"]))
    want = numpy_adamw(grads, lrs, bias_correction)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    # without the correction the first update is (1 - b1) / sqrt(1 - b2) =
    # 3.16x the corrected one (the same sign of gradient everywhere)
    first = np.abs(1.0 - got[0])
    ratio = 3.1622776601683773 if not bias_correction else 1.0
    np.testing.assert_allclose(first, lrs[0] * ratio, rtol=1e-3)


def test_nll_term_moves_parameters_and_compiled_equals_eager(tiny):
    """With --sft-weight the step still trains every parameter, compiled and
    eager agree, and the loss is the preference loss plus the NLL term."""
    results = {}
    for compiled in (True, False):
        model, tok = mlx_load(str(tiny / "model"))
        mx.random.seed(3)
        layers = adapters.add_adapter(model, adapters.LoRAConfig(num_layers=-1))
        opt = optim.AdamW(learning_rate=1e-2)
        opt.init(model.trainable_parameters())
        pairs, _ = data.load_pairs(tiny / "data", "reward")
        batch = next(iter(data.BatchSampler(data.encode_pairs(pairs, tok, 128), 4)))
        objective = Objective("variant2", "cvar", 0.95, 0.1, 0.5, sft_weight=1.0)
        step = make_step(model, opt, layers, objective, compile=compiled)
        before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        metrics, _ = step(batch.arrays(), None, True)
        mx.eval(metrics, model.parameters())
        after = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        assert all(
            not np.array_equal(before[k], after[k]) for k in before if "lora_b" in k
        )
        results[compiled] = {k: float(v) for k, v in metrics.items()}
    for key, value in results[True].items():
        assert math.isclose(value, results[False][key], rel_tol=1e-4, abs_tol=1e-6), key
    # at the first step policy == reference: the preference loss is log 2
    assert math.isclose(
        results[True]["loss"], math.log(2) + results[True]["nll/chosen"], rel_tol=1e-5
    )


def fake_device(monkeypatch, metal: bool, info: dict) -> list:
    """Pretend to be a device with ``info``; return the wired-limit calls."""
    calls = []

    def set_wired_limit(size):
        calls.append(size)
        return 7  # the limit before

    monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
    monkeypatch.setattr(mx, "device_info", lambda: dict(info))
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    return calls


def test_wired_limit_raised_on_metal_and_restored(monkeypatch):
    info = {"device_name": "Apple M", "max_recommended_working_set_size": 123}
    calls = fake_device(monkeypatch, True, info)
    with trainer.wired_limit():
        assert calls == [123]
    assert calls == [123, 7]  # the previous limit, back


def test_wired_limit_restored_after_an_error(monkeypatch):
    info = {"max_recommended_working_set_size": 123}
    calls = fake_device(monkeypatch, True, info)
    with pytest.raises(RuntimeError), trainer.wired_limit():
        raise RuntimeError("stopped")
    assert calls == [123, 7]


@pytest.mark.parametrize(
    ("metal", "info"),
    [
        (False, {"architecture": "x86_64", "device_name": "AMD EPYC"}),  # CPU
        (True, {"device_name": "Apple M"}),  # Metal without the key
        (False, {"max_recommended_working_set_size": 123}),  # key, no Metal
    ],
)
def test_wired_limit_unchanged_without_metal_or_the_key(monkeypatch, metal, info):
    calls = fake_device(monkeypatch, metal, info)
    with trainer.wired_limit():
        pass
    assert calls == []
