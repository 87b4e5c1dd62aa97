"""Small S3 helpers over boto3 (SeaweedFS locally, AWS in production).

Endpoint and credentials come from the environment only: ECB_S3_ENDPOINT_URL (unset = real AWS),
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION. Retries are generous because a nightly job
should ride out a short S3 outage instead of failing the run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from functools import lru_cache


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
def _client(endpoint: str | None, key_id: str | None, region: str):
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": int(os.environ.get("ECB_S3_MAX_ATTEMPTS", "12")), "mode": "standard"},
                 connect_timeout=5, read_timeout=60, s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def client():
    return _client(os.environ.get("ECB_S3_ENDPOINT_URL") or None, os.environ.get("AWS_ACCESS_KEY_ID"),
                   os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def ensure_bucket(name: str) -> bool:
    """Create the bucket if it is missing; returns True when it was created."""
    from botocore.exceptions import ClientError

    c = client()
    try:
        c.head_bucket(Bucket=name)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    c.create_bucket(Bucket=name)
    return True


def list_objects(uri: str) -> Iterator[dict]:
    """Yield {'key', 'size', 'etag'} for every object under an s3:// prefix."""
    bucket, prefix = split_uri(uri)
    for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield {"key": obj["Key"], "size": obj["Size"], "etag": obj["ETag"].strip('"')}


def head(uri: str) -> dict | None:
    from botocore.exceptions import ClientError

    bucket, key = split_uri(uri)
    try:
        return client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def get_bytes(uri: str) -> bytes:
    bucket, key = split_uri(uri)
    return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def put_bytes(uri: str, data: bytes, content_type: str = "application/octet-stream", metadata: dict | None = None):
    bucket, key = split_uri(uri)
    client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata=metadata or {})


def get_json(uri: str):
    return json.loads(get_bytes(uri))


def put_json(uri: str, obj) -> None:
    put_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), "application/json")


def copy(src_uri: str, dst_uri: str, metadata: dict | None = None) -> None:
    sb, sk = split_uri(src_uri)
    db, dk = split_uri(dst_uri)
    extra = {"Metadata": metadata, "MetadataDirective": "REPLACE"} if metadata is not None else {}
    client().copy_object(Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk}, **extra)


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
