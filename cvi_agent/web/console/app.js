// cvi-agent console: plain JS, no build step. Talks to /api/* with the key kept in sessionStorage.
"use strict";

const KEY_STORAGE = "cvi-agent-api-key";
const $ = (sel) => document.querySelector(sel);
const state = { key: sessionStorage.getItem(KEY_STORAGE) || "", current: null, feed: null,
                lastEventId: null, events: new Map(), turns: new Map(), reconnectTimer: null,
                status: "", phase: null, failures: [],
                // latency: what the simulated Tavus measured per spoken turn (simulation.turn)
                // and the server's record of every answer (llm.turn), joined by completion id
                simTurns: [], llmTurns: new Map(),
                skew: 0 };  // the server's clock minus this browser's, in seconds
const IDLE_AFTER_S = 10 * 60;  // no event for this long: grouped with the ended conversations
const MAX_EVENT_CHARS = 16 * 1024 * 1024;  // a feed line longer than this is not ours: reconnect

function askKey(message) {
  const dialog = $("#key-dialog");
  $("#key-error").hidden = !message;
  $("#key-error").textContent = message || "";
  if (!dialog.open) dialog.showModal();
}

$("#key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) return;
  state.key = key;
  const ok = await loadConversations();
  if (ok) {
    sessionStorage.setItem(KEY_STORAGE, key);
    $("#key-dialog").close();
  }
});
$("#forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = "";
  closeLive();
  askKey();
});

