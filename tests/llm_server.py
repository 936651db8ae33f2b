"""A local OpenAI-compatible chat server on 127.0.0.1 for the endpoint tests (the `server` fixture)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def _facts_reply(body: dict) -> str:
    """Facts of the numbered sentences of the prompt: split on ' and ', none for exclamations, prose around."""
    prompt = body["messages"][-1]["content"]
    if "Sentences:\n" not in prompt:
        return "ok"
    numbered = prompt.rsplit("Sentences:\n", 1)[1].split("\nFacts:")[0]
    lines = ["Sure! Here are the atomic facts:", ""]
    for m in re.finditer(r"^\[(\d+)\] (.*)$", numbered, re.MULTILINE):
        if not m.group(2).endswith("!"):
            lines += [f"- [{m.group(1)}] {part.strip(' .')}." for part in m.group(2).split(" and ")]
    return "\n".join(lines + ["", "I hope this helps."])


class _Handler(BaseHTTPRequestHandler):
    """POST /v1/chat/completions doing what the server's script says, one action per request."""

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with srv.lock:
            srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            action = srv.script.pop(0) if srv.script else "ok"
        if action == "hang":
            srv.release.wait(5)
            return
        status, headers, payload = self._answer(action, body)
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            pass

    def _answer(self, action: str, body: dict) -> tuple[int, dict, bytes]:
        if self.path != "/v1/chat/completions":
            return 404, {}, b'{"error": {"message": "no such route"}}'
        if action == "429":
            return 429, {"Retry-After": self.server.retry_after}, b'{"error": {"message": "slow down"}}'
        if action == "500":
            return 500, {}, b"internal error"
        if action == "400":
            return 400, {}, b'{"error": {"message": "model test-model does not exist"}}'
        if action == "broken":
            return 200, {"Content-Type": "application/json"}, b'{"choices": [ {"mess'
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": self.server.reply_fn(body)}}]}
        return 200, {"Content-Type": "application/json"}, json.dumps(reply).encode()

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture()
def server():
    """A local OpenAI-compatible server on a free port; tests set its script, reply_fn and retry_after."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads, httpd.block_on_close = True, False
    httpd.lock, httpd.release = threading.Lock(), threading.Event()
    httpd.requests, httpd.script, httpd.reply_fn, httpd.retry_after = [], [], _facts_reply, "0"
    httpd.base_url = f"http://127.0.0.1:{httpd.server_port}/v1"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()
