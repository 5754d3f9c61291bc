"""An OpenAI-compatible server on loopback for the tests: scripted replies from the simulated expert.

`/v1/chat/completions` answers from `tagpr.expert.SimulatedExpert`, routed by the request's
`X-TagPR-Meta` header (role and question id); `/v1/embeddings` from the hashing embedder.
`faults` is a queue of failures served to the next requests in arrival order: "429" (with
Retry-After 0), "500", "timeout" (answers after `delay` seconds, past the client's timeout),
"malformed" (a body that is not JSON) and "no_choices" (JSON without a reply). `echo_prefix`: a
trailing assistant message is repeated in front of the reply, as llama.cpp's server does (vLLM does not).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tagpr.llm import HashingEmbedder, Request


class Server:
    def __init__(self, expert, faults=(), delay: float = 1.5, key: str | None = None, echo_prefix: bool = False):
        self.expert, self.faults, self.delay, self.key = expert, list(faults), delay, key
        self.echo_prefix = echo_prefix
        self.lock = threading.Lock()
        self.requests = 0
        self.served_faults: list[str] = []
        self.auth_seen: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body: bytes, headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    fault = outer.faults.pop(0) if outer.faults else None
                    if fault:
                        outer.served_faults.append(fault)
                    outer.auth_seen.add(self.headers.get("Authorization", ""))
                if fault == "429":
                    return self._send(429, b'{"error": "rate limited"}', [("Retry-After", "0")])
                if fault == "500":
                    return self._send(500, b'{"error": "server error"}')
                if fault == "malformed":
                    return self._send(200, b'{"choices": [{"message": ')
                if fault == "no_choices":
                    return self._send(200, b'{"choices": []}')
                if fault == "timeout":
                    time.sleep(outer.delay)
                if self.path.endswith("/embeddings"):
                    vecs = HashingEmbedder().embed(body["input"]).tolist()
                    out = {"data": [{"index": i, "embedding": v} for i, v in enumerate(vecs)]}
                else:
                    meta = json.loads(self.headers.get("X-TagPR-Meta", "{}"))
                    rep = outer.expert.chat([Request(body["messages"], meta)])[0]
                    if rep.error:
                        return self._send(400, json.dumps({"error": rep.error}).encode())
                    last = body["messages"][-1]
                    echo = last["content"] if outer.echo_prefix and last["role"] == "assistant" else ""
                    out = {"choices": [{"index": 0, "message": {"role": "assistant", "content": echo + rep.text}}]}
                try:
                    self._send(200, json.dumps(out).encode())
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