async function api(method, path, body) {
  const resp = await fetch(path, {
    method,
    headers: { "Authorization": "Bearer " + state.key, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  let data = null;
  try { data = await resp.json(); } catch (_) { /* empty body */ }
  if (!resp.ok) {
    const message = (data && data.error && data.error.message) || resp.statusText;
    if (resp.status === 401) {
      const text = "That key was not accepted: " + message;
      askKey(text);
      throw new Error(text);
    }
    throw new Error(message);
  }
  return data;
}

function listOf(data) {
  if (Array.isArray(data)) return data;
  return (data && (data.data || data.conversations || data.items)) || [];
}

async function loadConversations() {
  if (!state.key) { askKey(); return false; }
  let data;
  try { data = await api("GET", "/api/conversations?limit=50"); }
  catch (err) {
    if ($("#key-dialog").open) { $("#key-error").hidden = false; $("#key-error").textContent = err.message; }
    else console.warn(err);
    return false;
  }
  const items = listOf(data);
  const now = (data && typeof data.now === "number") ? data.now : Date.now() / 1000;
  state.skew = now - Date.now() / 1000;
  const live = [], done = [];
  for (const conv of items) {
    const li = document.createElement("li");
    li.dataset.id = conv.id;
    if (state.current === conv.id) li.classList.add("active");
    const id = document.createElement("div"); id.className = "id"; id.textContent = conv.id; id.title = conv.id;
    const meta = document.createElement("div"); meta.className = "muted small meta";
    const last = Math.max(conv.last_event_at || 0, conv.updated_at || 0, conv.created_at || 0);
    const quiet = now - last;
    let when = "";
    if (conv.status === "ended") when = conv.ended_at ? "ended " + ago(now - conv.ended_at) : "ended";
    else if (quiet > IDLE_AFTER_S) when = "idle " + duration(quiet);
    meta.textContent = [conv.persona, when.startsWith("ended") ? "" : conv.status, when].filter(Boolean).join(" · ");
    li.dataset.status = conv.status || "";
    li.append(id, meta);
    li.addEventListener("click", () => selectConversation(conv.id));
    if (state.current === conv.id && conv.status) setStatus(conv.status);
    (conv.status === "ended" || quiet > IDLE_AFTER_S ? done : live).push(li);
  }
  $("#conv-live").replaceChildren(...live);
  $("#conv-done").replaceChildren(...done);
  $("#live-count").textContent = `(${live.length})`;
  $("#done-count").textContent = `(${done.length})`;
  $("#no-conversations").hidden = items.length > 0;
  return true;
}

function duration(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min`;
  if (seconds < 36 * 3600) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}
function ago(seconds) { return duration(Math.max(0, seconds)) + " ago"; }

$("#refresh").addEventListener("click", loadConversations);

async function selectConversation(id) {
  closeLive();
  state.current = id;
  state.lastEventId = null;
  state.events.clear(); state.turns.clear();
  state.simTurns = []; state.llmTurns.clear(); state.failures = []; state.phase = null;
  setStatus(""); renderPhase(); renderAlert();
  for (const li of document.querySelectorAll("#conversations li")) li.classList.toggle("active", li.dataset.id === id);
  $("#detail").hidden = false;
  $("#conv-title").textContent = id;
  $("#transcript").replaceChildren();
  $("#events tbody").replaceChildren();
  renderLatency();
  try {
    const record = await api("GET", "/api/conversations/" + encodeURIComponent(id));
    const conv = record.conversation || record;
    setStatus(conv.status || "");
    for (const ev of record.events || []) {
      addEvent(ev);
      if (typeof ev.id === "number" && ev.id > (state.lastEventId ?? 0)) state.lastEventId = ev.id;
    }
  } catch (err) { $("#control-result").textContent = err.message; }
  if (state.current === id) openLive(id);
}

// The conversation's status is the one badge; the live feed (this page's connection to the
// server) is a dot with a tooltip, so "live" never means two things.
const FEED_STATES = {
  connected: "Live feed: connected (events appear as they happen)",
  connecting: "Live feed: connecting…",
  closed: "Live feed: closed (reconnects in 2 s while this conversation is open)",
};
function setLiveState(feed) {
  const dot = $("#feed-state");
  dot.className = "feed-dot " + feed;
  dot.title = FEED_STATES[feed];
  dot.setAttribute("aria-label", FEED_STATES[feed]);
  dot.dataset.state = feed;
}

const STATUS_TITLES = {
  active: "active: created; the replica has not joined yet",
  live: "live: the replica joined; the call is under way",
  ended: "ended: Tavus said the call ended (system.shutdown)",
};
function setStatus(status) {
  if (state.status === "ended" && status !== "ended" && status) return;  // ended is final
  state.status = status;
  const badge = $("#conv-status");
  badge.textContent = status;
  badge.className = "badge" + (status ? " status-" + status : "");
  badge.title = STATUS_TITLES[status] || "The conversation's status";
  renderPhase();
}

// What the conversation is waiting for, in words: set by the simulation's milestones and the
// end-of-call callbacks.
function renderPhase() {
  const el = $("#conv-phase");
  const phase = state.phase;
  let text = "";
  if (phase && phase.kind === "script_finished" && state.status !== "ended") {
    const left = Math.round(phase.due - (Date.now() / 1000 + state.skew));
    text = "Script finished — waiting for Tavus's end-of-call callbacks (system.shutdown, then " +
      "application.transcription_ready)" + (left > 0 ? `, due in about ${left} s` : "") +
      ". Interactions still reach the replica meanwhile.";
  } else if (state.status === "ended") {
    const transcript = [...state.events.values()].some((e) => (e.kind || "") === "application.transcription_ready");
    const reason = phase && phase.reason ? ` (${phase.reason})` : "";
    text = `Ended${reason} — ` + (transcript ? "transcript received; the record is complete."
                                             : "waiting for the transcript callback (application.transcription_ready).");
  }
  el.textContent = text;
  el.hidden = !text;
}
setInterval(() => { if (state.phase && state.phase.kind === "script_finished") renderPhase(); }, 1000);

function renderAlert() {
  const el = $("#conv-alert");
  const n = state.failures.length;
  if (!n) { el.hidden = true; el.textContent = ""; return; }
  const last = state.failures[n - 1];
  el.textContent = `${n} LLM request${n > 1 ? "s" : ""} (spoken turns and speculative ones) fell back ` +
    `to the persona's fallback line or an error. Last cause: ${last}`;
  el.hidden = false;
}

function closeLive() {
  if (state.reconnectTimer) { clearTimeout(state.reconnectTimer); state.reconnectTimer = null; }
  if (state.feed) { state.feed.abort(); state.feed = null; }
  setLiveState("closed");
}

// The live feed is Server-Sent Events read with fetch and a stream reader, so the key travels
// in the Authorization header (EventSource cannot send one, and a key in a URL ends up in
// logs and history). Last-Event-ID resumes after a reconnection: nothing missed, nothing twice.
async function openLive(id) {
  closeLive();
  const controller = new AbortController();
  state.feed = controller;
  let retry = true;
  setLiveState("connecting");
  const headers = { "Authorization": "Bearer " + state.key, "Accept": "text/event-stream" };
  if (state.lastEventId != null) headers["Last-Event-ID"] = String(state.lastEventId);
  try {
    const resp = await fetch(`/api/conversations/${encodeURIComponent(id)}/events/stream`,
                             { headers, signal: controller.signal, cache: "no-store" });
    if (!resp.ok) {
      let message = resp.statusText;
      try { const data = await resp.json(); message = (data.error && data.error.message) || message; }
      catch (_) { /* not JSON */ }
      // 404 is retried: a simulated conversation is opened before its first event exists.
      if (resp.status === 401) { retry = false; askKey("That key was not accepted: " + message); }
      throw new Error(message);
    }
    setLiveState("connected");
    await readServerSentEvents(resp.body, (message) => onFeedMessage(id, message));
  } catch (err) {
    if (!controller.signal.aborted) console.warn("live feed:", err.message);
  } finally {
    if (state.feed === controller) {
      state.feed = null;
      setLiveState("closed");
      if (retry && state.current === id) state.reconnectTimer = setTimeout(() => openLive(id), 2000);
    }
  }
}

function onFeedMessage(id, message) {
  if (state.current !== id) return;
  if (message.event === "live") return;  // the stored backlog has been sent; live from here
  let data; try { data = JSON.parse(message.data); } catch (_) { return; }
  if (message.event === "error") { $("#control-result").textContent = data.message || "live feed error"; return; }
  if (message.event !== "message") return;
  if (message.id) state.lastEventId = message.id;
  addEvent(data);
}

// text/event-stream, as the HTML standard parses it: lines end in CR, LF or CRLF; a blank line
// dispatches the message; `:` starts a comment (the server's pings).
async function readServerSentEvents(body, onMessage) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", data = [], event = "", id = null;
  const line = (text) => {
    if (text === "") {
      if (data.length) onMessage({ id, event: event || "message", data: data.join("\n") });
      data = []; event = "";
      return;
    }
    if (text[0] === ":") return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") event = value;
    else if (field === "id" && !value.includes("\0")) id = value;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    for (;;) {
      const end = buffer.search(/[\r\n]/);
      if (end < 0 || (buffer[end] === "\r" && end === buffer.length - 1)) break;  // CRLF may straddle chunks
      line(buffer.slice(0, end));
      buffer = buffer.slice(buffer[end] === "\r" && buffer[end + 1] === "\n" ? end + 2 : end + 1);
    }
    if (buffer.length > MAX_EVENT_CHARS) throw new Error("live feed: a line too long");
  }
}

function props(ev) { return (ev.payload && (ev.payload.properties || ev.payload)) || {}; }

function addEvent(ev) {
  if (!ev || ev.conversation_id && state.current && ev.conversation_id !== state.current) return;
  const key = ev.id != null ? String(ev.id) : JSON.stringify([ev.source, ev.kind, ev.seq, ev.received_at]);
  if (state.events.has(key)) return;
  state.events.set(key, ev);
  renderEventRow(ev);
  updateTranscript(ev);
  updateLatency(ev);
  const kind = ev.kind || "";
  const p = props(ev);
  if (kind === "simulation.script_finished") {
    const since = ev.received_at || Date.now() / 1000 + state.skew;
    state.phase = { kind: "script_finished", due: since + (Number(p.callbacks_in_s) || 0) };
    renderPhase();
  }
  if (kind === "system.shutdown") {
    state.phase = { kind: "ended", reason: p.shutdown_reason || "" };
    setStatus("ended");
  }
  if (kind === "application.transcription_ready") renderPhase();
  if (kind === "system.replica_joined" && state.status === "active") setStatus("live");
}

function ms(value) { return typeof value === "number" ? `${value.toFixed(1)} ms` : "–"; }

// One line per event that says what happened; an LLM turn says who answered, how fast, and
// whether it was a replay, superseded, abandoned or fell back (with the cause).
function describe(ev) {
  const p = props(ev);
  const kind = ev.kind || "";
  if (kind === "llm.turn") {
    const parts = [p.persona ? `persona ${p.persona}` : "", `TTFT ${ms(p.ttft_ms)}`];
    if (typeof p.upstream_ttft_ms === "number") parts.push(`upstream ${ms(p.upstream_ttft_ms)}`);
    if (typeof p.total_ms === "number") parts.push(`total ${ms(p.total_ms)}`);
    // what became of the answer, always said: answered, replayed, superseded, abandoned, fell back
    let outcome = p.replayed ? "replayed (attached to a generation under way)" : "answered";
    if (p.superseded) outcome = "superseded (a longer transcript arrived)";
    else if (p.completed === false) outcome = "abandoned by the caller";
    if (p.fallback) outcome = `FELL BACK (${p.fallback_reason || "error"}): ${p.error || "no cause recorded"}`;
    parts.push(outcome);
    if (p.user_text) parts.push(`“${String(p.user_text).slice(0, 80)}”`);
    return parts.filter(Boolean).join(" · ");
  }
  if (kind === "simulation.turn") {
    return `turn ${p.index} (${p.kind}) · caller TTFT ${ms(p.ttft_ms)} · utterance to utterance ${ms(p.u2u_ms)}` +
      (p.fallback ? ` · FELL BACK: ${p.fallback}` : "");
  }
  if (kind === "simulation.script_finished") {
    return `the script is done (${p.turns} turns); end-of-call callbacks in about ${Math.round(p.callbacks_in_s || 0)} s`;
  }
  let detail = p.speech || p.text || p.name || p.shutdown_reason || p.context || "";
  const delivery = ev.payload && ev.payload.delivery;  // an interaction the API delivered
  if (delivery && delivery.via) detail = `${detail} [via ${delivery.via}, ${delivery.status}]`.trim();
  return String(detail);
}

function renderEventRow(ev) {
  const tr = document.createElement("tr");
  const p = props(ev);
  const failed = ev.kind === "llm.turn" && p.fallback === true;
  tr.dataset.kind = ev.kind || "";
  if (failed) { tr.classList.add("failed"); tr.title = "This turn fell back: " + (p.error || p.fallback_reason || ""); }
  const cells = [ev.id ?? "–", ev.source || "", ev.kind || "", ev.role || p.role || "", describe(ev)];
  cells.forEach((value, i) => {
    const td = document.createElement("td"); td.textContent = String(value); tr.append(td);
    if (i === 0) td.className = "num";
  });
  tr.lastChild.className = "detail";
  // Rows stay in id order (arrival in the record), though concurrent writers may publish a
  // later id first: walk back from the end to the row it follows.
  const body = $("#events tbody");
  tr.dataset.id = typeof ev.id === "number" ? String(ev.id) : "";
  let before = null;
  if (typeof ev.id === "number") {
    for (let row = body.lastElementChild; row && row.dataset.id && Number(row.dataset.id) > ev.id;
         row = row.previousElementSibling) before = row;
  }
  body.insertBefore(tr, before);
  const wrap = body.closest(".table-wrap"); if (wrap) wrap.scrollTop = wrap.scrollHeight;
  $("#event-count").textContent = `(${state.events.size})`;
  if (failed) { state.failures.push(p.error || p.fallback_reason || "unknown cause"); renderAlert(); }
}

function normRole(role) { return role === "pal" || role === "assistant" ? "replica" : role; }

function updateTranscript(ev) {
  const kind = (ev.kind || "").replace(/-/g, "_");
  if (kind !== "conversation.utterance" && kind !== "conversation.utterance.streaming") return;
  const p = props(ev);
  const role = normRole(p.role || ev.role);
  if (role !== "user" && role !== "replica") return;
  const speech = p.speech ?? p.text ?? "";
  const turnKey = role + ":" + (ev.inference_id || (ev.payload && ev.payload.inference_id) || ev.seq);
  let turn = state.turns.get(turnKey);
  if (!turn) {
    const li = document.createElement("li");
    li.className = role;
    const who = document.createElement("span"); who.className = "who"; who.textContent = role;
    const text = document.createElement("span"); text.className = "text";
    li.append(who, text);
    $("#transcript").append(li);
    turn = { li, text, intended: "", spoken: null, interrupted: false };
    state.turns.set(turnKey, turn);
  }
  if (kind === "conversation.utterance") turn.intended = speech;
  else { turn.spoken = speech; if (p.final === true || p.final === "true") turn.interrupted = p.is_interrupted === true || p.is_interrupted === "true"; }
  turn.text.textContent = turn.spoken != null ? turn.spoken : turn.intended;
  turn.li.classList.toggle("interrupted", turn.interrupted);
  const list = $("#transcript"); list.scrollTop = list.scrollHeight;
}

function updateLatency(ev) {
  const p = ev.payload || {};
  if (ev.kind === "simulation.turn") state.simTurns.push(p);
  else if (ev.kind === "llm.turn") { if (p.completion_id) state.llmTurns.set(p.completion_id, p); }
  else return;
  renderLatency();
}

// Per turn: what the caller experienced (its time to first token and utterance-to-utterance,
// measured at the simulated Tavus) beside what the server added (its own time to first token
// minus the upstream model's). A conversation with no simulated Tavus has only the server's view.
function latencyRows() {
  const added = (t) => {
    if (!t || typeof t.ttft_ms !== "number") return null;
    return typeof t.upstream_ttft_ms === "number" ? Math.max(0, t.ttft_ms - t.upstream_ttft_ms) : t.ttft_ms;
  };
  if (state.simTurns.length) {
    return state.simTurns.map((t) => {
      const server = state.llmTurns.get(t.completion_id);
      return { label: String(t.index), caller: t.ttft_ms, u2u: t.u2u_ms, server: added(server),
               failed: Boolean(t.fallback || (server && server.fallback)) };
    });
  }
  const answered = [...state.llmTurns.values()].filter((t) => t.completed !== false && !t.replayed);
  return answered.map((t, i) => ({ label: String(i + 1), caller: null, u2u: null, server: added(t),
                                   failed: Boolean(t.fallback) }));
}

// A round tick step giving 3 to 5 ticks up to at least `value` (1, 2 or 5 times a power of 10).
function tickStep(value) {
  const rough = Math.max(value, 0.1) / 4;
  const power = Math.pow(10, Math.floor(Math.log10(rough)));
  for (const m of [1, 2, 5, 10]) if (m * power >= rough) return m * power;
  return 10 * power;
}

function svg(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text != null) el.textContent = text;
  return el;
}

function renderLatency() {
  const chart = $("#latency");
  chart.replaceChildren();
  const rows = latencyRows().slice(-24);
  const series = ["caller", "u2u", "server"];
  const names = { caller: "caller's time to first token", u2u: "utterance to utterance", server: "added by the server" };
  const W = 640, H = 220, left = 56, right = 12, top = 22, bottom = 40;
  const plotW = W - left - right, plotH = H - top - bottom;
  const values = rows.flatMap((r) => series.map((k) => r[k])).filter((v) => typeof v === "number");
  const step = tickStep(values.length ? Math.max(...values) : 100);
  const ticks = Math.max(1, Math.ceil((values.length ? Math.max(...values) : 100) / step));
  const max = step * ticks;
  // axes, grid and tick values
  for (let i = 0; i <= ticks; i++) {
    const v = step * i, y = top + plotH - (v / max) * plotH;
    chart.append(svg("line", { class: i ? "grid" : "axis", x1: left, x2: W - right, y1: y, y2: y }));
    chart.append(svg("text", { class: "tick", x: left - 6, y: y + 4, "text-anchor": "end" }, String(+v.toFixed(1))));
  }
  chart.append(svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: top + plotH }));
  chart.append(svg("text", { class: "axis-title y-title", x: 12, y: top + plotH / 2, "text-anchor": "middle",
                             transform: `rotate(-90 12 ${top + plotH / 2})` }, "milliseconds"));
  chart.append(svg("text", { class: "axis-title x-title", x: left + plotW / 2, y: H - 6, "text-anchor": "middle" },
                   rows.length ? "turn" : "turn (no turns yet)"));
  const shown = series.filter((k) => rows.some((r) => typeof r[k] === "number"));
  const group = plotW / Math.max(rows.length, 1);
  const barW = Math.max(3, Math.min(28, (group - 8) / Math.max(shown.length, 1)));
  rows.forEach((row, i) => {
    const x0 = left + i * group + (group - barW * shown.length) / 2;
    chart.append(svg("text", { class: "tick x-tick" + (row.failed ? " failed" : ""), x: left + i * group + group / 2,
                               y: top + plotH + 14, "text-anchor": "middle" }, row.failed ? `${row.label} ✕` : row.label));
    shown.forEach((k, j) => {
      const v = row[k];
      if (typeof v !== "number") return;
      const h = Math.max(1, (v / max) * plotH), x = x0 + j * barW, y = top + plotH - h;
      const rect = svg("rect", { class: k + (row.failed ? " failed" : ""), x: x + 1, y, width: barW - 2, height: h });
      rect.append(svg("title", {}, `turn ${row.label}: ${names[k]} ${v.toFixed(1)} ms` + (row.failed ? " (fell back)" : "")));
      chart.append(rect);
      if (barW >= 12) {
        chart.append(svg("text", { class: "value", x: x + barW / 2, y: y - 3, "text-anchor": "middle" },
                         v >= 10 ? v.toFixed(0) : v.toFixed(1)));
      }
    });
  });
  for (const li of document.querySelectorAll("#latency-legend li")) {
    const key = li.querySelector(".key");
    const k = series.find((name) => key.classList.contains(name));
    li.hidden = k ? !shown.includes(k) : !rows.some((r) => r.failed);
  }
  const summary = $("#latency-summary");
  if (!rows.length) { summary.textContent = "No turns yet."; return; }
  const median = (k) => {
    const v = rows.map((r) => r[k]).filter((x) => typeof x === "number").sort((a, b) => a - b);
    return v.length ? `${v[Math.floor(v.length / 2)].toFixed(1)} ms` : null;
  };
  const parts = [`${rows.length} turns`];
  for (const k of series) { const m = median(k); if (m) parts.push(`median ${names[k]} ${m}`); }
  if (!state.simTurns.length) parts.push("the caller's view is measured in simulated conversations only");
  summary.textContent = parts.join(" · ");
}

