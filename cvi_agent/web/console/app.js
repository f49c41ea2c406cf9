// cvi-agent console: plain JS, no build step. Talks to /api/* with the key kept in sessionStorage.
"use strict";

const KEY_STORAGE = "cvi-agent-api-key";
const $ = (sel) => document.querySelector(sel);
const state = { key: sessionStorage.getItem(KEY_STORAGE) || "", current: null, feed: null,
                lastEventId: null, events: new Map(), turns: new Map(), latencies: [],
                reconnectTimer: null };
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
  const list = $("#conversations");
  list.replaceChildren();
  const items = listOf(data);
  $("#no-conversations").hidden = items.length > 0;
  for (const conv of items) {
    const li = document.createElement("li");
    li.dataset.id = conv.id;
    if (state.current === conv.id) li.classList.add("active");
    const id = document.createElement("div"); id.className = "id"; id.textContent = conv.id;
    const meta = document.createElement("div"); meta.className = "muted small";
    meta.textContent = [conv.persona, conv.status].filter(Boolean).join(" · ");
    li.append(id, meta);
    li.addEventListener("click", () => selectConversation(conv.id));
    if (state.current === conv.id && conv.status) $("#conv-status").textContent = conv.status;
    list.append(li);
  }
  return true;
}
$("#refresh").addEventListener("click", loadConversations);

async function selectConversation(id) {
  closeLive();
  state.current = id;
  state.lastEventId = null;
  state.events.clear(); state.turns.clear(); state.latencies = [];
  for (const li of document.querySelectorAll("#conversations li")) li.classList.toggle("active", li.dataset.id === id);
  $("#detail").hidden = false;
  $("#conv-title").textContent = id;
  $("#transcript").replaceChildren();
  $("#events tbody").replaceChildren();
  renderLatency();
  try {
    const record = await api("GET", "/api/conversations/" + encodeURIComponent(id));
    const conv = record.conversation || record;
    $("#conv-status").textContent = conv.status || "";
    for (const ev of record.events || []) {
      addEvent(ev);
      if (typeof ev.id === "number" && ev.id > (state.lastEventId ?? 0)) state.lastEventId = ev.id;
    }
  } catch (err) { $("#control-result").textContent = err.message; }
  if (state.current === id) openLive(id);
}

function setLiveState(live) {
  $("#live-state").textContent = live ? "live" : "offline";
  $("#live-state").classList.toggle("live", live);
}

function closeLive() {
  if (state.reconnectTimer) { clearTimeout(state.reconnectTimer); state.reconnectTimer = null; }
  if (state.feed) { state.feed.abort(); state.feed = null; }
  setLiveState(false);
}

// The live feed is Server-Sent Events read with fetch and a stream reader, so the key travels
// in the Authorization header (EventSource cannot send one, and a key in a URL ends up in
// logs and history). Last-Event-ID resumes after a reconnection: nothing missed, nothing twice.
async function openLive(id) {
  closeLive();
  const controller = new AbortController();
  state.feed = controller;
  let retry = true;
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
    setLiveState(true);
    await readServerSentEvents(resp.body, (message) => onFeedMessage(id, message));
  } catch (err) {
    if (!controller.signal.aborted) console.warn("live feed:", err.message);
  } finally {
    if (state.feed === controller) {
      state.feed = null;
      setLiveState(false);
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
  if (ev.kind === "system.shutdown") $("#conv-status").textContent = "ended";
}

function renderEventRow(ev) {
  const tr = document.createElement("tr");
  const p = props(ev);
  let detail = p.speech || p.text || p.name || p.shutdown_reason || p.context || "";
  const delivery = ev.payload && ev.payload.delivery;  // an interaction the API delivered
  if (delivery && delivery.via) detail = `${detail} [via ${delivery.via}, ${delivery.status}]`.trim();
  for (const value of [ev.seq ?? ev.id ?? "", ev.source || "", ev.kind || "", ev.role || p.role || "", detail]) {
    const td = document.createElement("td"); td.textContent = String(value); tr.append(td);
  }
  tr.lastChild.className = "detail";
  const body = $("#events tbody");
  body.append(tr);
  body.scrollTop = body.scrollHeight;
  $("#event-count").textContent = `(${state.events.size})`;
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
  if (ev.source !== "llm") return;
  const p = ev.payload || {};
  if (p.completed === false) return;  // a speculative request abandoned by its caller
  const ttft = p.ttft_ms ?? p.time_to_first_token_ms ?? p.first_token_ms;
  if (typeof ttft !== "number") return;
  state.latencies.push(ttft);
  renderLatency();
}

function renderLatency() {
  const svg = $("#latency");
  svg.replaceChildren();
  const values = state.latencies.slice(-40);
  if (!values.length) { $("#latency-summary").textContent = "No turns yet."; return; }
  const max = Math.max(...values, 1);
  const w = 400 / values.length;
  values.forEach((v, i) => {
    const h = Math.max(2, (v / max) * 100);
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    rect.setAttribute("x", i * w + 1); rect.setAttribute("width", Math.max(1, w - 2));
    rect.setAttribute("y", 110 - h); rect.setAttribute("height", h);
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `turn ${i + 1}: ${v.toFixed(1)} ms`; rect.append(title);
    svg.append(rect);
  });
  const sorted = [...state.latencies].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  $("#latency-summary").textContent = `${state.latencies.length} turns · median ${median.toFixed(1)} ms · max ${max.toFixed(1)} ms`;
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
