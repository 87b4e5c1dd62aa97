"""Publish a released adapter to the Hugging Face Hub: adapter files + the model card, one commit, one tag.

Token: ``$HF_TOKEN`` (the Airflow side puts the ``huggingface_default`` connection's password there); without one the
push is skipped with one clear line and the step succeeds. Endpoint: ``$HF_ENDPOINT`` when set (a private Hub
mirror, or a test server). The repository is ``release.hub_repo_id``.

The push is idempotent: a release is the tag ``v<registry_version>``. When the tag exists nothing is sent; otherwise
every file goes up in one commit (message ``Release v<version> (snapshot <id>)``) and the tag is put on it. A retry
after a commit whose tag failed sends the same bytes again, the Hub finds nothing changed, and the tag lands on the
existing commit. No file is sent that contains a token or key from the environment.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tasks import env
from tasks.errors import StepError
from tasks.io import s3
from tasks.release.card import model_card

log = logging.getLogger("tasks.release.hub")

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
MIN_SECRET_LEN = 6  # shorter values would match ordinary text; real tokens and keys are far longer
SKIP_REASON = "no Hugging Face token configured (HF_TOKEN / connection huggingface_default): skipping the push"

def assert_no_secrets(text: str, secrets: Iterable[str | None], where: str = "text") -> None:
    """Raise ValueError when ``text`` contains any of ``secrets`` (values shorter than MIN_SECRET_LEN are ignored).

    The message names ``where`` but never the secret.
    """
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LEN and secret in text:
            raise ValueError(f"{where} contains a secret value (a token or key); refusing to publish it")


def _read_files(adapter_dir: Path) -> dict[str, bytes]:
    files = {p.relative_to(adapter_dir).as_posix(): p.read_bytes()
             for p in sorted(adapter_dir.rglob("*")) if p.is_file()}
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise StepError(f"adapter folder {adapter_dir} lacks {', '.join(missing)} (have: {sorted(files)}); "
                        "is it a finetune output?")
    if "README.md" in files:
        log.debug("replacing the adapter folder's README.md with the release's model card")
    return files


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def push_release(adapter_dir: Path, repo_id: str, version: str, meta: dict, token: str,
                 endpoint: str | None = None) -> dict:
    """Push ``adapter_dir`` + the model card to ``repo_id`` as one commit tagged ``v{version}``; idempotent.

    Returns {"status": "pushed" | "exists", "repo_id", "revision" (commit oid), "tag", "files" (sorted)}.
    Raises StepError for Hub failures (a rejected token says so) and ValueError when a file holds a secret.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    adapter_dir = Path(adapter_dir)
    tag = f"v{version}"
    meta = {**meta, "repo_id": repo_id, "registry_version": version}
    files = _read_files(adapter_dir)
    files["README.md"] = model_card(meta).encode()
    secrets = [token, *env.secret_values()]  # every secret of tasks/env.py that is set
    for name, data in sorted(files.items()):
        assert_no_secrets(data.decode("utf-8", errors="replace"), secrets, where=f"file {name} of release {tag}")

    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id} on {api.endpoint}"
    try:
        api.create_repo(repo_id, exist_ok=True, private=meta.get("private"))
        existing = _tag_target(api, repo_id, tag)
        if existing:
            log.info("release %s already on %s (commit %s): nothing to push", tag, where, existing)
            return {"status": "exists", "repo_id": repo_id, "revision": existing, "tag": tag,
                    "files": sorted(api.list_repo_files(repo_id, revision=existing))}
        log.info("pushing release %s to %s: %d files in one commit", tag, where, len(files))
        snapshot_id = meta.get("snapshot_id") or "unknown"
        info = api.create_commit(
            repo_id, [CommitOperationAdd(path_in_repo=n, path_or_fileobj=d) for n, d in sorted(files.items())],
            commit_message=f"Release v{version} (snapshot {snapshot_id})",
            commit_description=f"Registry version {version} of the ECB support chatbot adapter.")
        try:
            api.create_tag(repo_id, tag=tag, revision=info.oid, tag_message=f"Release v{version}")
        except HfHubHTTPError as exc:
            if _status(exc) != 409:
                raise
            # another run tagged the release between our check and our tag: report what the tag points at
            existing = _tag_target(api, repo_id, tag)
            log.warning("release %s was tagged concurrently on %s (commit %s)", tag, where, existing)
            return {"status": "exists", "repo_id": repo_id, "revision": existing, "tag": tag,
                    "files": sorted(api.list_repo_files(repo_id, revision=existing))}
    except OfflineModeIsEnabled as exc:
        raise StepError(f"cannot push release {tag} to {where}: HF_HUB_OFFLINE is set in this environment; unset it "
                        "for the publish step") from exc
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise StepError(f"the Hugging Face Hub rejected the token (HTTP {status}) for {where}: check HF_TOKEN / "
                            "the huggingface_default connection (it needs write access to the repo)") from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StepError(f"Hugging Face Hub request failed while pushing release {tag} to {where} "
                        f"(HTTP {status}): {first_line}") from exc
    log.info("pushed release %s to %s: commit %s, files %s", tag, where, info.oid, ", ".join(sorted(files)))
    return {"status": "pushed", "repo_id": repo_id, "revision": info.oid, "tag": tag, "files": sorted(files)}


def _tag_target(api, repo_id: str, tag: str) -> str | None:
    return next((t.target_commit for t in api.list_repo_refs(repo_id).tags if t.name == tag), None)


def download_adapter(adapter_uri: str, dest: Path) -> list[str]:
    """Copy every object under the adapter prefix into ``dest`` (keeping sub-folders); returns the names."""
    names = s3.download_prefix(adapter_uri, dest)
    if not names:
        raise StepError(f"no adapter files under {adapter_uri} (is --input adapter_uri the finetune manifest's "
                        "adapter_uri?)")
    return names


def publish(adapter_uri: str, version: str, meta: dict, repo_id: str) -> dict:
    """Download the adapter from S3 and push it with its card as release ``v{version}`` (skipped without a token)."""
    token = env.get("HF_TOKEN")
    if not token:
        log.info(SKIP_REASON)
        return {"status": "skipped", "reason": SKIP_REASON, "repo_id": repo_id, "registry_version": version}
    with tempfile.TemporaryDirectory(prefix="ecb-publish-") as tmp:
        names = download_adapter(adapter_uri, Path(tmp))
        log.info("downloaded %d adapter files from %s", len(names), adapter_uri)
        try:
            result = push_release(Path(tmp), repo_id, version, meta, token, env.get("HF_ENDPOINT") or None)
        except ValueError as exc:
            raise StepError(str(exc)) from exc
    return {**result, "registry_version": version, "adapter_uri": adapter_uri}
