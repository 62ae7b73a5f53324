"""A loopback, in-memory stand-in for the Hugging Face Hub API, for push tests that never touch the internet.

No maintained local Hub server exists on PyPI, so this implements only the routes that `huggingface_hub` 2.4 calls
for `HfApi.create_repo`, `create_branch`, `upload_folder` (both its xet pipeline and its single-commit path when
`hf_xet` is disabled), `create_pull_request` and `ModelCard.validate`, with the request and response shapes read
from `huggingface_hub/hf_api.py`, `_commit_api.py` and `_upload_pipeline.py`:

| route                                         | client call                        | answer                       |
|-----------------------------------------------|------------------------------------|------------------------------|
| `POST /api/repos/create`                      | `create_repo`                      | `url`; 409 + `url` if exists |
| `GET /api/models/{repo}[/revision/{rev}]`     | `repo_info`: upload with nothing   | `id`, `sha`, `siblings`      |
|                                               | changed; 401 on create (exist_ok)  |                              |
| `POST /api/models/{repo}/branch/{branch}`     | `create_branch`                    | `{}`; 409 if it exists       |
| `POST /api/models/{repo}/preupload/{rev}`     | `_fetch_upload_modes`              | each file `regular` + `oid`  |
| `POST /api/models/{repo}/commit/{rev}`        | `_send_commit` (NDJSON, base64)    | `commitUrl`, `commitOid`     |
| `POST /api/models/{repo}/discussions`         | `create_pull_request` (xet path)   | `num`                        |
| `GET /api/models/{repo}/discussions/{num}`    | `get_discussion_details`           | discussion details           |
| `POST /api/validate-yaml`                     | `upload_folder` with a README.md,  | `errors`, `warnings`         |
|                                               | `ModelCard.validate`               |                              |

On the single-commit path `create_pr=True` is a `?create_pr=1` on the preupload and commit calls instead of the two
discussion routes. Answering every file with `uploadMode: "regular"` makes the client send contents inline in the
commit, so no LFS or xet storage is needed. The `oid` of a file already on the branch is its git blob SHA-1, which
lets the client skip unchanged files exactly as it does against the real Hub. Every other route answers 501 and is
recorded in `unknown_routes`, so a client change shows up as a clear test failure rather than a confusing 404.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

import yaml


logger = logging.getLogger(__name__)

TEST_TOKEN = "hf_rmtkd_loopback_test_token"
TEST_USER = "rmtkd-tester"
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("GET", re.compile(rf"^/api/models/{_REPO}$"), "repo_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$"), "repo_info"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/discussions$"), "create_discussion"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/discussions/(?P<num>\d+)$"), "discussion_details"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which is the `oid` the Hub reports for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Branch:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.commits[-1]["oid"]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, Branch] = field(default_factory=dict)
    discussions: dict[int, dict[str, Any]] = field(default_factory=dict)


class HubError(Exception):
    """An HTTP error answer: status, JSON `error` message and the Hub's `X-Error-Code` header when it sets one."""

    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


