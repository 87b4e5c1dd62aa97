"""Small S3 helpers over boto3 (SeaweedFS locally, AWS in production).

Endpoint and credentials come from the environment only (tasks/env.py): ECB_S3_ENDPOINT_URL (unset = real AWS),
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION. The retry budgets are config fields
(storage.s3_max_attempts, storage.s3_retry_s), set once per process by ``configure(cfg.storage)``: the step runner
and the chat app call it; without a call the StorageConfig defaults apply.

A nightly job should ride out a short S3 outage instead of failing the run, so there are two layers of retries:
- botocore's "standard" mode retries each request on refused connections, timeouts and 5xx answers, with jittered
  exponential backoff, storage.s3_max_attempts times in all (default 12). For non-throttling errors its backoff starts
  at 50 ms, so those attempts span ~30 s on average -- too little, and too random, to promise anything;
- so while S3 is *unreachable* (connection refused or cut, timeouts, 502/503/504) each helper below runs its call
  again until S3 has been unreachable for storage.s3_retry_s seconds (default 120). Every helper is safe to repeat: a
  put or copy writes the same object again, a read or listing starts over.
tests/chaos/test_faults_services.py SIGKILLs the real SeaweedFS for 10 s (about 25 s unreachable with its restart)
in the middle of sync_raw_data and prepare_chatml. Any other failure (no permission, no such bucket, a 500 that
stays) raises S3Error at once, naming the operation, the URI and the cause in words.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import TypeVar

from tasks import env
from tasks.config import StorageConfig
from tasks.errors import StepError

_DENIED = ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "InvalidSecurity", "AccountProblem")
_NO_BUCKET = ("NoSuchBucket",)
_NO_KEY = ("NoSuchKey", "404", "NotFound")
_UNAVAILABLE = (502, 503, 504)

# The buckets a self-hosted stack creates (the dev stack, compose's init job): storage.bucket's default, the default
# data.source landing bucket and MLflow's artifact store.
STACK_BUCKETS = ("ecb-platform", "ecb-landing", "ecb-mlflow")
log = logging.getLogger("tasks.io.s3")
T = TypeVar("T")
_settings = StorageConfig()  # this process's retry budgets: configure() replaces them


class S3Error(StepError):
    """An S3 call failed after its retries; the message names the operation, the URI and the cause."""


def configure(storage: StorageConfig) -> None:
    """Use ``storage.s3_max_attempts`` and ``storage.s3_retry_s`` in this process from now on."""
    global _settings
    _settings = storage


def max_attempts() -> int:
    return _settings.s3_max_attempts


def retry_seconds() -> float:
    return _settings.s3_retry_s


def _status(exc) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _client_error(op: str, uri: str, exc, writes: bool) -> S3Error:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", "?"))
    bucket = uri[5:].partition("/")[0]
    if code in _DENIED:
        why = f"bucket {bucket} is not {'writable' if writes else 'readable'} with these credentials"
    elif code in _NO_BUCKET:
        why = f"bucket {bucket} does not exist"
    elif code in _NO_KEY:
        why = "no such object"
    else:
        retries = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        why = f"the server answered {code}" + (f" {retries + 1} times" if retries else "")
        if writes and _status(exc) >= 500:
            why += f" (is bucket {bucket} read-only or full?)"
    return S3Error(f"cannot {op} {uri}: {why} ({code}: {err.get('Message') or exc})")


def _call(op: str, uri: str, fn: Callable[[], T], writes: bool = False, missing_ok: bool = False) -> T | None:
    """Run one S3 call; while S3 is unreachable run it again (see the module docstring); name what failed.

    ``missing_ok``: a 404 (no such key) returns None instead of raising.
    """
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    first_failure = None
    while True:
        try:
            return fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if missing_ok and code in _NO_KEY:
                return None
            if _status(exc) not in _UNAVAILABLE:
                raise _client_error(op, uri, exc, writes) from exc
            error = exc
        except (BotoConnectionError, HTTPClientError) as exc:  # refused, reset, timed out, cut mid-body
            error = exc
        except BotoCoreError as exc:
            raise S3Error(f"cannot {op} {uri}: {exc}") from exc
        now = time.monotonic()
        first_failure = first_failure or now
        down = now - first_failure
        if down >= retry_seconds():
            raise S3Error(f"cannot {op} {uri}: S3 unreachable for {down:.0f} s, each try making "
                          f"{max_attempts()} attempts ({error})") from error
        log.warning("S3 unreachable while trying to %s %s (%s); trying again for up to %.0f s more",
                    op, uri, error, retry_seconds() - down)
        time.sleep(1.0)


def split_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI without a bucket: {uri!r}")
    return bucket, key


def safe_key(text: str) -> str:
    """A run id as a key segment: Airflow run ids carry ':' and '+', which some S3 servers mangle."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", text)