async function sendInteraction(body) {
  if (!state.current) return;
  $("#control-result").textContent = "sending…";
  const via = $("#control-via").value;
  const query = via ? `?via=${encodeURIComponent(via)}` : "";
  try {
    const sent = await api("POST", `/api/conversations/${encodeURIComponent(state.current)}/interactions${query}`, body);
    const how = sent && sent.via ? ` via ${sent.via}` : "";
    const uncertain = sent && sent.delivery === "uncertain" ? " (uncertain: check before resending)" : "";
    const ms = sent && typeof sent.latency_ms === "number" ? ` in ${sent.latency_ms.toFixed(0)} ms` : "";
    $("#control-result").textContent = `sent ${body.type}${how}${ms}${uncertain}`;
  } catch (err) { $("#control-result").textContent = `${body.type} failed: ${err.message}`; }
}

for (const button of document.querySelectorAll("#controls button[data-action]")) {
  button.addEventListener("click", () => {
    const type = button.dataset.action;
    const text = $("#control-text").value.trim();
    if (type === "interrupt") return sendInteraction({ type });
    if (!text) { $("#control-result").textContent = "Type some text first."; return; }
    if (type === "echo" || type === "respond") return sendInteraction({ type, text });
    return sendInteraction({ type, context: text });
  });
}
for (const select of document.querySelectorAll("#controls select[data-sensitivity]")) {
  select.addEventListener("change", () => {
    if (!select.value) return;
    sendInteraction({ type: "sensitivity", [select.dataset.sensitivity]: select.value });
  });
}

$("#simulate").addEventListener("click", async () => {
  const button = $("#simulate");
  button.disabled = true;
  try {
    const sim = await api("POST", "/api/simulations", {});
    await loadConversations();
    await selectConversation(sim.conversation_id);
  } catch (err) { alert("Could not start a simulation: " + err.message); }
  finally { button.disabled = false; }
});

if (state.key) loadConversations().then((ok) => { if (!ok) askKey(); });
else askKey();
setInterval(() => { if (state.key && !$("#key-dialog").open) loadConversations(); }, 5000);
