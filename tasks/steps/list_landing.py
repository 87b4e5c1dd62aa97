"""List the landing prefix (data.source) without copying anything: what the landing watcher DAG compares.

    python -m tasks list_landing --run-id R [--set data.source=s3://bucket/prefix/ | /local/folder]

Returns the number of files matching data.file_patterns, their bytes and the digest over (name, checksum, size) --
the same digest sync_raw_data records for the same files, so a landing asset event and the raw manifest it led to
can be matched. Reads only; an empty prefix is not an error here (nothing has landed yet).
"""

from __future__ import annotations

import logging

from tasks.context import StepContext
from tasks.data.raw import list_source, manifest_digest

log = logging.getLogger("tasks.steps.list_landing")


def run(ctx: StepContext) -> dict:
    data = ctx.config.data
    ignored: list[str] = []
    objects = list_source(data.source, data.file_patterns, ignored)
    digest = manifest_digest(objects)
    n_bytes = sum(o["size"] for o in objects)
    log.info("%s: %d file(s) matching %s, %d bytes, digest %s; %d other file(s) ignored", data.source, len(objects),
             data.file_patterns, n_bytes, digest[:12], len(ignored))
    return {"source": data.source, "digest": digest, "n_objects": len(objects), "n_bytes": n_bytes,
            "n_ignored": len(ignored)}
