#!/usr/bin/env bash
# Wheels that bench/gpu.sh needs and the GPU machine lacks, into .whl/ (ignored; carry it to the device), and the
# Bitext sample into bench/out/:
#     bench/gpu_wheels.sh            # here, where PyPI is reachable
#     run: bench/gpu.sh "$OUT"  with carry [".whl", "bench/out"]
#
# The device image has torch, transformers, peft and Python 3.12 but no network: the chat suite needs the service's
# own stack (flask, gunicorn 23, SQLAlchemy + psycopg2 + alembic, an embedded Postgres from pgserver), the QLoRA
# row needs bitsandbytes, and the hpo suite optuna and the trials' scoring (sacrebleu, rouge_score + nltk). bitsandbytes ships one 20 MB library per CUDA version (128 MB unpacked, over the 64 MiB a
# device call may carry): only the CUDA 13 libraries are kept, which match the image's torch (cu130).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
rm -rf "$DEST" && mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "bitsandbytes>=0.45" "flask>=3.0" itsdangerous blinker "gunicorn>=23,<24" "sqlalchemy>=2.0" greenlet \
  "psycopg2-binary>=2.9" "alembic>=1.13" mako "pgserver>=0.1.4" fasteners platformdirs \
  "optuna>=4" colorlog "sacrebleu>=2" portalocker tabulate colorama lxml regex nltk absl-py joblib click defusedxml six
# rouge_score 0.1.2 is only an sdist on PyPI: its (pure Python) wheel is built here
"$PY" -m pip wheel -q --no-deps -w "$DEST" "rouge_score==0.1.2"

# keep bitsandbytes' CUDA 13 libraries only (and say so in the wheel's RECORD, so pip installs what is listed)
"$PY" - "$DEST" <<'PY'
import pathlib, re, sys, zipfile
for wheel in pathlib.Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda(?!13)\d+|rocm\d+)\.so$")
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop.search(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not drop.search(line.split(b",")[0].decode()))
            dst.writestr(item, data)
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB -> {slim.stat().st_size / 2**20:.1f} MiB (CUDA 13 only)")
    slim.replace(wheel)
PY
# ../shared does not travel with a device call: the real conversations go in the ignored bench/out/
SAMPLE=../shared/data/bitext_customer_support_sample.csv
if [[ -f "$SAMPLE" ]]; then mkdir -p bench/out && cp "$SAMPLE" bench/out/; fi
du -sh "$DEST" bench/out