class LocalHub:
    """A Hub API on `127.0.0.1` (random free port) in a background thread; use it as a context manager.

    Args:
        token (`str`, *optional*, defaults to `TEST_TOKEN`):
            The only bearer token accepted; any other (or none) gets 401 with a JSON error, as the Hub answers.
        user (`str`, *optional*, defaults to `TEST_USER`):
            The namespace of a repo created without an organization.

    Example:

    ```python
    >>> with LocalHub() as hub:
    ...     HfApi(endpoint=hub.url, token=TEST_TOKEN).create_repo("rmtkd-tester/tiny")
    ...     hub.files("rmtkd-tester/tiny")
    {}
    ```
    """

    def __init__(self, token: str = TEST_TOKEN, user: str = TEST_USER) -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown_routes: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "LocalHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-hub", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ inspection for tests

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at the head of `revision`, path -> bytes."""
        with self._lock:
            return dict(self.repos[repo_id].branches[revision].files)

    def commits(self, repo_id: str, revision: str = "main") -> list[dict[str, Any]]:
        """The commits of `revision`, oldest first; the first is the empty commit made by `create_repo`."""
        with self._lock:
            return list(self.repos[repo_id].branches[revision].commits)

    # ------------------------------------------------------------------ dispatch

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        path, _, query = raw_path.partition("?")
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        with self._lock:
            self.requests.append((method, path))
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                break
        else:
            route = f"{method} {path}"
            logger.error("loopback Hub: no route for %s", route)
            with self._lock:
                self.unknown_routes.append(route)
            return _json(501, {"error": f"The loopback Hub does not implement {route}."})
        try:
            self._authenticate(name, headers.get("Authorization"))
            args = {key: unquote(value) for key, value in match.groupdict().items()}
            with self._lock:
                return getattr(self, f"_{name}")(body=body, params=params, **args)
        except HubError as err:
            extra = {"X-Error-Message": err.message}
            if err.error_code is not None:
                extra["X-Error-Code"] = err.error_code
            return _json(err.status, {"error": err.message}, extra)

    def _authenticate(self, route: str, authorization: str | None) -> None:
        # The Hub validates YAML for anonymous callers (`ModelCard.validate` sends no token) but rejects a bad one.
        if authorization is None:
            if route == "validate_yaml":
                return
            raise HubError(401, "Authorization header is required for this loopback Hub.")
        if authorization != f"Bearer {self.token}":
            raise HubError(401, _INVALID_CREDENTIALS)

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found.", "RepoNotFound")
        return self.repos[repo_id]

    def _branch(self, repo_id: str, revision: str) -> Branch:
        repo = self._repo(repo_id)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.branches[revision]

    def _commit_url(self, repo_id: str, oid: str) -> str:
        return f"{self.url}/{repo_id}/commit/{oid}"

    # ------------------------------------------------------------------ routes

    def _create_repo(self, body: bytes, params: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, f"The loopback Hub only hosts model repos, got type {payload['type']!r}.")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            # The Hub answers 409 with the URL; `create_repo(exist_ok=True)` reads it from this body.
            return _json(409, {"error": "You already created this model repo", "url": url})
        main = Branch()
        main.commits.append({"oid": hashlib.sha1(repo_id.encode()).hexdigest(), "summary": "initial commit"})
        self.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private", branches={"main": main})
        return _json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _repo_info(self, body: bytes, params: dict[str, str], repo: str, rev: str = "main") -> tuple:
        branch = self._branch(repo, rev)
        siblings = [{"rfilename": path} for path in sorted(branch.files)]
        return _json(200, {"id": repo, "sha": branch.head, "private": self.repos[repo].private, "siblings": siblings})

    def _create_branch(self, body: bytes, params: dict[str, str], repo: str, rev: str) -> tuple:
        repository = self._repo(repo)
        if rev in repository.branches:
            raise HubError(409, f"Reference {rev} already exists.")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        source = self._branch(repo, start)
        repository.branches[rev] = Branch(dict(source.files), list(source.commits))
        return _json(200, {})

    def _preupload(self, body: bytes, params: dict[str, str], repo: str, rev: str) -> tuple:
        branch = self._branch(repo, rev)
        answers = []
        for entry in json.loads(body)["files"]:
            stored = branch.files.get(entry["path"])
            answers.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": None if stored is None else git_blob_sha1(stored),
                }
            )
        return _json(200, {"files": answers})

    def _commit(self, body: bytes, params: dict[str, str], repo: str, rev: str) -> tuple:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit body must start with a `header` line.")
        pull_request = None
        if params.get("create_pr") == "1":
            pull_request = self._open_pull_request(repo, lines[0]["value"]["summary"], base=rev)
            rev = f"refs/pr/{pull_request['num']}"
        branch = self._branch(repo, rev)
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                raise HubError(400, f"The loopback Hub takes files inline as base64 only, got {line['key']!r}.")
            branch.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        digest = hashlib.sha1(branch.head.encode())
        digest.update(json.dumps(lines[0]["value"], sort_keys=True).encode())
        for path in sorted(branch.files):
            digest.update(f"{path}\0{git_blob_sha1(branch.files[path])}\n".encode())
        oid = digest.hexdigest()
        branch.commits.append({"oid": oid, "summary": lines[0]["value"]["summary"]})
        answer = {"success": True, "commitOid": oid, "commitUrl": self._commit_url(repo, oid)}
        if pull_request is not None:
            answer["pullRequestUrl"] = pull_request["url"]
        return _json(200, answer)

    def _open_pull_request(self, repo: str, title: str, base: str = "main") -> dict[str, Any]:
        repository = self._repo(repo)
        source = self._branch(repo, base)
        num = len(repository.discussions) + 1
        repository.branches[f"refs/pr/{num}"] = Branch(dict(source.files), list(source.commits))
        repository.discussions[num] = {
            "num": num,
            "title": title,
            "isPullRequest": True,
            "status": "draft",
            "base": f"refs/heads/{base}",
            "createdAt": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "url": f"{self.url}/{repo}/discussions/{num}",
        }
        return repository.discussions[num]

    def _create_discussion(self, body: bytes, params: dict[str, str], repo: str) -> tuple:
        payload = json.loads(body)
        if not payload.get("pullRequest"):
            raise HubError(400, "The loopback Hub only opens pull requests, not plain discussions.")
        pull_request = self._open_pull_request(repo, payload["title"])
        return _json(200, {"num": pull_request["num"], "url": pull_request["url"]})

    def _discussion_details(self, body: bytes, params: dict[str, str], repo: str, num: str) -> tuple:
        repository = self._repo(repo)
        if int(num) not in repository.discussions:
            raise HubError(404, f"Discussion {num} not found.")
        pull_request = repository.discussions[int(num)]
        return _json(
            200,
            {
                "num": pull_request["num"],
                "title": pull_request["title"],
                "status": pull_request["status"],
                "isPullRequest": True,
                "createdAt": pull_request["createdAt"],
                "author": {"name": self.user},
                "repo": {"name": repo, "type": "model"},
                "events": [],
                "changes": {"base": pull_request["base"]},
                "filesWithConflicts": [],
                "diff": "",
            },
        )

    def _validate_yaml(self, body: bytes, params: dict[str, str]) -> tuple:
        # Checks what the Hub checks first: the front matter is a YAML mapping and its model-index is well formed.
        from huggingface_hub import ModelCardData

        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, flags=re.DOTALL)
        errors = []
        if match is None:
            errors.append({"message": "README.md has no YAML metadata block."})
        else:
            try:
                metadata = yaml.safe_load(match.group(1))
                if not isinstance(metadata, dict):
                    raise ValueError(f"metadata must be a mapping, got {type(metadata).__name__}")
                ModelCardData(**metadata)
            except (yaml.YAMLError, ValueError, TypeError) as err:
                errors.append({"message": f"Invalid metadata: {err}"})
        return _json(400 if errors else 200, {"errors": errors, "warnings": []})


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


def _make_handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                status, headers, payload = _json(411, {"error": "The loopback Hub needs a Content-Length."})
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, payload = hub.handle(self.command, self.path, self.headers, body)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("loopback Hub: " + format, *args)

    return Handler
