// The router's live page (GET /ui): renders GET /v1/stats every 2 s. No build step, no
// external assets. The admin key stays in this tab's sessionStorage, sent only to this origin.
// Every figure carries its raw value in data-v next to its text (the browser test reads it).
"use strict";

const KEY_NAME = "hr-admin-key";
const REFRESH_MS = 2000;
const statusLine = document.getElementById("status");
let timer = null;

function key() { return sessionStorage.getItem(KEY_NAME) || ""; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key()) h.Authorization = `Bearer ${key()}`;
  return h;
}
function setStatus(state, text) { statusLine.dataset.state = state; statusLine.textContent = text; }

function secs(v) {
  if (v === null || v === undefined) return "—";
  if (v === Infinity || v === "inf") return "∞";
  if (v < 1) return `${Math.round(v * 1000)} ms`;
  if (v < 120) return `${(+v).toFixed(1)} s`;
  if (v < 7200) return `${(v / 60).toFixed(1)} min`;
  return `${(v / 3600).toFixed(1)} h`;
}
function clock(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : "—"; }
function usd(v) { return `$${(+v).toFixed(6)}`; }

function put(k, raw, shown) {
  for (const el of document.querySelectorAll(`[data-k="${k}"]`)) {
    el.dataset.v = raw === null || raw === undefined ? "" : String(raw);
    el.textContent = shown;
  }
}
function cell(tr, raw, shown, k, numeric) {
  const td = document.createElement("td");
  if (numeric) td.className = "n";
  if (k) td.dataset.k = k;
  td.dataset.v = raw === null || raw === undefined ? "" : String(raw);
  if (shown instanceof Node) td.appendChild(shown); else td.textContent = shown;
  tr.appendChild(td);
  return td;
}
function rows(id, items, fill, empty) {
  const body = document.querySelector(`#${id} tbody`);
  body.textContent = "";
  if (!items.length) {
    const tr = body.insertRow();
    const td = tr.insertCell();
    td.colSpan = 5; td.className = "muted"; td.textContent = empty;
    return;
  }
  for (const item of items) { const tr = document.createElement("tr"); fill(tr, item); body.appendChild(tr); }
}

function render(s) {
  const live = s.live;
  const queues = [];
  for (const lane of Object.keys(s.queues)) {
    for (const q of s.queues[lane].by_model) queues.push(Object.assign({lane}, q));
  }
  rows("queues", queues, (tr, q) => {
    cell(tr, q.lane, q.lane); cell(tr, q.model, q.model); cell(tr, q.state, q.state);
    cell(tr, q.count, String(q.count), `queue.${q.lane}.${q.model}.${q.state}`, true);
  }, "nothing queued or streaming");
  put("oldest.stream", s.queues.stream.oldest_age_s, secs(s.queues.stream.oldest_age_s));
  put("oldest.batch", s.queues.batch.oldest_age_s, secs(s.queues.batch.oldest_age_s));

  const f = live.flush;
  put("flush.interval", f.interval_s, secs(f.interval_s));
  let source = f.source === "override"
    ? `(run-time override${f.set_by ? ` by ${f.set_by}` : ""}${f.set_at ? ` at ${clock(f.set_at)}` : ""}; setting ${secs(f.setting_s)})`
    : "(setting ROUTER_FLUSH_INTERVAL_S)";
  put("flush.source", f.source, source);
  put("flush.last", f.last_at, f.last_at ? `${clock(f.last_at)} (${secs(live.taken_at - f.last_at)} ago)` : "none yet");
  const due = f.next_due_at;
  put("flush.next", due, due === null ? "at the first tick with work"
    : due <= live.taken_at ? "now (at the next tick with work)" : `in ${secs(due - live.taken_at)} (${clock(due)})`);

  put("batches.total", live.batches_in_flight.total, `(${live.batches_in_flight.total})`);
  rows("batches", live.batches_in_flight.batches, (tr, b) => {
    const short = b.id.length > 14 ? `${b.id.slice(0, 13)}…` : b.id;
    cell(tr, b.id, short).title = b.id; cell(tr, b.model, b.model); cell(tr, b.status, b.status, `batch.${b.id}.status`);
    const bar = document.createElement("span");
    const p = document.createElement("progress"); p.max = 1; p.value = b.progress;
    bar.append(p, ` ${b.done + b.failed}/${b.requests}${b.failed ? ` (${b.failed} failed)` : ""}`);
    cell(tr, `${b.done + b.failed}/${b.requests}`, bar, `batch.${b.id}.progress`);
    cell(tr, b.age_s, secs(b.age_s), `batch.${b.id}.age`, true);
  }, "no batch in flight");

  const w = live.stream_workers;
  put("workers.running", w.running, `(${w.running} running)`);
  rows("workers", w.engines, (tr, e) => {
    cell(tr, e.host, `${e.host} (pid ${e.pid})`); cell(tr, e.engine, e.engine);
    cell(tr, e.running, String(e.running), `engine.${e.engine}.running`, true);
    cell(tr, e.capacity, String(e.capacity), null, true);
  }, "no stream worker alive");

  rows("ttft", Object.keys(live.ttft_recent).map((lane) => Object.assign({lane}, live.ttft_recent[lane])), (tr, t) => {
    cell(tr, t.lane, t.lane);
    cell(tr, t.count, String(t.count), `ttft.${t.lane}.count`, true);
    cell(tr, t.p50_le_s, secs(t.p50_le_s), `ttft.${t.lane}.p50`, true);
    cell(tr, t.p99_le_s, secs(t.p99_le_s), `ttft.${t.lane}.p99`, true);
    cell(tr, t.since, t.since ? `${clock(t.since)} (${secs(live.taken_at - t.since)})` : "—");
  }, "");

  const d = live.today;
  put("today.cost", d.cost_usd, usd(d.cost_usd));
  put("today.standard", d.standard_cost_usd, usd(d.standard_cost_usd));
  put("today.savings", d.savings_usd, usd(d.savings_usd));
  put("today.requests", d.requests, String(d.requests));
  put("today.since", d.since, d.since ? `(${d.day}, counted since ${clock(d.since)})` : `(${d.day})`);
  document.body.dataset.takenAt = String(s.taken_at);
  document.getElementById("updated").textContent = `Updated ${clock(s.taken_at)}.`;
}

async function refresh() {
  try {
    const resp = await fetch("/v1/stats", {headers: headers(), cache: "no-store"});
    const data = await resp.json();
    if (!resp.ok) {
      setStatus("error", `${resp.status}: ${(data.error && data.error.message) || resp.statusText}`);
    } else {
      render(data);
      setStatus("ok", key() ? "live (admin key in this tab)" : "live (no key sent)");
    }
  } catch (err) {
    setStatus("error", `cannot reach the router: ${err}`);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function restart() { if (timer) clearTimeout(timer); refresh(); }

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_NAME, document.getElementById("key").value.trim());
  document.getElementById("key").value = "";
  restart();
});
document.getElementById("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_NAME);
  restart();
});
document.getElementById("flush-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = document.getElementById("flush-result");
  const value = Number(document.getElementById("flush-input").value);
  const resp = await fetch("/v1/admin/config", {
    method: "PUT", headers: headers({"Content-Type": "application/json"}),
    body: JSON.stringify({flush_interval_s: value}),
  });
  const data = await resp.json();
  out.dataset.state = resp.ok ? "ok" : "error";
  out.textContent = resp.ok ? `set to ${secs(data.flush_interval_s)}`
    : `${resp.status}: ${(data.error && data.error.message) || "refused"}`;
  restart();
});

restart();
