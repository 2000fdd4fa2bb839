// Renders a request's tokens straight from the router with EventSource (no build step).
//
// The page's own backend (backend.py) submits the prompt with the API key and hands back only
// the request's signed, read-only stream_url. Events carry `id: <seq>`: when the connection
// drops, EventSource reconnects by itself and sends Last-Event-ID, so the router resumes after
// the last event shown. Should the browser give up (readyState CLOSED), the page opens the URL
// again with `&after=<last seq>`. Seqs already shown are skipped, so no text is doubled.
"use strict";

const out = document.getElementById("out");
const statusLine = document.getElementById("status");
let source = null;
let streamUrl = null;
let lastSeq = 0;
let reconnects = 0;
let finished = false;

function setStatus(state, text) {
  statusLine.dataset.state = state;
  statusLine.dataset.reconnects = String(reconnects);
  statusLine.dataset.lastSeq = String(lastSeq);
  statusLine.textContent = text || state;
}

function accept(event) {
  const data = JSON.parse(event.data);
  if (data.seq <= lastSeq) return null;  // already shown (a replay after a reconnect)
  lastSeq = data.seq;
  return data;
}

function finish(state, text) {
  finished = true;
  if (source) source.close();  // else EventSource would reconnect after the final event
  setStatus(state, text);
}

function open() {
  const url = lastSeq ? `${streamUrl}&after=${lastSeq}` : streamUrl;
  source = new EventSource(url);
  source.onopen = () => setStatus("streaming");
  for (const type of ["accepted", "started", "queued", "submitted"]) {
    source.addEventListener(type, (e) => { if (accept(e)) setStatus("streaming"); });
  }
  source.addEventListener("token", (e) => {
    const data = accept(e);
    if (data) { out.textContent += data.content; setStatus("streaming"); }
  });
  source.addEventListener("done", (e) => { if (accept(e)) finish("done"); });
  source.addEventListener("cancelled", (e) => { if (accept(e)) finish("cancelled"); });
  source.addEventListener("error", (e) => {
    if (e.data !== undefined) {  // the router's `error` event (the request failed)
      const data = accept(e);
      if (data) finish("failed", `failed: ${data.code}: ${data.message}`);
      return;
    }
    if (finished) return;  // a connection error: EventSource retries with Last-Event-ID
    reconnects += 1;
    setStatus("reconnecting", `connection lost; reconnecting (attempt ${reconnects})`);
    if (source.readyState === EventSource.CLOSED) {  // the browser gave up: open it again
      setTimeout(open, 1000);
    }
  });
}

document.getElementById("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (source) source.close();
  out.textContent = "";
  lastSeq = 0; reconnects = 0; finished = false;
  setStatus("submitting");
  const resp = await fetch("/api/ask", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({prompt: document.getElementById("prompt").value}),
  });
  const data = await resp.json();
  if (!resp.ok) { finish("failed", `failed: ${data.error}`); return; }
  statusLine.dataset.requestId = data.id;
  streamUrl = data.stream_url;
  open();
});
