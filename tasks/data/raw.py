"""The raw data source: listing its files (S3 prefix or local folder) and copying them into the raw area."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.errors import StepError
from tasks.io import s3

SOURCE_ETAG = "source-etag"  # object metadata key on the copy


def list_source(source: str, patterns: list[str], ignored: list[str] | None = None) -> list[dict]:
    """[{'rel': relative key, 'uri': s3 uri or path, 'size', 'etag'}] for matching files, sorted by rel.

    The relative names of the files that do not match ``patterns`` are appended to ``ignored`` when given, so the
    manifest can say what was left out instead of dropping it silently."""
    wanted = tuple(p.lower() for p in patterns)
    if source.startswith("s3://"):
        bucket, prefix = s3.split_uri(source)
        try:
            objects = list(s3.list_objects(source))
        except Exception as exc:  # noqa: BLE001 - name the source; the cause is chained
            raise StepError(f"cannot list data.source {source}: {exc}") from exc
        found = [{"rel": o["key"][len(prefix):].lstrip("/"), "uri": f"s3://{bucket}/{o['key']}", "size": o["size"],
                  "etag": o["etag"]} for o in objects]
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise StepError(f"data.source {source} is neither an s3:// URI nor an existing folder")
        found = []
        for p in sorted(root.rglob("*")):
            if p.is_file():
                try:
                    data = p.read_bytes()
                except OSError as exc:
                    raise StepError(f"cannot read source file {p}: {exc}") from exc
                found.append({"rel": p.relative_to(root).as_posix(), "uri": str(p), "size": len(data),
                              "etag": hashlib.md5(data, usedforsecurity=False).hexdigest()})
    found = [f for f in found if f["rel"] and not f["rel"].endswith("/")]  # S3 "folder" marker objects
    if ignored is not None:
        ignored += sorted(f["rel"] for f in found if not f["rel"].lower().endswith(wanted))
    return sorted((f for f in found if f["rel"].lower().endswith(wanted)), key=lambda f: f["rel"])


def copy_one(obj: dict, dest_uri: str) -> bool:
    """Copy one source object to dest_uri unless an identical copy is already there; True when copied."""
    current = s3.head(dest_uri)
    if current and current.get("Metadata", {}).get(SOURCE_ETAG) == obj["etag"]:
        return False
    meta = {SOURCE_ETAG: obj["etag"]}
    if obj["uri"].startswith("s3://"):
        s3.copy(obj["uri"], dest_uri, metadata=meta)
    else:
        s3.put_bytes(dest_uri, Path(obj["uri"]).read_bytes(), metadata=meta)
    copied = s3.head(dest_uri)
    if not copied or copied["ContentLength"] != obj["size"]:
        raise StepError(f"copy of {obj['uri']} to {dest_uri} is incomplete "
                        f"({copied and copied['ContentLength']} of {obj['size']} bytes)")
    return True


def manifest_digest(objects: list[dict]) -> str:
    keyed = [(o["rel"], o["etag"], o["size"]) for o in objects]
    return hashlib.sha256(json.dumps(keyed).encode()).hexdigest()
