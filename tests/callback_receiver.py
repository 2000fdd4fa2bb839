"""A real HTTP receiver of terminal callbacks, for the tests that deliver them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support import free_port


@dataclass(frozen=True)
class ReceivedPost:
    path: str
    host: str | None
    body: bytes
    signature: str | None

    @property
    def data(self) -> Any:
        return json.loads(self.body)


class CallbackReceiver:
    """Records every POST it answers 200 to; with `fail_first`, answers 500 to the first POST
    of each request id (so a delivery must be retried)."""

    def __init__(self, fail_first: bool = False) -> None:
        self.posts: list[ReceivedPost] = []
        self.failed_once: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request_id = json.loads(body).get("id")
                if fail_first and request_id not in receiver.failed_once:
                    receiver.failed_once.add(request_id)
                    self.send_response(500)
                else:
                    receiver.posts.append(ReceivedPost(
                        self.path, self.headers.get("Host"), body,
                        self.headers.get("X-Hybrid-Router-Signature")))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, tag: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{tag}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def callback_receiver(fail_first: bool = False) -> Iterator[CallbackReceiver]:
    receiver = CallbackReceiver(fail_first)
    try:
        yield receiver
    finally:
        receiver.close()
