"""A real HTTP receiver on 127.0.0.1 that verifies Standard Webhooks signatures with the
``standardwebhooks`` package (the receiver side of api/webhooks/), for the delivery tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.worker.services import free_port


class Receiver:
    """Answers 200 to a verified request, 401 to a bad signature, 500 to the first ``fail_first``
    tries of each message id. ``accepted`` holds each verified message answered 200 (id ->
    payload); ``accepted_counts`` how often each id was answered 200; ``tries`` every request's
    (message id, status). ``start`` / ``stop`` may be called repeatedly (the same port each time)."""

    def __init__(self, *, fail_first: int = 0, always_fail: bool = False, delay_s: float = 0.0) -> None:
        self.port = free_port()
        self.secrets: list[str] = []
        self.fail_first, self.always_fail, self.delay_s = fail_first, always_fail, delay_s
        self.accepted: dict[str, Any] = {}
        self.accepted_counts: Counter[str] = Counter()
        self.tries: list[tuple[str, int]] = []
        self.bad_signatures = 0
        self.hosts: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        time.sleep(self.delay_s)
        payload = None
        for secret in self.secrets:
            try:
                payload = Webhook(secret).verify(body, headers)
                break
            except WebhookVerificationError:
                continue
        message_id = headers.get("webhook-id", "")
        with self._lock:
            self.hosts.add(headers.get("host", ""))
            if payload is None:
                self.bad_signatures += 1
                status = 401
            else:
                earlier = sum(1 for mid, _ in self.tries if mid == message_id)
                status = 500 if self.always_fail or earlier < self.fail_first else 200
                if status == 200:
                    self.accepted[message_id] = payload
                    self.accepted_counts[message_id] += 1
            self.tries.append((message_id, status))
        return status

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver._answer({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
