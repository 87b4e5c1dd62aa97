#!/usr/bin/env bash
# Every GPU benchmark suite in one call, JSON into OUTDIR:  bench/gpu.sh OUTDIR [--device cpu --quick]
#
# Before the device call, here: bench/gpu_wheels.sh (wheels the image lacks into .whl/, the Bitext sample into
# bench/out/); then one call: `bench/gpu.sh "$OUT"` carrying [".whl", "bench/out"].
# On a GPU machine (the `device` tool): no download -- TinyLlama-1.1B-Chat from the local Hugging Face cache when
# present, else a random-init model of its shape; the conversations come from the Bitext sample when it is found
# (../shared/data, $ECB_BITEXT_CSV, or a copy in bench/out/ carried along), else from the demo generator.
# Each suite has its own time limit (the whole script stays under 6 minutes on an H100) and a failing or timed-out
# suite does not stop the others: its log tail goes to OUTDIR/<suite>.log and the exit code is 1.
# Extra arguments go to every suite, e.g. `bench/gpu.sh /tmp/b --device cpu --quick` tries the script on CPU.
set -euo pipefail

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

# time limits in seconds; TRAIN+EVAL+CHAT+setup must stay under 360 (chat: ~60 s of them compile the decode step)
TRAIN_S=${BENCH_TRAIN_S:-150}
EVAL_S=${BENCH_EVAL_S:-75}
CHAT_S=${BENCH_CHAT_S:-125}
# built models (a 2.2 GB TinyLlama-shape checkpoint on GPU) are shared by the suites, outside OUTDIR
WORK=${BENCH_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/ecb-bench-XXXXXX")}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "python: $PY"
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" || true
  "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>/dev/null || echo "bitsandbytes: not installed (the QLoRA row will say so)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
} > "$OUTDIR/device.txt" 2>&1
cat "$OUTDIR/device.txt"

status=0
run_suite() {  # name limit_s
  local name=$1 limit=$2 rc=0
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$PY" -m bench "$name" --out "$OUTDIR" --work "$WORK" "${EXTRA[@]}" \
    > "$OUTDIR/$name.log" 2>&1 || rc=$?
  grep -v -e "^\s*warnings.warn" -e "Warning" "$OUTDIR/$name.log" | sed -n '/^### /,/^JSON: /p' || true
  if [[ $rc -ne 0 ]]; then
    status=1
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then echo "!! $name: timed out after ${limit}s"; else echo "!! $name: exit $rc"; fi
    tail -n 25 "$OUTDIR/$name.log"
  fi
}

EXTRA=("$@")
run_suite train "$TRAIN_S"
run_suite eval "$EVAL_S"
if [[ -f bench/chat.py ]]; then run_suite chat "$CHAT_S"; else echo "== chat: not available (bench/chat.py missing)"; fi
ls -l "$OUTDIR"
[[ -n "${BENCH_WORK:-}" ]] || rm -rf "$WORK"
exit $status
