"""The browser example (examples/browser) in a real headless Chromium: the page submits through
its backend stand-in (which holds the API key), follows the tokens from the router with
EventSource over the signed stream URL (cross-origin, CORS), and shows the whole text equal to
the record's result, also when the test cuts the network between browser and router mid-stream
and restores it (a TCP proxy in between): the page resumes after its last event."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from tests.browser import CuttableProxy, chromium
from tests.support import REPO_ROOT, ManagedProcess, Stack, free_port, wait_until

KEY = "web-backend-key-0123456789"
SECRET = "stream-url-secret-0123456789"


@pytest.fixture
def deployment(redis_base_url: str, sim_url: str, tmp_path: Any
               ) -> Iterator[tuple[str, str, CuttableProxy, Settings]]:
    """Router (API + stream worker) behind a cuttable proxy, and the example's backend."""
    backend_port = free_port()
    origin = f"http://127.0.0.1:{backend_port}"
    settings = Settings(redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
                        api_keys={KEY: "webapp"}, upstream_base_url=sim_url,
                        upstream_api_key="sk-sim", log_format="json", _env_file=None,
                        stream_url_secrets=[SECRET], cors_origins=[origin])
    with Stack(settings) as stack:
        api_url = stack.start_api()
        stack.start_worker("stream")
        proxy = CuttableProxy(int(api_url.rsplit(":", 1)[1]))
        backend = ManagedProcess("backend", [
            sys.executable, str(REPO_ROOT / "examples" / "browser" / "backend.py"),
            "--router-url", f"http://127.0.0.1:{proxy.port}", "--api-key", KEY,
            "--port", str(backend_port)], {}, tmp_path / "backend.log").start()
        try:
            wait_until(lambda: httpx.get(f"{origin}/", timeout=1).status_code == 200, 15,
                       message="the example's backend")
            yield origin, api_url, proxy, settings
        finally:
            backend.stop()
            proxy.close()


def page_state(driver: Any) -> dict[str, Any]:
    state: dict[str, Any] = driver.execute_script(
        "const s = document.getElementById('status');"
        "return {text: document.getElementById('out').textContent, state: s.dataset.state,"
        " reconnects: Number(s.dataset.reconnects), lastSeq: Number(s.dataset.lastSeq),"
        " id: s.dataset.requestId || null, line: s.textContent};")
    return state


def ask(driver: Any, prompt: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.find_element(By.ID, "send").click()


def record_of(api_url: str, request_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{api_url}/v1/requests/{request_id}",
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data


def test_the_page_shows_the_whole_text_and_resumes_after_the_network_drops(
    deployment: tuple[str, str, CuttableProxy, Settings],
) -> None:
    origin, api_url, proxy, settings = deployment
    with chromium() as driver:
        driver.get(f"{origin}/")

        # 1. A plain run: the page's text is the record's result.
        ask(driver, "Tell me a story [[sim:tokens=40,tps=200]]")
        done = wait_until(lambda: (s := page_state(driver))["state"] in ("done", "failed") and s,
                          30, 0.1, message="the page to finish the first stream")
        assert done["state"] == "done", done
        record = record_of(api_url, done["id"])
        assert record["status"] == "completed"
        assert done["text"] == record["result"]["content"] and len(done["text"]) > 40
        assert done["reconnects"] == 0

        # 2. The network drops mid-stream and comes back while the router goes on streaming.
        ask(driver, "Tell me a longer story [[sim:tokens=120,tps=25]]")
        started = wait_until(lambda: (s := page_state(driver))["text"] and s["id"] != done["id"]
                             and s, 30, 0.05, message="the first tokens of the second stream")
        proxy.cut()
        cut_at = wait_until(lambda: (s := page_state(driver))["reconnects"] >= 1 and s, 15, 0.05,
                            message="the page to see the connection drop")
        assert cut_at["state"] == "reconnecting"
        request_id = started["id"]
        log = redis.Redis.from_url(settings.redis_url)
        try:
            # The router keeps streaming meanwhile: wait until it is 10 events past the page.
            wait_until(lambda: log.xlen(Keys(settings.key_prefix).events(request_id))
                       > cut_at["lastSeq"] + 10, 20, 0.05, message="the stream to go on")
        finally:
            log.close()
        assert page_state(driver)["lastSeq"] == cut_at["lastSeq"]  # nothing got through
        proxy.restore()
        final = wait_until(lambda: (s := page_state(driver))["state"] in ("done", "failed") and s,
                           60, 0.1, message="the page to resume and finish")
        assert final["state"] == "done", final
        record = record_of(api_url, request_id)
        assert record["status"] == "completed"
        assert final["text"] == record["result"]["content"]
        assert final["reconnects"] >= 1
        assert proxy.connections >= 2  # it did reconnect through the proxy
