"""A minimal, in-memory Hugging Face Hub endpoint for tests (the real Hub cannot be reached offline).

Implements just enough of the Hub HTTP API for huggingface_hub 2.x's ``HfApi`` to work against it when pointed
there with ``HfApi(endpoint=server.url)`` / ``HF_ENDPOINT``:

* ``POST /api/repos/create``                                   create_repo (409 + url when it exists)
* ``GET  /api/models/{repo}`` and ``.../revision/{rev}``        repo_info / model_info (sha, siblings)
* ``GET  /api/models/{repo}/refs``                              list_repo_refs (branches, tags)
* ``GET  /api/models/{repo}/tree/{rev}[/{path}]``               list_repo_tree / list_repo_files
* ``POST /api/models/{repo}/preupload/{rev}``                   preupload: every file is "regular" (no LFS/Xet)
* ``POST /api/models/{repo}/commit/{rev}``                      NDJSON commit: header, file (base64), deletedFile
* ``POST /api/models/{repo}/tag/{rev}``, ``DELETE .../tag/{t}`` create_tag / delete_tag
* ``POST /api/validate-yaml``                                   README front-matter check done by create_commit
* ``GET|HEAD /{repo}/resolve/{rev}/{path}``                     hf_hub_download (X-Repo-Commit, ETag headers)

With ``lfs_suffixes`` (e.g. ``(".safetensors",)``) the tree listing reports matching files as the real Hub reports LFS
files: ``oid`` is the git blob id of the LFS pointer and ``lfs.oid`` the sha256 of the content (the commit endpoint
still takes them as regular files; only what the tree shows changes).

Every request is checked against one bearer token (a wrong token gets the Hub's 401 "Invalid credentials in
Authorization header") and recorded in ``server.requests`` (method, path, auth state, status; for preupload and
commit also the file list). Commits made through the commit endpoint are recorded in ``server.commits`` with the
exact bytes of every file sent. Repos live in memory: commits (oid = sha1 of the commit content), the full file
tree per commit, tags, and one branch ``main`` that starts at an initial commit holding ``.gitattributes`` as on
the real Hub. Only model repos and namespaced ids (``owner/name``) are supported.

    with HubServer(token="hf_x") as hub:
        HfApi(endpoint=hub.url, token="hf_x").create_repo("me/repo")
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

import yaml
from flask import Flask, Response, g, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server

DEFAULT_USER = "ecb-test-user"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_sha(data: bytes) -> str:
    """The git blob id of ``data`` (what ``git hash-object`` prints and the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file's content."""
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
        hashlib.sha256(data).hexdigest().encode(), len(data))


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, bytes]  # the full tree at this commit
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict] = field(default_factory=dict)  # name -> {"oid", "message"}
    created_at: str = ""

    def resolve(self, revision: str) -> str | None:
        """Branch, tag or full commit oid -> commit oid (None when unknown)."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]["oid"]
        return revision if revision in self.commits else None


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # the test output does not need one line per request
        pass


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _error(status: int, message: str, code: str | None = None, **extra) -> Response:
    """An error shaped like the Hub's: JSON {"error": ...} plus X-Error-Code / X-Error-Message headers."""
    resp = jsonify({"error": message, **extra})
    resp.status_code = status
    resp.headers["X-Error-Message"] = message
    if code:
        resp.headers["X-Error-Code"] = code
    return resp


