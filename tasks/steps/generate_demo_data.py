"""Write the seeded synthetic support dataset (Bitext columns) where the pipeline's sync step will find it.

    python -m tasks generate_demo_data --run-id R --input dest=s3://ecb-landing/support-conversations/ \
        [--input rows=2400] [--input seed=0]
"""

from __future__ import annotations

import hashlib

from tasks.context import StepContext
from tasks.demo import datagen
from tasks.errors import StepError


def run(ctx: StepContext) -> dict:
    dest = (ctx.inputs.get("dest") or "").strip()
    if not dest:
        raise StepError(f"{ctx.step}: input 'dest' is required (an s3://bucket/prefix/ or a local folder), "
                        f"got inputs {sorted(ctx.inputs)}")
    rows = datagen.generate_rows(ctx.int_input("rows", 2400, minimum=0), ctx.int_input("seed", 0, minimum=0))
    data = datagen.to_csv_bytes(rows)
    return {"dest_uri": datagen.store(dest, data), "rows": len(rows), "intents": len({r["intent"] for r in rows}),
            "categories": len({r["category"] for r in rows}), "sha256": hashlib.sha256(data).hexdigest()}