def join(*parts: str) -> str:
    head, *rest = parts
    return "/".join([head.rstrip("/")] + [p.strip("/") for p in rest if p])


@lru_cache(maxsize=4)
def _client(endpoint: str | None, key_id: str | None, region: str, attempts: int):
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                 connect_timeout=5, read_timeout=60, s3={"addressing_style": "path"})
    c = boto3.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)
    c.meta.events.register_first("needs-retry.s3", _log_failed_attempt)
    return c


def _log_failed_attempt(attempts=1, response=None, caught_exception=None, operation=None, **_):
    """A warning per failed attempt that botocore may retry (refused connection, timeout, 5xx), so an outage shows in
    the step log; returns None, leaving the retry decision to botocore's own handler."""
    if caught_exception is not None:
        why = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None and response[0].status_code >= 500:
        why = f"HTTP {response[0].status_code}"
    else:
        return None
    log.warning("S3 %s failed (attempt %d of %d: %s)", getattr(operation, "name", "call"), attempts, max_attempts(),
                why)
    return None


def client():
    # the key id is part of the cache key only: boto3 reads the credentials from the environment itself
    return _client(env.get("ECB_S3_ENDPOINT_URL") or None, env.get("AWS_ACCESS_KEY_ID") or None,
                   env.get("AWS_DEFAULT_REGION", "us-east-1"), max_attempts())


def ensure_bucket(name: str) -> bool:
    """Create the bucket if it is missing; returns True when it was created."""
    from botocore.exceptions import ClientError

    c = client()
    try:
        c.head_bucket(Bucket=name)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise _client_error("check bucket", f"s3://{name}", exc, writes=False) from exc
    try:
        c.create_bucket(Bucket=name)
    except ClientError as exc:
        raise _client_error("create bucket", f"s3://{name}", exc, writes=True) from exc
    return True


def check_bucket(name: str) -> None:
    """Fail early, naming the bucket, when it does not exist or these credentials cannot reach it (some servers,
    SeaweedFS among them, answer a write into a missing bucket with a bare 500)."""
    if _call("check bucket", f"s3://{name}", lambda: client().head_bucket(Bucket=name), missing_ok=True) is None:
        raise S3Error(f"bucket {name} does not exist (create it, or set storage.bucket)")


def list_objects(uri: str) -> Iterator[dict]:
    """Yield {'key', 'size', 'etag'} for every object under an s3:// prefix."""
    bucket, prefix = split_uri(uri)
    pages = _call("list", uri,
                  lambda: list(client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)))
    for page in pages:  # listed completely before yielding: a listing cut by an outage is an error, never partial
        for obj in page.get("Contents", []):
            yield {"key": obj["Key"], "size": obj["Size"], "etag": obj["ETag"].strip('"')}


def head(uri: str) -> dict | None:
    bucket, key = split_uri(uri)
    return _call("look up", uri, lambda: client().head_object(Bucket=bucket, Key=key), missing_ok=True)


def get_bytes(uri: str) -> bytes:
    bucket, key = split_uri(uri)
    return _call("read", uri, lambda: client().get_object(Bucket=bucket, Key=key)["Body"].read())


def put_bytes(uri: str, data: bytes, content_type: str = "application/octet-stream", metadata: dict | None = None):
    bucket, key = split_uri(uri)
    _call("write", uri, lambda: client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type,
                                                    Metadata=metadata or {}), writes=True)


def get_json(uri: str):
    return json.loads(get_bytes(uri))


def put_json(uri: str, obj) -> None:
    put_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), "application/json")


def copy(src_uri: str, dst_uri: str, metadata: dict | None = None) -> None:
    sb, sk = split_uri(src_uri)
    db, dk = split_uri(dst_uri)
    extra = {"Metadata": metadata, "MetadataDirective": "REPLACE"} if metadata is not None else {}
    _call(f"copy {src_uri} to", dst_uri,
          lambda: client().copy_object(Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk}, **extra), writes=True)


def download_prefix(uri: str, dest) -> list[str]:
    """Copy every object under an s3:// prefix into the folder dest (keeping sub-folders); returns the names."""
    from pathlib import Path

    prefix_uri = uri.rstrip("/") + "/"
    bucket, prefix = split_uri(prefix_uri)
    names = []
    for obj in list_objects(prefix_uri):
        rel = obj["key"][len(prefix):]
        if not rel or rel.endswith("/"):
            continue
        path = Path(dest) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(get_bytes(f"s3://{bucket}/{obj['key']}"))
        names.append(rel)
    return sorted(names)
