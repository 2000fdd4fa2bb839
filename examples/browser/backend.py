"""A web app's backend stand-in for the browser example: it holds the router's API key.

The page (index.html, app.js) asks this server to submit a prompt; the server submits it to the
router with its API key (``POST /v1/requests``) and hands the page only the request's signed,
read-only ``stream_url``. The page then follows the tokens straight from the router with
``EventSource``: the key never reaches the browser, and no token passes through this server.

    python examples/browser/backend.py --router-url http://127.0.0.1:8000 --api-key KEY --port 8080

The router needs ``ROUTER_STREAM_URL_SECRETS`` (stream URLs on) and this page's origin in
``ROUTER_CORS_ORIGINS`` (here ``http://127.0.0.1:8080``). Where browsers reach the router at
another address than this server does, set ``ROUTER_PUBLIC_BASE_URL`` on the router: its URLs
are then absolute under it. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8")}


def make_handler(router_url: str, api_key: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            entry = STATIC.get(self.path.split("?")[0])
            if entry is None:
                self._send(404, b"not found", "text/plain")
                return
            name, content_type = entry
            self._send(200, (HERE / name).read_bytes(), content_type)

        def do_POST(self) -> None:
            if self.path != "/api/ask":
                self._send(404, b"not found", "text/plain")
                return
            try:
                length = int(self.headers.get("content-length") or 0)
                prompt = str(json.loads(self.rfile.read(length) or b"{}").get("prompt") or "")
            except ValueError:
                self._json(400, {"error": "send JSON {\"prompt\": \"...\"}"})
                return
            if not prompt.strip():
                self._json(400, {"error": "the prompt is empty"})
                return
            body = json.dumps({"messages": [{"role": "user", "content": prompt}],
                               "priority": "high"}).encode()
            request = urllib.request.Request(
                f"{router_url}/v1/requests", data=body, method="POST",
                headers={"Content-Type": "application/json",
                         "Authorization": f"Bearer {api_key}"})
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    accepted = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                self._json(502, {"error": f"the router answered {exc.code}: "
                                          f"{exc.read().decode(errors='replace')[:500]}"})
                return
            except OSError as exc:
                self._json(502, {"error": f"the router is unreachable: {exc}"})
                return
            if not accepted.get("stream_url"):
                self._json(500, {"error": "the router gives no stream_url: set "
                                          "ROUTER_STREAM_URL_SECRETS"})
                return
            # Only what the page needs: the id and the read-only URL, never the key. The router
            # gives it relative to itself unless ROUTER_PUBLIC_BASE_URL is set: made absolute
            # here, against the router's address (the page is on another origin).
            absolute = urllib.parse.urljoin(f"{router_url}/", accepted["stream_url"])
            self._json(200, {"id": accepted["id"], "stream_url": absolute})

        def _json(self, status: int, data: dict[str, object]) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"backend: {format % args}\n")

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router-url", default=os.environ.get("ROUTER_URL",
                                                               "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("ROUTER_API_KEY", ""),
                        help="the router API key (default: $ROUTER_API_KEY)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port),
                                 make_handler(args.router_url.rstrip("/"), args.api_key))
    print(f"example page on http://{args.host}:{server.server_port}/ "
          f"(router {args.router_url})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
