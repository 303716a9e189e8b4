// FnServe dashboard: plain JavaScript, no build step, no network beyond this server.
// Polls /dashboard/api/state for live figures and recent invocations; opens one
// invocation's record; invokes and replays through the dashboard's own endpoints,
// which take the session cookie and require the CSRF token below.
"use strict";

const POLL_MS = 1500;
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);

let selectedId = null;
let invokeName = null;
let firstLoad = true;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

async function api(method, path, body) {
  const options = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (response.status === 401) {  // the key changed, or the cookie is gone: ask again
    window.location.reload();
    throw new Error("signed out");
  }
  const data = await response.json();
  if (!response.ok && data.code && !("status" in data)) throw new Error(data.error || data.code);
  return data;
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  if (value >= 1000) return (value / 1000).toFixed(2) + " s";
  if (value >= 10) return Math.round(value) + " ms";
  return value.toFixed(1) + " ms";
}

function percent(value) {
  if (value === null || value === undefined) return "–";
  return (value * 100).toFixed(value < 0.1 && value > 0 ? 1 : 0) + " %";
}

function statusBadge(status) {
  const kind = status < 300 ? "ok" : status === 429 || status === 499 ? "warn" : "bad";
  return el("span", { class: "badge " + kind }, status);
}

function outcomeBadge(outcome) {
  const kind = outcome === "ok" ? "ok" : outcome === "cancelled" || outcome === "rejected" ? "warn" : "bad";
  return el("span", { class: "badge " + kind }, outcome);
}

function time(stamp) {
  if (!stamp) return "";
  const date = new Date(stamp);
  return isNaN(date) ? stamp : date.toLocaleTimeString([], { hour12: false }) +
    "." + String(date.getMilliseconds()).padStart(3, "0");
}

// -- functions ---------------------------------------------------------------------

let lastFunctions = "";

function renderFunctions(state) {
  const signature = JSON.stringify([state.functions, state.figures_from]);
  if (signature === lastFunctions) return;  // unchanged: leave the rows (and the buttons) be
  lastFunctions = signature;
  const body = $("functions-body");
  body.replaceChildren();
  if (!state.functions.length) {
    body.append(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "no functions in this directory")));
  }
  for (const fn of state.functions) {
    const figures = fn.figures || {};
    const status = fn.status === "ok"
      ? el("span", { class: "badge ok" }, "ok")
      : el("div", {}, el("span", { class: "badge bad" }, "error"),
           el("div", { class: "problem" }, fn.error || ""));
    body.append(el("tr", { "data-function": fn.name },
      el("td", { class: "name" }, fn.name),
      el("td", {}, fn.runtime),
      el("td", {}, fn.mode || (fn.runtime === "python" ? "process" : "–")),
      el("td", {}, status),
      el("td", { class: "num invocations" }, figures.invocations ?? 0),
      el("td", { class: "num" }, percent(figures.error_rate)),
      el("td", { class: "num" }, ms(figures.p50_ms)),
      el("td", { class: "num" }, ms(figures.p95_ms)),
      el("td", { class: "num" }, el("button", {
        class: "secondary", type: "button", "data-invoke": fn.name,
        onclick: () => openInvoke(fn.name),
      }, "Invoke"))));
  }
  $("figures-source").textContent = state.figures_from === "history"
    ? "figures from the history (its newest " + state.history_max + " invocations, all workers)"
    : "figures from this worker's statistics since it started (history is off)";
}

// -- recent invocations -------------------------------------------------------------

const rowsById = new Map();  // a record never changes: its row is built once and kept

function invocationRow(item, fresh) {
  return el("tr", {
    "data-request-id": item.request_id,
    class: fresh ? "fresh" : "",
    onclick: () => openDetail(item.request_id),
  },
    el("td", {}, time(item.started_at)),
    el("td", { class: "name" }, item.function),
    el("td", {}, item.source + (item.replay_of ? " ↺" : "")),
    el("td", {}, statusBadge(item.status)),
    el("td", {}, outcomeBadge(item.outcome)),
    el("td", { class: "num" }, ms(item.duration_ms)),
    el("td", { class: "mono" }, item.request_id));
}

function renderInvocations(state) {
  const body = $("invocations-body");
  $("history-note").textContent = state.history ? "newest first, updated live" : "the history is off";
  if (!state.invocations.length) {
    rowsById.clear();
    body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" },
      state.history ? "no invocations yet: invoke a function" : "start the server with --history to record invocations")));
    return;
  }
  const rows = state.invocations.map((item) => {
    let row = rowsById.get(item.request_id);
    if (!row) {
      row = invocationRow(item, !firstLoad);
      rowsById.set(item.request_id, row);
    }
    row.classList.toggle("selected", item.request_id === selectedId);
    return row;
  });
  const keep = new Set(state.invocations.map((item) => item.request_id));
  for (const id of rowsById.keys()) if (!keep.has(id)) rowsById.delete(id);
  // only touch the DOM when the list changed, so a row a user (or a test) holds stays
  const same = rows.length === body.children.length && rows.every((row, i) => body.children[i] === row);
  if (!same) body.replaceChildren(...rows);
  firstLoad = false;
}

