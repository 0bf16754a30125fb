# %% [markdown]
# # rsa_mlx from Python
#
# The whole path in a few calls, offline, on the bundled demo model (a small
# assistant that sometimes answers harmful requests harmfully): the risk
# operators on logits, two-stage RSA training, evaluation of the tail risk,
# and export for PyTorch. Run it as a script (about a minute on a 2-core CPU)
#
#     python examples/python_api.py
#
# or cell by cell in an editor that understands `# %%`. `ITERS`, `SAMPLES`
# and `WORK` in the environment change the budget and the output folder.

# %%
import os
from pathlib import Path

import rsa_mlx  # first: on Linux it loads a fast BLAS into MLX

# isort: split
import mlx.core as mx

from rsa_mlx import evaluate as ev
from rsa_mlx.demo.scorer import DemoScorer
from rsa_mlx.demo.settings import BASE_MODEL
from rsa_mlx.demo.world import write_dataset
from rsa_mlx.eval.prompts import read_prompts
from rsa_mlx.export.hf import export_model, export_peft
from rsa_mlx.risk import token_risk
from rsa_mlx.tuner.config import TrainConfig
from rsa_mlx.tuner.trainer import train

WORK = Path(os.environ.get("WORK", "work/python-api"))
ITERS = int(os.environ.get("ITERS", "120"))
SAMPLES = int(os.environ.get("SAMPLES", "8"))

# %% [markdown]
# ## 1. Token-level risk of the log-ratio
#
# For a policy and a reference distribution over the vocabulary, `kl` is
# E_ref[Z] with Z = log ref/policy per token, `cvar` the mean of Z over the
# upper `mu` fraction of reference mass, `erm` the entropic risk
# (1/mu) log E_ref[exp(mu Z)]. Risk measures weigh the tokens where the
# policy has moved furthest from the reference.

# %%
mx.random.seed(0)
ref = mx.random.normal((2, 5, 32))  # [batch, positions, vocabulary]
policy = ref + 0.5 * mx.random.normal(ref.shape)
for measure, mu in [("kl", None), ("cvar", 0.95), ("cvar", 0.5), ("erm", 2.0)]:
    values = token_risk(policy, ref, measure, mu)
    print(f"{measure:5s} mu={mu!s:5s} mean per token {values.mean().item():.4f}")

# %% [markdown]
# ## 2. Data and two-stage training
#
# PKU-SafeRLHF-style rows: `better_response_id` gives the helpfulness pairs
# (stage 1), `safer_response_id` the safety pairs (stage 2, with the stage-1
# model as reference).

# %%
data = WORK / "data"
print(write_dataset(data))
cfg = TrainConfig(
    model=str(BASE_MODEL),
    data=str(data),
    loss="variant2",
    risk="cvar",
    mu=0.95,
    iters=ITERS,
    batch_size=8,
    learning_rate=3e-5,
    num_layers=-1,
    lora_parameters={"rank": 8, "scale": 4.0, "dropout": 0.0},
    max_seq_length=128,
    steps_per_report=max(1, ITERS // 3),
    steps_per_eval=0,
    save_every=0,
    adapter_path=str(WORK / "run"),
).check()
if not (WORK / "run" / "final").exists():  # trained already: reuse it
    run = train(cfg)
    print("stages:", [s["name"] for s in run["stages"]])

# %% [markdown]
# ## 3. Helpfulness and tail risk on held-out prompts
#
# `cvar_0.9` is the mean harm cost of the worst 10% of sampled answers.

# %%
records = read_prompts(data / "test.jsonl")
scorer = DemoScorer()
results = {}
stages = {"base": None, "helpful": WORK / "run" / "reward", "rsa": WORK / "run"}
for name, adapter in stages.items():
    model, tokenizer = rsa_mlx.load(str(BASE_MODEL), adapter_path=adapter)
    out = ev.evaluate_model(model, tokenizer, records, scorer, k=SAMPLES, max_tokens=24)
    results[name] = out["summary"]
print(ev.markdown_table(results, [*ev.COLUMNS, ("cvar_0.9", "CVaR0.9 cost")]))

# %% [markdown]
# ## 4. Export for PyTorch
#
# A merged Hugging Face folder (`AutoModelForCausalLM.from_pretrained`) and
# the adapters alone in PEFT's layout (`PeftModel.from_pretrained`).

# %%
for folder, write in [(WORK / "hf", export_model), (WORK / "peft", export_peft)]:
    if not folder.exists():
        write(folder, adapter_path=WORK / "run")
    print("wrote", folder, sorted(p.name for p in folder.iterdir()))
