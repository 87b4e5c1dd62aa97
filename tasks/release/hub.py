"""Publish a released adapter to the Hugging Face Hub: adapter files + the model card, one commit, one tag.

Token: ``$HF_TOKEN`` (the Airflow side puts the ``huggingface_default`` connection's password there); without one the
push is skipped with one clear line and the step succeeds. Endpoint: ``$HF_ENDPOINT`` when set (a private Hub
mirror, or a test server). The repository is ``release.hub_repo_id``.

The push is idempotent: a release is the tag ``v<registry_version>`` on a commit holding the adapter files, the card
and ``ecb_release.json``, the release's lineage (pipeline run id, registry version, snapshot, gate decision id and the
sha256 of every adapter file). When the tag exists and its commit holds the same adapter and lineage, nothing is sent
("exists"); a tag by the same name on different content (a model registry that was wiped and counts from 1 again) is
never taken for this release: see ``push_release``. Otherwise every file goes up in one commit (message
``Release v<version> (snapshot <id>)``) and the tag is put on it. A retry after a commit whose tag failed sends the
same bytes again, the Hub finds nothing changed, and the tag lands on the existing commit. No file is sent that
contains a token or key from the environment.
"""

from __future__ import annotations

import hashlib
import json
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
LINEAGE_FILE = "ecb_release.json"  # what identifies a release on the Hub, beside the tag name
CARD_FILE = "README.md"
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


def lineage(meta: dict, version: str, adapter: dict[str, bytes]) -> dict:
    """The release's identity: which pipeline run, registry version and adapter bytes it is (ecb_release.json)."""
    return {"run_id": meta.get("run_id"), "registry_version": str(version), "snapshot_id": meta.get("snapshot_id"),
            "gate_decision_id": meta.get("gate_decision_id"),
            "adapter_sha256": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(adapter.items())}}


def alternate_tag(version: str, record: dict) -> str:
    """The tag of a release whose ``v<version>`` is taken by other content: ``v<version>-<8 hex>``, from the run id
    (or, without one, the adapter checksums), so a retry of the same release picks the same tag. A digest, because
    Airflow run ids hold ``:`` and ``+``, which tag names cannot."""
    key = record.get("run_id") or json.dumps(record["adapter_sha256"], sort_keys=True)
    return f"v{version}-{hashlib.sha256(str(key).encode()).hexdigest()[:8]}"


