"""The local base-model cache shared by model_source (s3:// mirrors) and gguf_import (converted GGUF files): where it
is, one writer per cache folder, file checksums. Its own module so that both can use it without importing each
other."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from tasks import env

MARKER = ".complete"  # written last into a cache folder: its presence means every file in it was verified
LOCK = ".lock"
_CHUNK = 8 * 1024 * 1024


def hash_file(path: Path, *names: str) -> dict[str, str]:
    """{algorithm: hex digest} of a file, read once for all the named algorithms."""
    hashes = {n: hashlib.new(n) for n in names}
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {n: h.hexdigest() for n, h in hashes.items()}


def cache_root(model_cfg=None) -> Path:
    raw = (getattr(model_cfg, "cache_dir", "") or env.get("ECB_MODEL_CACHE")
           or str(Path.home() / ".cache" / "ecb" / "models"))
    return Path(raw).expanduser()


@contextlib.contextmanager
def locked(folder: Path):
    """One writer per cache folder at a time (parallel HPO trials on one machine share the cache)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
