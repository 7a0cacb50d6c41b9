"""A local stand-in for the Hugging Face hub's HTTP API, enough for ``HfApi.create_repo``
and ``HfApi.upload_folder``: the real huggingface_hub client talks to it over HTTP on
127.0.0.1 (``HF_ENDPOINT``), so the push path is tested end to end without the network.

It answers "regular" to every pre-upload question, so files come inline (base64) in the
commit's NDJSON body rather than through LFS or Xet; it writes them under ``root/REPO/``
and records every request in ``requests``.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubStandIn:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str]] = []
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _reply(self, status: int, body: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                hub.requests.append(("POST", self.path))
                body = self._body()
                parts = self.path.split("?")[0].strip("/").split("/")
                if self.headers.get("Authorization") != "Bearer hf_standin":
                    return self._reply(401, {"error": "Invalid credentials"})
                if parts[:2] == ["api", "repos"] and parts[2] == "create":
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    hub.repos.setdefault(repo, req)
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo}"})
                if parts == ["api", "validate-yaml"]:  # the model card's front matter
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
                    repo = f"{parts[2]}/{parts[3]}"
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    commit = {"repo": repo, "header": lines[0]["value"], "files": []}
                    for line in lines[1:]:
                        if line["key"] != "file":
                            return self._reply(400, {"error": f"stand-in does not handle {line['key']}"})
                        dest = hub.root / repo / line["value"]["path"]
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(base64.b64decode(line["value"]["content"]))
                        commit["files"].append(line["value"]["path"])
                    hub.commits.append(commit)
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})
                return self._reply(404, {"error": f"stand-in has no {self.path}"})

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append(("GET", self.path))
                return self._reply(404, {"error": f"stand-in has no {self.path}"})

        return Handler
