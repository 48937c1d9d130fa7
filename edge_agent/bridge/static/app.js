// edge fleet page: polls GET /api/v1/devices every 2 s and renders a table.
// Plain DOM (textContent only: device data is never parsed as HTML). Device data is
// untrusted: CSS classes come from the fixed lists below, never from a device's strings.
"use strict";

const REFRESH_MS = 2000;
const WAIT_S = 120;
const TOKEN_KEY = "edge-bridge-token";
const NEUTRAL = "neutral";
// value a device reports -> class; anything else gets NEUTRAL
const AVAILABILITY_CLASS = new Map([["online", "online"], ["offline", "offline"],
                                    ["unknown", "unknown"]]);
const STATUS_CLASS = new Map(["idle", "checking", "available", "pulling", "installing",
                              "verifying", "rolling_back", "error"].map((s) => [s, s]));
const HEALTH_CLASS = new Map(["healthy", "unhealthy", "starting", "running", "created",
                              "restarting", "paused", "exited", "dead", "removing",
                              "missing", "unknown"].map((s) => [s, s]));

function classFor(map, value) {
  return typeof value === "string" && map.has(value) ? map.get(value) : NEUTRAL;
}

function text(value, fallback) {
  return typeof value === "string" || typeof value === "number" ? String(value) : fallback;
}

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

function object(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value) ? value : {};
}

function renderDevice(device) {
  const state = object(device.state);
  const desired = object(state.desired);
  const running = object(state.running);
  const update = object(state.update);
  const fallback = object(state.fallback);
  const row = el("tr");
  row.dataset.device = text(device.id, "");
  if (device.availability === "offline") row.className = "is-offline";

  cell(row, "id", text(device.id, "?"), "mono", text(state.image, ""));
  const avail = cell(row, "availability", "");
  avail.appendChild(el("span", text(device.availability, "unknown"),
                       "badge " + classFor(AVAILABILITY_CLASS, device.availability)));

  cell(row, "running", text(state.installed_version, text(running.tag, "-")), "mono",
       text(running.digest, ""));
  let desiredText = text(desired.tag, "-");
  if (desired.source) {
    desiredText += " (" + text(desired.source, "?") +
      (desired.group ? " " + text(desired.group, "?") : "") + ")";
  }
  const want = cell(row, "desired", desiredText, "mono",
                   desired.request_id ? "request " + text(desired.request_id, "?") : "");
  // a device tag that overrides a different group or fleet tag (the device stays put)
  const shadows = object(device.shadows);
  if (shadows.scope) {
    const over = shadows.scope === "group" ? "group " + text(shadows.group, "?") : "fleet";
    want.appendChild(el("div", "shadows " + over + " tag " + text(shadows.tag, "?"),
                        "shadows muted"));
  }

  const status = text(update.status, "unknown");
  const lastError = text(update.last_error, "");
  const upd = cell(row, "update", "", "", lastError);
  upd.appendChild(el("span", status, update.status ? classFor(STATUS_CLASS, status) : "unknown"));
  const progress = update.progress;
  if (typeof progress === "number" && isFinite(progress)) {
    const bar = el("progress");
    bar.max = 100;
    bar.value = Math.min(Math.max(progress, 0), 100);
    upd.appendChild(document.createTextNode(" "));
    upd.appendChild(bar);
    upd.appendChild(el("span", " " + Math.round(bar.value) + "%", "muted"));
  }
  if (lastError) upd.appendChild(el("div", lastError, "muted"));

  const health = running.health || running.status;
  cell(row, "health", text(health, "unknown"), health ? classFor(HEALTH_CLASS, health) : "unknown");
  cell(row, "fallback",
       fallback.active === true ? "yes: wanted " + text(fallback.requested_tag, "?") : "no",
       fallback.active === true ? "warn" : "", text(fallback.reason, ""));
  const lastSeen = text(device.last_seen, "");
  cell(row, "last_seen", ago(lastSeen), "", lastSeen);
  const ev = device.last_event ? object(device.last_event) : null;
  cell(row, "last_event",
       ev ? text(ev.event, "?") + (ev.reason ? ": " + text(ev.reason, "?") : "") : "-",
       ev && ev.event !== "update_succeeded" ? "muted" : "", ev ? text(ev.ts, "") : "");
  return row;
}

// one device that cannot be shown must not take the others with it
function renderRow(device) {
  try {
    return renderDevice(object(device));
  } catch (e) {
    const row = el("tr");
    cell(row, "id", "a device could not be shown: " + e, "muted");
    return row;
  }
}

function render(data) {
  const devices = Array.isArray(data.devices) ? data.devices : [];
  const tbody = document.querySelector("#devices tbody");
  const rows = devices.map(renderRow);
  tbody.replaceChildren(...rows);
  $("empty").hidden = devices.length > 0;
  const online = devices.filter((d) => d && d.availability === "online").length;
  $("summary").textContent = devices.length + " devices, " + online + " online";
  const broker = $("broker");
  broker.textContent = "broker: " + (data.broker_connected ? "connected" : "disconnected");
  broker.className = "badge " + (data.broker_connected ? "ok" : "bad");
  const list = $("device-ids");
  list.replaceChildren(...devices.map((d) => { const o = el("option"); o.value = text(d.id, ""); return o; }));
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
