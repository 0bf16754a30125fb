#!/usr/bin/env bash
# Align a real instruct model for helpfulness, then safety, with RSA (CVaR),
# evaluate the tail risk of harmful answers, and export for PyTorch.
#
# On an Apple Silicon Mac with a network (the first run downloads ~1 GB for
# the model and the judge, and the dataset; later runs use the local cache):
#
#   bash examples/real_model_recipe.sh
#
# Every setting is an environment variable, e.g. a shorter run:
#
#   ITERS=50 EVAL_PROMPTS=32 bash examples/real_model_recipe.sh
#
# The test suite runs this script offline with tiny local folders in the
# same layout (tests/test_examples.py).
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}        # HF id or local HF folder
DATA=${DATA:-PKU-Alignment/PKU-SafeRLHF-30K}       # PKU-SafeRLHF rows: both stages
JUDGE=${JUDGE:-Qwen/Qwen2.5-1.5B-Instruct}         # scores harm: P("yes" | is it harmful?)
WORK=${WORK:-work/qwen2.5-0.5b-rsa}
DTYPE=${DTYPE:-}                                   # float16 | bfloat16 | float32 (default: the model's)
ITERS=${ITERS:-300}                                # batches per stage
BATCH=${BATCH:-4}
MAX_SEQ=${MAX_SEQ:-512}
LR=${LR:-2e-5}
RISK=${RISK:-cvar}
MU=${MU:-0.95}
MERGE=${MERGE:-1.0}                                # P-SACPO merge ratio q of the final model
EVAL_PROMPTS=${EVAL_PROMPTS:-64}                   # held-out prompts
K=${K:-8}                                          # sampled answers per prompt
MAX_TOKENS=${MAX_TOKENS:-128}
RSA_MLX=${RSA_MLX:-rsa-mlx}                        # the command (e.g. "python -m rsa_mlx.cli")
PYTHON=${PYTHON:-python3}                          # the Python that has rsa_mlx

mkdir -p "$WORK"
step() { printf '\n=== %s\n' "$*"; }

step "1. convert $MODEL to MLX"
[ -d "$WORK/base" ] || $RSA_MLX convert --hf-path "$MODEL" --mlx-path "$WORK/base" ${DTYPE:+--dtype "$DTYPE"}

step "2. align: helpfulness (stage 1), then safety against stage 1 (stage 2)"
[ -f "$WORK/run/final/adapters.safetensors" ] || $RSA_MLX align \
  --model "$WORK/base" --data "$DATA" \
  --loss variant2 --risk "$RISK" --mu "$MU" --merge "$MERGE" \
  --iters "$ITERS" --batch-size "$BATCH" --learning-rate "$LR" \
  --max-seq-length "$MAX_SEQ" --num-layers -1 \
  --adapter-path "$WORK/run"

step "3. held-out prompts: the first $EVAL_PROMPTS of the test split"
$PYTHON - "$DATA" "$EVAL_PROMPTS" "$WORK/prompts.jsonl" <<'PY'
import json, sys
from rsa_mlx.tuner.data import resolve_source
source, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
files = resolve_source(source, None, "test") or resolve_source(source, None, "valid")
if not files:
    sys.exit(f"{source}: no test or valid split to evaluate on")
seen, rows = set(), []
for path in files:
    for line in open(path):
        prompt = json.loads(line)["prompt"]
        if prompt not in seen and len(rows) < n:
            seen.add(prompt)
            rows.append({"prompt": prompt})
with open(out, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
print(f"{len(rows)} prompts -> {out}")
PY

step "4. evaluate: base, helpfulness stage, both stages (judge: $JUDGE)"
evaluate() {  # name, then model/adapter flags
  local name=$1; shift
  [ -f "$WORK/eval/$name.json" ] || $RSA_MLX evaluate "$@" --prompts "$WORK/prompts.jsonl" \
    --scorer "judge:$JUDGE" -k "$K" --max-tokens "$MAX_TOKENS" --output "$WORK/eval/$name.json"
}
mkdir -p "$WORK/eval"
evaluate base --model "$WORK/base"
evaluate helpful --model "$WORK/base" --adapter-path "$WORK/run/reward"
evaluate rsa --model "$WORK/base" --adapter-path "$WORK/run"
$RSA_MLX compare "$WORK/eval/base.json" "$WORK/eval/helpful.json" "$WORK/eval/rsa.json" \
  --output "$WORK/eval/table.md" --plot "$WORK/eval/plot.svg"

step "5. export: a merged HF folder (transformers) and a PEFT adapter"
[ -d "$WORK/hf" ] || $RSA_MLX export --adapter-path "$WORK/run" --save-path "$WORK/hf"
[ -d "$WORK/peft" ] || $RSA_MLX export --adapter-path "$WORK/run" --peft --save-path "$WORK/peft"

step "done"
echo "table:      $WORK/eval/table.md"
echo "try it:     $RSA_MLX generate --adapter-path $WORK/run -p 'How do I pick a lock?'"
echo "PyTorch:    AutoModelForCausalLM.from_pretrained('$WORK/hf')"
echo "            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('$MODEL'), '$WORK/peft')"
