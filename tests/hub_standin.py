"""A local stand-in for the parts of the Hugging Face hub's HTTP API that `huggingface_hub` uses to
create a repository, commit files to it and download them again: enough to test `ftkit push` and hub
ids for `--adapter` / `--model` with no token and no network (point HF_ENDPOINT at it).

It answers every file as a "regular" (inline, base64) upload, which is what the hub does for small
files, so no LFS or Xet storage is involved. Requests it does not know are answered 404 and recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class Hub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.log: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.auth: list[str | None] = []
        self.cards_checked = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _sha(self, repo: dict) -> str:
        return hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in repo["files"].items())).encode()).hexdigest()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False):
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    return self.rfile.read(n)
                if self.headers.get("Transfer-Encoding") == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return b""

            def _route(self, method: str):
                path = unquote(urlparse(self.path).path)
                hub.log.append((method, path))
                hub.auth.append(self.headers.get("Authorization"))
                parts = path.strip("/").split("/")
                body = self._body() if method in ("POST", "PUT") else b""
                if path == "/api/repos/create" and method == "POST":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                    private = req.get("private", req.get("visibility") == "private")
                    hub.repos[repo_id] = {"private": bool(private), "files": {}, "commits": []}
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
                if path == "/api/validate-yaml" and method == "POST":  # the hub checks a README's metadata before a commit
                    import yaml

                    content = json.loads(body).get("content", "")
                    try:
                        meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                        errors = [] if isinstance(meta, dict) else [{"message": "metadata is not a mapping"}]
                    except yaml.YAMLError as e:
                        errors = [{"message": str(e)}]
                    hub.cards_checked += 1
                    return self._send(400 if errors else 200, {"errors": errors, "warnings": []})
                if path == "/api/whoami-v2":
                    return self._send(200, {"type": "user", "name": "user", "auth": {}})
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = f"{parts[2]}/{parts[3]}"
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._send(404, {"error": f"Repository {repo_id} not found"}, {"X-Error-Code": "RepoNotFound"})
                    rest = parts[4:]
                    if rest[:1] == ["preupload"] and method == "POST":
                        files = json.loads(body)["files"]
                        return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
                                                "commitOid": hub._sha(repo)})
                    if rest[:1] == ["commit"] and method == "POST":
                        header = None
                        for line in body.decode().splitlines():
                            if not line.strip():
                                continue
                            item = json.loads(line)
                            if item["key"] == "header":
                                header = item["value"]
                            elif item["key"] == "file":
                                v = item["value"]
                                repo["files"][v["path"]] = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                            elif item["key"] == "deletedFile":
                                repo["files"].pop(item["value"]["path"], None)
                            else:
                                return self._send(400, {"error": f"stand-in: unsupported commit operation {item['key']}"})
                        repo["commits"].append(header)
                        sha = hub._sha(repo)
                        return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                                "pullRequestUrl": None})
                    if method == "GET" and rest[:1] == ["tree"]:  # snapshot_download lists the files this way
                        return self._send(200, [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                                for f, d in sorted(repo["files"].items())])
                    if method == "GET" and (not rest or rest[0] == "revision"):
                        sha = hub._sha(repo)
                        return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo["private"],
                                                "siblings": [{"rfilename": f} for f in sorted(repo["files"])]})
                if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                    repo_id = f"{parts[0]}/{parts[1]}"
                    repo = hub.repos.get(repo_id)
                    name = "/".join(parts[4:])
                    if repo is None or name not in repo["files"]:
                        return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head=method == "HEAD")
                    data = repo["files"][name]
                    etag = hashlib.sha256(data).hexdigest()
                    return self._send(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": hub._sha(repo),
                                                  "Content-Type": "application/octet-stream"}, head=method == "HEAD")
                hub.unknown.append((method, path))
                return self._send(404, {"error": f"stand-in: no route for {method} {path}"})

            def do_GET(self):
                self._route("GET")

            def do_HEAD(self):
                self._route("HEAD")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

        return Handler