def release_files(adapter: dict[str, bytes], record: dict, meta: dict) -> dict[str, bytes]:
    """Every file of the release commit: the adapter, the model card (naming ``meta['tag']``) and the lineage."""
    return {**adapter, CARD_FILE: model_card(meta).encode(),
            LINEAGE_FILE: (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()}


def push_release(adapter_dir: Path, repo_id: str, version: str, meta: dict, token: str,
                 endpoint: str | None = None) -> dict:
    """Push ``adapter_dir`` + the model card + the lineage to ``repo_id`` as one commit tagged ``v{version}``;
    idempotent.

    When ``v{version}`` already names a commit with another adapter or lineage, the release is pushed as a new commit
    tagged ``alternate_tag()`` (``v{version}-<8 hex>``) and a warning says what differs. Why not fail, and why not move
    the tag: people pin a Hub release with ``revision="v1"``, so a published tag must keep meaning what it meant
    (moving or deleting it silently changes what their code downloads), and failing would block every release after a
    model registry reset until someone deleted published tags by hand. The new tag, the card and ecb_release.json
    name this release's run; ``main`` moves to it as for any release. Only when the alternate tag is taken by other
    content too does the push fail (StepError naming both tags and what differs).

    Returns {"status": "pushed" | "exists", "repo_id", "revision" (commit oid), "tag", "files" (sorted)}, plus
    "note" when the alternate tag was used. Raises StepError for Hub failures (a rejected token says so) and
    ValueError when a file holds a secret.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    tag = f"v{version}"
    meta = {**meta, "repo_id": repo_id, "registry_version": version}
    adapter = _read_files(Path(adapter_dir))
    adapter.pop(CARD_FILE, None)  # the release's card replaces the adapter folder's README.md
    record = lineage(meta, version, adapter)
    candidates = {t: release_files(adapter, record, {**meta, "tag": t}) for t in (tag, alternate_tag(version, record))}
    secrets = [token, *env.secret_values()]  # every secret of tasks/env.py that is set
    for t, files in candidates.items():
        for name, data in sorted(files.items()):
            assert_no_secrets(data.decode("utf-8", errors="replace"), secrets, where=f"file {name} of release {t}")

    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id} on {api.endpoint}"
    try:
        api.create_repo(repo_id, exist_ok=True, private=meta.get("private"))
        return _release(api, repo_id, version, meta, candidates, where)
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


def _release(api, repo_id: str, version: str, meta: dict, candidates: dict[str, dict[str, bytes]],
             where: str) -> dict:
    """Try the tags in order: a free one gets the commit, one on the same release is "exists", one on other content
    is passed over (with a warning) for the next."""
    taken: list[str] = []
    for tag, files in candidates.items():
        target = _tag_target(api, repo_id, tag)
        if target is None:
            log.info("pushing release %s to %s: %d files in one commit", tag, where, len(files))
            oid = _commit(api, repo_id, version, meta, files)
            if _create_tag(api, repo_id, tag, oid, version):
                log.info("pushed release %s to %s: commit %s, files %s", tag, where, oid, ", ".join(sorted(files)))
                return _result("pushed", repo_id, oid, tag, sorted(files), taken)
            # another run tagged the release between our check and our tag: judge what the tag points at
            target = _tag_target(api, repo_id, tag)
            log.warning("release %s was tagged concurrently on %s (commit %s)", tag, where, target)
        differs = _differences(api, repo_id, target, files)
        if not differs:
            log.info("release %s already on %s (commit %s, same adapter and lineage): nothing to push", tag, where,
                     target)
            return _result("exists", repo_id, target, tag, sorted(api.list_repo_files(repo_id, revision=target)),
                           taken)
        taken.append(f"tag {tag} on {where} names commit {target}, which is not this release ({'; '.join(differs)})")
        log.warning("%s; was the model registry reset? %s", taken[-1],
                    "trying the next tag" if len(taken) < len(candidates) else "no tag left")
    raise StepError(f"cannot publish release v{version} of run {meta.get('run_id') or 'unknown'}: "
                    + "; ".join(taken) + ". Resolve it by pushing to a new repository (release.hub_repo_id) or, if "
                    "those tags are known to be wrong, deleting them on the Hub; then rerun the step")


def _result(status: str, repo_id: str, oid: str, tag: str, files: list[str], taken: list[str]) -> dict:
    out = {"status": status, "repo_id": repo_id, "revision": oid, "tag": tag, "files": files}
    if taken:
        out["note"] = f"released as {tag}: " + "; ".join(taken)
    return out


def _commit(api, repo_id: str, version: str, meta: dict, files: dict[str, bytes]) -> str:
    from huggingface_hub import CommitOperationAdd

    info = api.create_commit(
        repo_id, [CommitOperationAdd(path_in_repo=n, path_or_fileobj=d) for n, d in sorted(files.items())],
        commit_message=f"Release v{version} (snapshot {meta.get('snapshot_id') or 'unknown'})",
        commit_description=f"Registry version {version} of the ECB support chatbot adapter"
                           + (f", pipeline run {meta['run_id']}." if meta.get("run_id") else "."))
    return info.oid


def _create_tag(api, repo_id: str, tag: str, oid: str, version: str) -> bool:
    """Tag ``oid``; False when the tag already exists (HTTP 409)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_tag(repo_id, tag=tag, revision=oid, tag_message=f"Release v{version}")
    except HfHubHTTPError as exc:
        if _status(exc) != 409:
            raise
        return False
    return True


def _differences(api, repo_id: str, oid: str, files: dict[str, bytes]) -> list[str]:
    """What makes commit ``oid`` another release than ``files``: adapter or lineage files missing or with other
    bytes (the card is left out: it describes the release, a newer template must not make it another one). A commit
    without ecb_release.json (pushed before lineage files existed) is judged by its adapter files alone."""
    from huggingface_hub.hf_api import RepoFile

    remote = {e.path: e for e in api.list_repo_tree(repo_id, revision=oid, recursive=True) if isinstance(e, RepoFile)}
    out = []
    for name, data in sorted(files.items()):
        if name == CARD_FILE or (name == LINEAGE_FILE and name not in remote):
            continue
        if name not in remote:
            out.append(f"{name} is missing there")
        elif _same_content(remote[name], data):
            continue
        elif name == LINEAGE_FILE:
            out.append(f"{LINEAGE_FILE} there names {_lineage_diff(api, repo_id, oid, json.loads(data))}")
        else:
            out.append(f"{name} has other bytes (sha256 {_remote_sha(remote[name])} there, "
                       f"{hashlib.sha256(data).hexdigest()[:12]} here)")
    return out


def _lineage_diff(api, repo_id: str, oid: str, mine: dict) -> str:
    """'run_id r-old (here r-new), ...': the lineage fields in which the release at ``oid`` is another one."""
    try:
        with tempfile.TemporaryDirectory(prefix="ecb-lineage-") as tmp:
            theirs = json.loads(Path(api.hf_hub_download(repo_id, LINEAGE_FILE, revision=oid, cache_dir=tmp))
                                .read_text(encoding="utf-8"))
    except Exception as exc:  # only for the message: the files already differ
        return f"another release (unreadable: {type(exc).__name__})"
    keys = [k for k in ("run_id", "registry_version", "snapshot_id", "gate_decision_id") if theirs.get(k) != mine[k]]
    if theirs.get("adapter_sha256") != mine["adapter_sha256"]:
        keys.append("adapter_sha256")
    return ", ".join(f"{k} {theirs.get(k)} (here {mine[k]})" if k != "adapter_sha256" else "other adapter checksums"
                     for k in keys) or "another release"


def _same_content(entry, data: bytes) -> bool:
    """LFS files are compared by sha256, regular ones by their git blob id."""
    if entry.lfs is not None:
        return entry.lfs.sha256 == hashlib.sha256(data).hexdigest()
    return entry.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _remote_sha(entry) -> str:
    return entry.lfs.sha256[:12] if entry.lfs is not None else f"unknown, git blob {entry.blob_id[:12]}"


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