async function poll() {
  try {
    const state = await api("GET", "/dashboard/api/state");
    renderFunctions(state);
    renderInvocations(state);
    $("live-dot").className = "dot on";
    $("live-text").textContent = "live · " + new Date().toLocaleTimeString([], { hour12: false });
  } catch (error) {
    $("live-dot").className = "dot off";
    $("live-text").textContent = "server unreachable";
  }
}

// -- one invocation -------------------------------------------------------------------

function fact(name, value) {
  return [el("dt", {}, name), el("dd", {}, value === null || value === undefined || value === "" ? "–" : value)];
}

function pretty(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
}

async function openDetail(requestId) {
  selectedId = requestId;
  for (const row of document.querySelectorAll("#invocations-body tr")) {
    row.classList.toggle("selected", row.dataset.requestId === requestId);
  }
  const record = await api("GET", "/dashboard/api/invocations/" + encodeURIComponent(requestId));
  $("detail-card").hidden = false;
  $("replay-result").hidden = true;
  $("detail-id").textContent = record.request_id;
  $("detail-facts").replaceChildren(
    ...fact("function", record.function), ...fact("status", record.status),
    ...fact("outcome", record.outcome), ...fact("duration", ms(record.duration_ms)),
    ...fact("source", record.source),
    ...fact("started", (record.started_at || "").replace("T", " ").slice(0, 23)),
    ...fact("exit code", record.exit_code ?? (record.signal ? "signal " + record.signal : null)),
    ...fact("trace id", record.trace_id),
    ...fact("parameters", Object.keys(record.parameters).length ? JSON.stringify(record.parameters) : ""),
    ...fact("replay of", record.replay_of),
    ...fact("method", record.method));
  $("detail-request").textContent = pretty(record.request);
  $("detail-request-note").textContent = record.request_truncated ? "(first 64 KiB)" : "";
  $("detail-response").textContent = pretty(record.response);
  $("detail-response-note").textContent = record.response_truncated ? "(first 64 KiB)" : "";
  $("detail-stderr").textContent = record.stderr || "(nothing)";
  $("replay-button").disabled = record.request_truncated;
  $("detail-card").scrollIntoView({ behavior: "smooth", block: "nearest" });
  $("replay-button").title = record.request_truncated ? "the recorded input was cut at 64 KiB" : "";
}

function showResult(target, answer) {
  target.hidden = false;
  target.replaceChildren(
    el("div", { class: "meta" },
      statusBadge(answer.status),
      el("span", {}, ms(answer.duration_ms)),
      el("span", {}, answer.content_type || ""),
      el("code", { class: "request-id" }, answer.request_id || "")),
    el("pre", { class: "response-body" }, pretty(answer.body)));
}

async function replay() {
  const button = $("replay-button");
  button.disabled = true;
  try {
    const answer = await api("POST", "/dashboard/api/replay/" + encodeURIComponent(selectedId));
    showResult($("replay-result"), answer);
    poll();
  } catch (error) {
    $("replay-result").hidden = false;
    $("replay-result").replaceChildren(el("p", { class: "error" }, error.message));
  } finally {
    button.disabled = false;
  }
}

// -- the invoke form -----------------------------------------------------------------

function openInvoke(name) {
  invokeName = name;
  $("invoke-card").hidden = false;
  $("invoke-name").textContent = name;
  $("invoke-result").hidden = true;
  $("invoke-error").textContent = "";
  $("invoke-event").focus();
}

function parseParams(text) {
  const params = {};
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const at = line.indexOf("=");
    if (at < 1) throw new Error("parameters: expected key=value, got " + JSON.stringify(line));
    params[line.slice(0, at).trim()] = line.slice(at + 1);
  }
  return params;
}

async function invoke(event) {
  event.preventDefault();
  $("invoke-error").textContent = "";
  let params;
  const text = $("invoke-event").value;
  try {
    if (text.trim()) JSON.parse(text);
    params = parseParams($("invoke-params").value);
  } catch (error) {
    $("invoke-error").textContent = error.message.startsWith("parameters")
      ? error.message : "event is not JSON: " + error.message;
    return;
  }
  $("invoke-run").disabled = true;
  try {
    const answer = await api("POST", "/dashboard/api/invoke/" + encodeURIComponent(invokeName),
      { event: text, parameters: params });
    showResult($("invoke-result"), answer);
    poll();
  } catch (error) {
    $("invoke-error").textContent = error.message;
  } finally {
    $("invoke-run").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("invoke-form").addEventListener("submit", invoke);
  $("invoke-close").addEventListener("click", () => { $("invoke-card").hidden = true; });
  $("detail-close").addEventListener("click", () => { $("detail-card").hidden = true; selectedId = null; });
  $("replay-button").addEventListener("click", replay);
  poll();
  setInterval(() => { if (!document.hidden) poll(); }, POLL_MS);
});
