"""``GET /ui``, the router's live page, in a real headless Chromium against a real deployment
(API, stream and batch workers, the simulator): with the admin key typed into the page, every
figure it shows equals ``GET /v1/stats`` (queues per lane and model, oldest age, the batch in
flight and its progress, the flush interval and its source, streams per worker, recent TTFT,
today's cost and savings), and the flush interval changed from the page is the one in force.

``HR_UI_SCREENSHOT=docs/ui.png pytest tests/test_ui.py`` also saves the page as a PNG."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hybrid_router.router.core import redis_plan
from hybrid_router.router.core.live_stats import SET_AT, SET_BY, live_plan
from hybrid_router.settings import Settings
from tests.browser import chromium
from tests.support import Stack, wait_until

ADMIN_KEY, USER_KEY = "admin-key-0123456789abcdef", "user-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER = {"Authorization": f"Bearer {USER_KEY}"}


@pytest.fixture
def deployment(redis_base_url: str, sim_url: str) -> Iterator[tuple[str, Settings]]:
    settings = Settings(redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
                        api_keys={ADMIN_KEY: "admin", USER_KEY: "acme"},
                        upstream_base_url=sim_url, upstream_api_key="sk-sim", log_format="json",
                        flush_interval_s=3600, batch_mode="native", _env_file=None)
    with Stack(settings) as stack:
        url = stack.start_api()
        stack.start_worker("stream")
        stack.start_worker("batch")
        yield url, settings


def submit(url: str, content: str, priority: str) -> str:
    resp = httpx.post(f"{url}/v1/requests", headers=USER, timeout=10, json={
        "messages": [{"role": "user", "content": content}], "priority": priority,
        "model": "gpt-4o-mini"})
    assert resp.status_code == 202, resp.text
    request_id: str = resp.json()["id"]
    return request_id


def status_of(url: str, request_id: str) -> str:
    status: str = httpx.get(f"{url}/v1/requests/{request_id}", headers=USER).json()["status"]
    return status


def stats(url: str) -> dict[str, Any]:
    resp = httpx.get(f"{url}/v1/stats", headers=ADMIN, timeout=10)
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data


def expected_figures(s: dict[str, Any]) -> dict[str, Any]:
    """What the page must show for the stats `s`: data-k -> raw value."""
    live = s["live"]
    out: dict[str, Any] = {
        "oldest.stream": s["queues"]["stream"]["oldest_age_s"],
        "oldest.batch": s["queues"]["batch"]["oldest_age_s"],
        "flush.interval": live["flush"]["interval_s"], "flush.source": live["flush"]["source"],
        "flush.last": live["flush"]["last_at"], "flush.next": live["flush"]["next_due_at"],
        "batches.total": live["batches_in_flight"]["total"],
        "workers.running": live["stream_workers"]["running"],
        "today.cost": live["today"]["cost_usd"],
        "today.standard": live["today"]["standard_cost_usd"],
        "today.savings": live["today"]["savings_usd"],
        "today.requests": live["today"]["requests"], "today.since": live["today"]["since"],
    }
    for lane, queue in s["queues"].items():
        for q in queue["by_model"]:
            out[f"queue.{lane}.{q['model']}.{q['state']}"] = q["count"]
    for b in live["batches_in_flight"]["batches"]:
        out[f"batch.{b['id']}.status"] = b["status"]
        out[f"batch.{b['id']}.progress"] = f"{b['done'] + b['failed']}/{b['requests']}"
        out[f"batch.{b['id']}.age"] = b["age_s"]
    for e in live["stream_workers"]["engines"]:
        out[f"engine.{e['engine']}.running"] = e["running"]
    for lane, t in live["ttft_recent"].items():
        out[f"ttft.{lane}.count"] = t["count"]
        out[f"ttft.{lane}.p50"] = t["p50_le_s"]
        out[f"ttft.{lane}.p99"] = t["p99_le_s"]
    return out


AGES = ("oldest.stream", "oldest.batch")  # change with the clock: equal within a refresh


def same(key: str, shown: str, want: Any) -> bool:
    if want is None:
        return shown == ""
    try:
        tolerance = 3.0 if key in AGES or key.endswith(".age") else 1e-9
        return abs(float(shown) - float(want)) <= tolerance
    except ValueError:
        return shown == str(want)


def page_figures(driver: Any) -> dict[str, str]:
    figures: dict[str, str] = driver.execute_script(
        "const out = {}; for (const el of document.querySelectorAll('[data-k]'))"
        " { if (el.dataset.v !== undefined) out[el.dataset.k] = el.dataset.v; } return out;")
    return figures


def mismatches(driver: Any, url: str) -> list[str]:
    want, shown = expected_figures(stats(url)), page_figures(driver)
    bad = [f"{k}: page {shown.get(k)!r}, /v1/stats {v!r}" for k, v in want.items()
           if k not in shown or not same(k, shown[k], v)]
    bad += [f"{k}: on the page only ({shown[k]!r})" for k in shown.keys() - want.keys()]
    return bad


def test_the_live_page_shows_what_v1_stats_says(deployment: tuple[str, Settings]) -> None:
    url, _ = deployment
    from selenium.webdriver.common.by import By

    with chromium(1400, 1000) as driver:
        driver.get(f"{url}/ui")
        status = driver.find_element(By.ID, "status")
        wait_until(lambda: status.get_attribute("data-state") == "error", 10,
                   message="the page to say it needs a key")
        assert "missing API key" in status.text
        driver.find_element(By.ID, "key").send_keys(USER_KEY)  # not an admin: 403 shown
        driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
        wait_until(lambda: "admin" in status.text and status.get_attribute("data-state")
                   == "error", 10, message="the 403 for a non-admin key")
        driver.find_element(By.ID, "key").send_keys(ADMIN_KEY)
        driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
        wait_until(lambda: status.get_attribute("data-state") == "ok", 10,
                   message="the page to show live figures")
        assert driver.execute_script("return sessionStorage.getItem('hr-admin-key')") == ADMIN_KEY

        # Work to show: 3 finished streams, a batch in flight, 3 low requests queued behind it,
        # a long stream running.
        done = [submit(url, f"hello {i} [[sim:tokens=5]]", "high") for i in range(3)]
        wait_until(lambda: all(status_of(url, r) == "completed" for r in done), 30,
                   message="the short streams to complete")
        for i in range(2):
            submit(url, f"batched {i} [[sim:turnaround=600]]", "low")
        assert httpx.post(f"{url}/v1/admin/flush", headers=ADMIN).status_code == 202
        wait_until(lambda: stats(url)["live"]["batches_in_flight"]["total"] == 1, 30,
                   message="the batch to be in flight")
        queued = [submit(url, f"later {i}", "low") for i in range(3)]
        long_stream = submit(url, "a long one [[sim:tokens=5000,tps=5]]", "high")
        wait_until(lambda: status_of(url, long_stream) == "streaming", 30,
                   message="the long stream to run")
        # The engine's heartbeat (once a second) says so.
        wait_until(lambda: stats(url)["live"]["stream_workers"]["running"] == 1, 10,
                   message="the stream engine to report its running stream")

        # The flush interval, changed from the page, is the one in force, shown as an override.
        driver.find_element(By.ID, "flush-input").send_keys("90")
        driver.find_element(By.CSS_SELECTOR, "#flush-form button").click()
        wait_until(lambda: page_figures(driver).get("flush.interval") == "90", 10,
                   message="the new interval on the page")
        config = httpx.get(f"{url}/v1/admin/config", headers=ADMIN).json()
        assert config["flush_interval_s"] == 90 and config["flush_interval_overridden"]

        # Every figure on the page equals /v1/stats (waiting out one refresh in between).
        try:
            wait_until(lambda: not mismatches(driver, url), 15, 0.2,
                       message="the page's figures to equal /v1/stats")
        except TimeoutError:
            pytest.fail("page differs from /v1/stats: " + "; ".join(mismatches(driver, url)))
        shown = page_figures(driver)
        assert shown["queue.batch.gpt-4o-mini.queued"] == "3"
        assert shown["queue.stream.gpt-4o-mini.streaming"] == "1"
        assert shown["batches.total"] == "1" and shown["workers.running"] == "1"
        assert [v for k, v in shown.items() if k.endswith(".progress")] == ["0/2"]
        assert shown["ttft.stream.count"] == "3" and shown["today.requests"] == "3"
        assert float(shown["today.cost"]) > 0 and shown["flush.source"] == "override"
        assert "run-time override" in driver.find_element(By.CSS_SELECTOR,
                                                          '[data-k="flush.source"]').text
        text = driver.find_element(By.TAG_NAME, "main").text
        assert "gpt-4o-mini" in text and "$" in text
        if os.environ.get("HR_UI_SCREENSHOT"):
            driver.set_window_size(1600, 1000)
            bottom = driver.execute_script(
                "return document.querySelector('footer').getBoundingClientRect().bottom")
            driver.set_window_size(1600, int(bottom) + 24 + 1000 - int(driver.execute_script(
                "return window.innerHeight")))
            driver.save_screenshot(os.environ["HR_UI_SCREENSHOT"])
        assert len(queued) == 3
        httpx.delete(f"{url}/v1/requests/{long_stream}", headers=USER)


def test_the_page_and_its_assets_are_served_from_the_package(redis_base_url: str) -> None:
    settings = Settings(redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
                        log_format="json", _env_file=None)
    with Stack(settings) as stack:
        url = stack.start_api()
        page = httpx.get(f"{url}/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name, kind in (("ui.js", "text/javascript"), ("ui.css", "text/css")):
            asset = httpx.get(f"{url}/ui/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert "http://" not in asset.text and "https://" not in asset.text
        assert "http://" not in page.text and "https://" not in page.text  # nothing external
        assert httpx.get(f"{url}/ui/..%2F..%2Fsettings%2Fconfig.py").status_code == 404
        assert httpx.get(f"{url}/ui/index.html").status_code == 404  # the page is /ui
        assert httpx.get(f"{url}/ui/nope.js").status_code == 404


def test_live_plan_windows_come_from_checkpoints(make_settings: Any, redis_client: Any) -> None:
    """TTFT over the last minutes and today's cost count from the oldest checkpoint in the
    window; the flush's source and who set it come from the runtime config."""
    settings = make_settings(flush_interval_s=60)
    from hybrid_router.router.core.keys import Keys
    from hybrid_router.router.core.live_stats import TTFT_WINDOW_MIN

    keys = Keys(settings.key_prefix)
    t0 = 1_800_000_000.0
    redis_client.hset(keys.timings("stream"), mapping={"ttft|b|1": 2, "ttft|n": 2,
                                                       "ttft|sum_us": 150_000})
    first = run_plan(redis_client, settings, t0)
    assert first.ttft["stream"]["count"] == 0 and first.ttft["stream"]["since"] == t0
    redis_client.hincrby(keys.timings("stream"), "ttft|b|4", 1)  # one more, at <= 1 s
    redis_client.hincrby(keys.timings("stream"), "ttft|n", 1)
    redis_client.hincrby(keys.timings("stream"), "ttft|sum_us", 900_000)
    later = run_plan(redis_client, settings, t0 + 120)
    assert later.ttft["stream"]["count"] == 1 and later.ttft["stream"]["p99_le_s"] == 1.0
    assert later.ttft["stream"]["since"] == t0
    gone = run_plan(redis_client, settings, t0 + 60 * (TTFT_WINDOW_MIN + 1) + 1)
    assert gone.ttft["stream"]["count"] == 0  # t0's checkpoint left the window
    assert redis_client.ttl(keys.timings_checkpoint("stream", int(t0 // 60))) > 0

    redis_client.hset(keys.runtime_config(), mapping={"flush_interval_s": "7.5", SET_AT: "12",
                                                      SET_BY: "api tenant admin"})
    redis_client.hset(keys.last_flush(), "at", repr(t0))
    view = run_plan(redis_client, settings, t0 + 1)
    assert view.flush == {"interval_s": 7.5, "source": "override", "setting_s": 60.0,
                          "set_at": 12.0, "set_by": "api tenant admin", "last_at": t0,
                          "next_due_at": t0 + 7.5}
    assert view.today["requests"] == 0 and view.today["cost_usd"] == "0.000000"

    # A ledger far larger than any real one (5,000 fields) is copied whole into a checkpoint.
    redis_client.hset(keys.ledger(), mapping={f"stream|m{i}|requests": 1 for i in range(5000)})
    next_day = run_plan(redis_client, settings, t0 + 86400)
    assert next_day.today["requests"] == 0  # the new day's checkpoint holds all of them
    day = time.strftime("%Y-%m-%d", time.gmtime(t0 + 86400))
    assert redis_client.hlen(keys.ledger_checkpoint(day)) == 5001  # and its time


def run_plan(client: Any, settings: Settings, now: float) -> Any:
    """`live_plan` on a sync client at a given time (`take_live` runs it at the present)."""
    return redis_plan.run_plan(client, live_plan(settings, now))


def test_the_poll_records_a_batch_s_progress_for_the_live_view(
        make_settings: Any, redis_client: Any) -> None:
    """The poll writes the upstream's request counts (and status) of a batch still running;
    the live view shows them as its progress."""
    from types import SimpleNamespace

    from hybrid_router.workers.batch.poll import PollContext, check_batch
    from hybrid_router.workers.batch.record import record_batch

    settings = make_settings()
    record_batch(redis_client, settings, "batch_progress", "gpt-4o-mini", "native", 10)
    seen = SimpleNamespace(status="in_progress",
                           request_counts=SimpleNamespace(completed=3, failed=1, total=10))
    upstream = SimpleNamespace(batches=SimpleNamespace(retrieve=lambda _id: seen))
    ctx = PollContext(settings, redis_client, upstream)  # type: ignore[arg-type]
    assert check_batch(ctx, "batch_progress") is False  # still running
    [batch] = run_plan(redis_client, settings, time.time()).batches
    assert (batch["status"], batch["done"], batch["failed"], batch["requests"]) == (
        "in_progress", 3, 1, 10)
    assert batch["progress"] == 0.4 and batch["model"] == "gpt-4o-mini"
