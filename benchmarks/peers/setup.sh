#!/usr/bin/env bash
# Install the peers of benchmarks/bench_peers.py, each in its own virtual
# environment under .venv-peers/ (git-ignored):
#   .venv-peers/mlx-lm-lora : mlx-lm-lora 5.10.x on MLX's CPU backend
#   .venv-peers/trl         : TRL + PEFT on torch 2.13.0 (CPU wheel)
# Usage: bash benchmarks/peers/setup.sh [mlx-lm-lora|trl ...]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
ROOT=.venv-peers
mkdir -p "$ROOT"
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(mlx-lm-lora trl)
for peer in "${want[@]}"; do
  venv="$ROOT/$peer"
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  case "$peer" in
    mlx-lm-lora)
      # The Linux MLX wheel needs the CPU backend extra.
      "$venv/bin/python" -m pip install -q "mlx-lm-lora==5.10.*" "mlx[cpu]" ;;
    trl)
      # torch pinned exactly: an unpinned torch pulls gigabytes of CUDA
      # libraries. Where pip finds no CPU wheel of it, add
      # --extra-index-url https://download.pytorch.org/whl/cpu.
      "$venv/bin/python" -m pip install -q trl peft "torch==2.13.0" ;;
    *) echo "unknown peer $peer" >&2; exit 2 ;;
  esac
  "$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
  echo "$peer: $(grep -iE '^(mlx|mlx-lm|mlx-lm-lora|torch|trl|peft|transformers)==' "$venv/freeze.txt" | tr '\n' ' ')"
done
