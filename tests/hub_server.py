"""A loopback model hub for tests: serves local model folders under repo ids like ``org/name`` over plain HTTP.

Stdlib only (``http.server`` + ``threading``). Each repo has one fixed 40-hex commit sha (``LoopbackHub.sha``);
the revisions ``main``, ``master`` and that sha all resolve to it. Every request is recorded in ``requests`` as
``"METHOD /path?query"`` so tests can assert what was fetched.

Hugging Face (``huggingface_hub.snapshot_download`` / ``hf_hub_download`` / ``HfApi.model_info``, which is what
ms-swift's ``HFHub.download_model`` and transformers' ``from_pretrained`` use), with ``HF_ENDPOINT=<url>``:

- ``GET /api/models/{repo}[/revision/{rev}]``: model info with ``sha`` and ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=``: ``[{"type", "oid", "size", "path"}]``;
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (the git blob sha1) and
  ``Content-Length``; never an ``X-Xet-Hash`` header nor a ``xetHash`` field, so the client uses plain HTTP;
- 404s carry the ``X-Error-Code`` (``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``) the client expects.

ModelScope (``modelscope.snapshot_download`` as ms-swift's ``MSHub.download_model`` calls it; since modelscope 1.38
it delegates to the ``modelscope_hub`` package), with ``MODELSCOPE_ENDPOINT=<url>``:

- ``GET /api/v1/models/{repo}/repo/files?Revision=&Recursive=[&Root=]``:
  ``{"Code": 200, "Data": {"Files": [{"Name", "Path", "Type", "Size", "Sha256", "Revision"}]}, "Success": true}``;
- ``HEAD|GET /api/v1/models/{repo}/repo?Revision=&FilePath=``: the file;
- ``GET /api/v1/models/{repo}``: repo info (only asked for when a ``Root``-scoped listing 404s);
- ``GET /api/v1/repos/internalAccelerationInfo`` (Aliyun region probe): 404; ``env()`` also turns the probe off.

It caches to ``$MODELSCOPE_CACHE/models/{org}--{name}/snapshots/{revision as asked, e.g. master}/``; no commit sha
is recorded on disk. (``MODELSCOPE_DOMAIN`` is not used: modelscope's own ``get_endpoint`` always prepends https.)

Verified with huggingface_hub 1.33.0, transformers 5.19.0, modelscope 1.40.2 (modelscope_hub 0.5.1), ms-swift 4.6.0.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


class LoopbackHub:
    """Context manager running the hub in a daemon thread on ``127.0.0.1`` (a free port)."""

    def __init__(self, repos: dict[str, Path | str]) -> None:
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sha(self, repo_id: str) -> str:
        """The fixed commit sha of a repo (sha1 of its id)."""
        return hashlib.sha1(f"loopback-hub:{repo_id}".encode()).hexdigest()

    def files(self, repo_id: str) -> dict[str, Path]:
        """Repo path (posix, relative) -> local file, hidden files and folders left out."""
        root = self.repos[repo_id]
        rels = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        return {rel: p for rel, p in rels.items() if not any(part.startswith(".") for part in rel.split("/"))}

    def fetched(self, marker: str = "") -> list[str]:
        """Recorded requests that contain ``marker`` (e.g. ``"/resolve/"`` or ``"FilePath="``)."""
        with self._lock:
            return [r for r in self.requests if marker in r]

    def env(self, cache: Path | str) -> dict[str, str]:
        """Environment for a process that should use this hub, with all caches and configs under ``cache``."""
        cache = Path(cache)
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HOME": str(cache / "hf"),
            "HF_HUB_CACHE": str(cache / "hf" / "hub"),  # would override HF_HOME if inherited
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "MODELSCOPE_ENDPOINT": self.url,  # modelscope_hub; MODELSCOPE_DOMAIN is deprecated and https-only
            "MODELSCOPE_CACHE": str(cache / "modelscope"),
            "MODELSCOPE_HOME": str(cache / "modelscope_home"),  # credentials/config, instead of ~/.modelscope
            "MODELSCOPE_API_TOKEN": "",  # explicit "no token": swift's MSHub.try_login skips the login call
            "MODELSCOPE_DOWNLOAD_INTRA_CLOUD": "false",  # no Aliyun region probe
        }

    # --- request handling -------------------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        with self._lock:
            self.requests.append(f"{req.command} {req.path}")
        split = urlsplit(req.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        parts = [unquote(p) for p in split.path.split("/") if p]
        try:
            if parts[:3] == ["api", "v1", "models"] and len(parts) >= 5:
                code, data, headers = self._modelscope("/".join(parts[3:5]), parts[5:], query)
            elif parts[:2] == ["api", "models"] and len(parts) >= 4:
                code, data, headers = self._hf_api("/".join(parts[2:4]), parts[4:], query)
            elif len(parts) >= 5 and parts[2] == "resolve":  # {org}/{name}/resolve/{rev}/{path}
                sha = self._check("/".join(parts[:2]), parts[3])
                local = self._file("/".join(parts[:2]), sha, "/".join(parts[4:]))
                etag = f'"{_blob_sha1(local)}"'
                code, data, headers = 200, local.read_bytes(), {"X-Repo-Commit": sha, "ETag": etag, **_OCTETS}
            else:
                code, data, headers = 404, b'{"error": "not served"}', {}
        except LookupError as err:  # unknown repo, revision or file
            error_code, sha = err.args
            headers = {"X-Error-Code": error_code, **({"X-Repo-Commit": sha} if sha else {})}
            message = {"error": error_code, "Code": 404, "Message": f"{error_code}: {req.path}", "Success": False}
            code, data = 404, json.dumps(message).encode()
        req.send_response(code)
        for key, value in {"Content-Type": "application/json", **headers, "Content-Length": str(len(data))}.items():
            req.send_header(key, value)
        req.end_headers()
        if body:
            req.wfile.write(data)

    def _check(self, repo_id: str, rev: str) -> str:
        if repo_id not in self.repos:
            raise LookupError("RepoNotFound", None)
        sha = self.sha(repo_id)
        if unquote(rev) not in ("main", "master", sha):
            raise LookupError("RevisionNotFound", None)
        return sha

    def _file(self, repo_id: str, sha: str, path: str) -> Path:
        local = self.files(repo_id).get(path)
        if local is None:
            raise LookupError("EntryNotFound", sha)
        return local

    def _listing(self, repo_id: str, sha: str, root: str, recursive: bool) -> dict[str, Path | None]:
        """Files (and, when not recursive, folders as ``None``) under ``root``."""
        root = root.strip("/")
        entries: dict[str, Path | None] = {}
        for path, local in self.files(repo_id).items():
            if root and not path.startswith(root + "/"):
                continue
            below = path[len(root) :].lstrip("/")
            if recursive or "/" not in below:
                entries[path] = local
            else:
                entries[f"{root}/{below.split('/')[0]}".lstrip("/")] = None
        if root and not entries:
            raise LookupError("EntryNotFound", sha)
        return entries

    def _hf_api(self, repo_id: str, rest: list[str], query: dict[str, str]) -> _Reply:
        if rest[:1] == ["tree"] and len(rest) >= 2:
            sha = self._check(repo_id, rest[1])
            recursive = query.get("recursive", "false").lower() == "true"
            tree = [
                {"type": "directory", "oid": _sha1(p.encode()), "size": 0, "path": p}
                if local is None
                else {"type": "file", "oid": _blob_sha1(local), "size": local.stat().st_size, "path": p}
                for p, local in self._listing(repo_id, sha, "/".join(rest[2:]), recursive).items()
            ]
            return 200, json.dumps(tree).encode(), {"X-Repo-Commit": sha}
        if rest and (rest[0] != "revision" or len(rest) != 2):
            raise LookupError("EntryNotFound", None)
        sha = self._check(repo_id, rest[1] if rest else "main")
        siblings = [{"rfilename": p} for p in self.files(repo_id)]
        info = {"id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha, "private": False}
        return 200, json.dumps({**info, "gated": False, "disabled": False, "siblings": siblings}).encode(), {}

    def _modelscope(self, repo_id: str, rest: list[str], query: dict[str, str]) -> _Reply:
        sha = self._check(repo_id, query.get("Revision", "master"))
        if rest == ["repo", "files"]:
            recursive = query.get("Recursive", "True").lower() == "true"
            files = []
            for path, local in self._listing(repo_id, sha, query.get("Root", ""), recursive).items():
                data = local.read_bytes() if local else b""
                entry = {"Name": path.rsplit("/", 1)[-1], "Path": path, "Type": "blob" if local else "tree"}
                files.append({**entry, "Size": len(data), "Sha256": _sha256(data) if local else "", "Revision": sha})
            return 200, _ms_json({"Files": files}), {}
        if rest == ["repo"]:
            return 200, self._file(repo_id, sha, query.get("FilePath", "")).read_bytes(), _OCTETS
        if not rest:
            owner, name = repo_id.split("/")
            return 200, _ms_json({"Path": owner, "Name": name, "Revision": "master", "CommitId": sha}), {}
        raise LookupError("EntryNotFound", sha)


_Reply = tuple[int, bytes, dict[str, str]]
_OCTETS = {"Content-Type": "application/octet-stream"}


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _blob_sha1(path: Path) -> str:
    """The git blob id of a file, which the Hub reports as ``oid`` and ``ETag`` for non-LFS files."""
    data = path.read_bytes()
    return _sha1(b"blob %d\0" % len(data) + data)


def _ms_json(data: object) -> bytes:
    return json.dumps({"Code": 200, "Data": data, "Message": "success", "Success": True}).encode()
