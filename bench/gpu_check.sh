#!/usr/bin/env bash
# The GPU figures of issues 5, 18 and 19 in one run (for a session that is lent a GPU): LLaVA-1.5-7B, Qwen2.5-VL-7B
# and DeepSeek-VL-1.3B shapes, random bf16 weights, stage 1 vs prefill and two-stage vs baseline with stage 2
# reusing stage 1's work; the head-selection dump's time and peak memory on the LLaVA-1.5-7B shape.
# Uses .venv if present, else the machine's python3 with the repository on PYTHONPATH (a device machine has torch and
# transformers of its own); prints to stdout and, if $OUT is set, to $OUT/gpu_check.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log=${OUT:+$OUT/gpu_check.txt}
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 240 "$PY" bench/bench_two_stage.py --preset llava7b --device cuda
  timeout 240 "$PY" bench/bench_two_stage.py --preset qwen7b --visual 576 --device cuda
  timeout 180 "$PY" bench/bench_two_stage.py --preset deepseek1_3b --device cuda
  timeout 120 "$PY" bench/bench_select_heads.py --preset llava7b --device cuda --repeats 2
} 2>&1 | grep -v "^Loading weights" | tee ${log:-/dev/null}
