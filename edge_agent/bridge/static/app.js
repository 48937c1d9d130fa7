// edge fleet page: polls GET /api/v1/devices every 2 s and renders a table.
// Plain DOM (textContent only: device data is never parsed as HTML).
"use strict";

const REFRESH_MS = 2000;
const WAIT_S = 120;
const TOKEN_KEY = "edge-bridge-token";

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function show(node, text, kind) {
  node.textContent = text;
  node.className = "message" + (kind ? " " + kind : "");
  node.hidden = !text;
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (!isFinite(seconds)) return iso;
  if (seconds < 2) return "just now";
  if (seconds < 120) return seconds + " s ago";
  if (seconds < 7200) return Math.round(seconds / 60) + " min ago";
  if (seconds < 172800) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token() };
  const options = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = { error: "not JSON (" + response.status + ")" };
  }
  return { status: response.status, data };
}

function cell(row, field, text, className, title) {
  const td = el("td", text, className);
  td.dataset.field = field;
  if (title) td.title = title;
  row.appendChild(td);
  return td;
}

function renderDevice(device) {
  const state = device.state || {};
  const desired = state.desired || {};
  const running = state.running || {};
  const update = state.update || {};
  const fallback = state.fallback || {};
  const row = el("tr");
  row.dataset.device = device.id;
  if (device.availability === "offline") row.className = "is-offline";

  cell(row, "id", device.id, "mono", state.image || "");
  const avail = cell(row, "availability", "");
  avail.appendChild(el("span", device.availability, "badge " + device.availability));

  cell(row, "running", state.installed_version || running.tag || "-", "mono",
       running.digest || "");
  let desiredText = desired.tag || "-";
  if (desired.source) {
    desiredText += " (" + desired.source + (desired.group ? " " + desired.group : "") + ")";
  }
  cell(row, "desired", desiredText, "mono", desired.request_id ? "request " + desired.request_id : "");

  const status = update.status || "unknown";
  const upd = cell(row, "update", "", "", update.last_error || "");
  upd.appendChild(el("span", status, status));
  if (typeof update.progress === "number") {
    const bar = el("progress");
    bar.max = 100;
    bar.value = update.progress;
    upd.appendChild(document.createTextNode(" "));
    upd.appendChild(bar);
    upd.appendChild(el("span", " " + Math.round(update.progress) + "%", "muted"));
  }
  if (update.last_error) upd.appendChild(el("div", update.last_error, "muted"));

  const health = running.health || running.status || "unknown";
  cell(row, "health", health, health);
  cell(row, "fallback", fallback.active ? "yes: wanted " + (fallback.requested_tag || "?") : "no",
       fallback.active ? "warn" : "", fallback.reason || "");
  cell(row, "last_seen", ago(device.last_seen), "", device.last_seen || "");
  const ev = device.last_event;
  cell(row, "last_event", ev ? ev.event + (ev.reason ? ": " + ev.reason : "") : "-",
       ev && ev.event !== "update_succeeded" ? "muted" : "", ev ? ev.ts || "" : "");
  return row;
}

function render(data) {
  const devices = data.devices || [];
  const tbody = document.querySelector("#devices tbody");
  const rows = devices.map(renderDevice);
  tbody.replaceChildren(...rows);
  $("empty").hidden = devices.length > 0;
  const online = devices.filter((d) => d.availability === "online").length;
  $("summary").textContent = devices.length + " devices, " + online + " online";
  const broker = $("broker");
  broker.textContent = "broker: " + (data.broker_connected ? "connected" : "disconnected");
  broker.className = "badge " + (data.broker_connected ? "ok" : "bad");
  const list = $("device-ids");
  list.replaceChildren(...devices.map((d) => { const o = el("option"); o.value = d.id; return o; }));
  $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
}

async function refresh() {
  if (!token()) {
    show($("message"), "Enter the bridge token (BRIDGE_TOKEN) to see the fleet.", "warn");
    return;
  }
  try {
    const { status, data } = await api("GET", "/api/v1/devices");
    if (status === 401) {
      show($("message"), "The token was refused (401). Enter the right one.", "bad");
      return;
    }
    if (status !== 200) {
      show($("message"), "Bridge answered " + status + ": " + (data && data.error), "bad");
      return;
    }
    show($("message"), "");
    render(data);
  } catch (e) {
    show($("message"), "Bridge unreachable: " + e, "bad");
  }
}

async function setTag(event) {
  event.preventDefault();
  const result = $("set-result");
  if (!token()) {
    show(result, "Enter the token first (top right).", "bad");
    $("token").focus();
    return;
  }
  const device = $("set-device").value.trim();
  const tag = $("set-tag").value.trim();
  const wait = $("set-wait").checked;
  const path = "/api/v1/devices/" + encodeURIComponent(device) + "/tag" +
    (wait ? "?wait=" + WAIT_S : "");
  $("set-submit").disabled = true;
  show(result, "Setting " + device + " to " + tag + (wait ? "; waiting for the device..." : "..."));
  try {
    const { status, data } = await api("PUT", path, { tag });
    if (status === 200) {
      show(result, device + " now runs " + tag + ".", "ok");
    } else if (status === 202) {
      show(result, "Published " + tag + " for " + device + " (request " + data.request_id + ").", "ok");
    } else {
      show(result, "Failed (" + status + "): " + (data && data.error), "bad");
    }
  } catch (e) {
    show(result, "Request failed: " + e, "bad");
  } finally {
    $("set-submit").disabled = false;
    refresh();
  }
}

function saveToken(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  $("token").placeholder = value ? "token set" : "BRIDGE_TOKEN";
  refresh();
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  $("token").placeholder = "BRIDGE_TOKEN";
  $("devices").querySelector("tbody").replaceChildren();
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", saveToken);
  $("token-forget").addEventListener("click", forgetToken);
  $("set-form").addEventListener("submit", setTag);
  if (token()) $("token").placeholder = "token set";
  refresh();
  setInterval(refresh, REFRESH_MS);
});