class HubServer:
    """Run with ``start()`` / ``stop()`` or as a context manager; ``url`` is the endpoint to give HfApi."""

    def __init__(self, token: str, user: str = DEFAULT_USER, lfs_suffixes: tuple[str, ...] = ()):
        self.token = token
        self.user = user
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        self.commits: list[dict] = []  # commits received on the commit endpoint: repo_id, oid, summary, files
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.RLock()
        self._server = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True, request_handler=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self._server.server_port}"

    # --- test helpers -------------------------------------------------------------------------------------------

    def fail_next(self, action: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests of ``action`` (create, info, refs, tree, preupload, commit, tag,
        resolve, validate-yaml) with ``status``, to test what the client does after a failure."""
        with self._lock:
            self._failures.setdefault(action, []).extend([status] * times)

    def requests_for(self, action: str) -> list[dict]:
        return [r for r in self.requests if r["action"] == action]

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)].files)

    # --- plumbing -----------------------------------------------------------------------------------------------

    def _auth(self) -> str:
        header = request.headers.get("Authorization", "")
        if not header:
            return "missing"
        scheme, _, value = header.partition(" ")
        return "valid" if scheme.lower() == "bearer" and value == self.token else "invalid"

    def _begin(self, action: str, *, write: bool, repo: Repo | None = None, **details) -> Response | None:
        """Record the request; return an error response when auth fails or a failure was injected."""
        auth = self._auth()
        entry = {"method": request.method, "path": request.path, "query": request.query_string.decode(),
                 "action": action, "auth": auth, **details}
        g.entry = entry
        with self._lock:
            self.requests.append(entry)
            injected = self._failures.get(action)
            status = injected.pop(0) if injected else None
        if auth == "invalid":
            resp = _error(401, INVALID_CREDENTIALS)
        elif auth == "missing" and (write or (repo is not None and repo.private)):
            resp = _error(401, "You must be authenticated to access this resource", "RepoNotFound")
        elif status is not None:
            resp = _error(status, f"injected failure of {action}")
        else:
            return None
        entry["status"] = resp.status_code
        return resp

    def _done(self, resp: Response) -> Response:
        g.entry.setdefault("status", resp.status_code)
        return resp

    def _new_commit(self, repo: Repo, parent: str | None, summary: str, description: str,
                    files: dict[str, bytes]) -> Commit:
        content = json.dumps({"parent": parent, "summary": summary, "description": description,
                              "files": {p: git_blob_sha(b) for p, b in sorted(files.items())}}, sort_keys=True)
        oid = hashlib.sha1(content.encode(), usedforsecurity=False).hexdigest()
        commit = Commit(oid, parent, summary, description, dict(files), _now())
        repo.commits[oid] = commit
        return commit

    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private, created_at=_now())
        initial = self._new_commit(repo, None, "initial commit", "", {".gitattributes": GITATTRIBUTES})
        repo.branches["main"] = initial.oid
        self.repos[repo_id] = repo
        return repo

    # --- the app ------------------------------------------------------------------------------------------------

    def _build_app(self) -> Flask:
        app = Flask("hub_server")

        @app.post("/api/repos/create")
        def create_repo():
            body = request.get_json(force=True, silent=True) or {}
            if err := self._begin("create", write=True, body=body):
                return err
            if body.get("type") not in (None, "model"):
                return self._done(_error(400, f"this test hub only supports model repos, got {body.get('type')}"))
            name = body.get("name") or ""
            repo_id = f"{body.get('organization') or self.user}/{name}"
            url = f"{self.url}/{repo_id}"
            with self._lock:
                if repo_id in self.repos:
                    return self._done(_error(409, "You already created this model repo", url=url))
                self._create_repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
            return self._done(jsonify({"url": url, "name": repo_id, "id": repo_id}))

        @app.post("/api/validate-yaml")
        def validate_yaml():
            body = request.get_json(force=True, silent=True) or {}
            if err := self._begin("validate-yaml", write=False):
                return err
            content = body.get("content") or ""
            errors = []
            if content.startswith("---"):
                front, sep, _ = content[3:].partition("\n---")
                try:
                    if not sep or not isinstance(yaml.safe_load(front) or {}, dict):
                        errors.append({"message": "metadata must be a YAML mapping closed by a '---' line"})
                except yaml.YAMLError as exc:
                    errors.append({"message": f"invalid YAML: {exc}"})
            resp = jsonify({"errors": errors, "warnings": []})
            resp.status_code = 400 if errors else 200
            return self._done(resp)

        @app.route("/api/models/<path:rest>", methods=["GET", "POST", "DELETE"])
        def models_api(rest: str):
            parts = rest.split("/")
            if len(parts) < 2:
                return _error(404, "Repository not found", "RepoNotFound")
            repo_id, action, args = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else "info"), parts[3:]
            handler = {("GET", "info"): self._info, ("GET", "revision"): self._info, ("GET", "refs"): self._refs,
                       ("GET", "tree"): self._tree, ("POST", "preupload"): self._preupload,
                       ("POST", "commit"): self._commit, ("POST", "tag"): self._create_tag,
                       ("DELETE", "tag"): self._delete_tag}.get((request.method, action))
            write = request.method != "GET"
            with self._lock:
                repo = self.repos.get(repo_id)
            if handler is None:
                return self._begin(action, write=write) or self._done(
                    _error(404, f"this test hub does not implement {request.method} {action}"))
            if err := self._begin(action if action != "revision" else "info", write=write, repo=repo,
                                  repo_id=repo_id):
                return err
            if repo is None:
                return self._done(_error(404, "Repository not found", "RepoNotFound"))
            with self._lock:
                return self._done(handler(repo, args))

        @app.route("/<namespace>/<name>/resolve/<revision>/<path:filename>", methods=["GET"])
        def resolve(namespace: str, name: str, revision: str, filename: str):
            repo_id = f"{namespace}/{name}"
            with self._lock:
                repo = self.repos.get(repo_id)
            if err := self._begin("resolve", write=False, repo=repo, repo_id=repo_id, file=filename):
                return err
            if repo is None:
                return self._done(_error(404, "Repository not found", "RepoNotFound"))
            with self._lock:
                oid = repo.resolve(revision)
                if oid is None:
                    return self._done(_error(404, f"Invalid rev id: {revision}", "RevisionNotFound"))
                data = repo.commits[oid].files.get(filename)
            if data is None:
                resp = _error(404, f"{filename} does not exist at {revision}", "EntryNotFound")
                resp.headers["X-Repo-Commit"] = oid
                return self._done(resp)
            resp = Response(data, mimetype="application/octet-stream")
            resp.headers["X-Repo-Commit"] = oid
            resp.headers["ETag"] = f'"{git_blob_sha(data)}"'
            return self._done(resp)

        return app

    # --- /api/models/{repo}/... handlers (called with the lock held) ---------------------------------------------

    def _info(self, repo: Repo, args: list[str]) -> Response:
        revision = args[0] if args else "main"
        oid = repo.resolve(revision)
        if oid is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        commit = repo.commits[oid]
        return jsonify({"_id": hashlib.md5(repo.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
                        "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                        "sha": oid, "private": repo.private, "disabled": False, "gated": False,
                        "lastModified": commit.date, "createdAt": repo.created_at, "tags": [],
                        "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _refs(self, repo: Repo, args: list[str]) -> Response:
        return jsonify({
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()],
            "converts": [],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": v["oid"]} for t, v in repo.tags.items()],
            "pullRequests": [],
        })

    def _tree(self, repo: Repo, args: list[str]) -> Response:
        if not args:
            return _error(400, "tree needs a revision")
        revision, prefix = args[0], "/".join(args[1:]).strip("/")
        oid = repo.resolve(revision)
        if oid is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        recursive = request.args.get("recursive", "false").lower() in ("1", "true")
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(repo.commits[oid].files.items()):
            if not path.startswith(base):
                continue
            rel_parts = path[len(base):].split("/")
            for depth in range(1, len(rel_parts)):  # folders on the way to the file
                folder = base + "/".join(rel_parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(
                        folder.encode(), usedforsecurity=False).hexdigest(), "size": 0, "path": folder})
            if recursive or len(rel_parts) == 1:
                entries[path] = self._file_entry(path, data)
        if prefix and not entries:
            return _error(404, f"{prefix} does not exist at {revision}", "EntryNotFound")
        return jsonify(list(entries.values()))

    def _file_entry(self, path: str, data: bytes) -> dict:
        if not path.endswith(self.lfs_suffixes):  # endswith(()) is False: no LFS by default
            return {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
        pointer = lfs_pointer(data)
        return {"type": "file", "oid": git_blob_sha(pointer), "size": len(data), "path": path,
                "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}}

    def _preupload(self, repo: Repo, args: list[str]) -> Response:
        body = request.get_json(force=True, silent=True) or {}
        files = body.get("files") or []
        g.entry["files"] = [f.get("path") for f in files]
        revision = args[0] if args else "main"
        oid = repo.resolve(revision)
        if oid is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        current = repo.commits[oid].files
        return jsonify({"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha(current[f["path"]]) if f["path"] in current else None}
            for f in files]})

    def _commit(self, repo: Repo, args: list[str]) -> Response:
        revision = args[0] if args else "main"
        if request.args.get("create_pr"):
            return _error(400, "this test hub does not implement pull requests")
        if revision not in repo.branches:
            return _error(400, f"can only commit to a branch, {revision!r} is not one", "RevisionNotFound")
        try:
            items = [json.loads(line) for line in request.get_data().decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(400, f"commit payload is not NDJSON: {exc}")
        if not items or items[0].get("key") != "header":
            return _error(400, "the first NDJSON line of a commit must be the header")
        header = items[0]["value"]
        head = repo.branches[revision]
        parent_commit = header.get("parentCommit")
        if parent_commit and not head.startswith(parent_commit):
            return _error(412, f"parentCommit {parent_commit} is not the head of {revision} ({head})")
        tree = dict(repo.commits[head].files)
        sent: dict[str, bytes] = {}
        deleted: list[str] = []
        for item in items[1:]:
            key, value = item.get("key"), item.get("value") or {}
            if key == "file":
                if value.get("encoding") != "base64":
                    return _error(400, f"unsupported file encoding {value.get('encoding')!r}")
                sent[value["path"]] = tree[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in tree:
                    return _error(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                del tree[value["path"]]
                deleted.append(value["path"])
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for path in [p for p in tree if p.startswith(folder)]:
                    del tree[path]
                    deleted.append(path)
            else:  # lfsFile: the preupload answer says "regular" for every file, so LFS never happens here
                return _error(400, f"this test hub does not implement commit operation {key!r}")
        commit = self._new_commit(repo, head, header.get("summary", ""), header.get("description", ""), tree)
        repo.branches[revision] = commit.oid
        self.commits.append({"repo_id": repo.repo_id, "oid": commit.oid, "parent": head, "revision": revision,
                             "summary": commit.summary, "description": commit.description, "files": sent,
                             "deleted": deleted})
        g.entry["files"] = sorted(sent)
        return jsonify({"success": True, "commitOid": commit.oid, "commitMessage": commit.summary,
                        "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}", "hookOutput": ""})

    def _create_tag(self, repo: Repo, args: list[str]) -> Response:
        body = request.get_json(force=True, silent=True) or {}
        revision, tag = (args[0] if args else "main"), body.get("tag") or ""
        oid = repo.resolve(revision)
        if oid is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if not tag:
            return _error(400, "tag name is missing")
        if tag in repo.tags or tag in repo.branches:
            return _error(409, f"Tag {tag} already exists")
        repo.tags[tag] = {"oid": oid, "message": body.get("message")}
        g.entry.update(tag=tag, target=oid)
        return jsonify({})

    def _delete_tag(self, repo: Repo, args: list[str]) -> Response:
        tag = "/".join(args)
        if repo.tags.pop(tag, None) is None:
            return _error(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        return jsonify({})
