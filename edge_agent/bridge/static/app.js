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
const STATUS_CLASS = new Map(["idle", "checking", "available", "deferred", "pulling",
                              "installing", "verifying", "rolling_back",
                              "error"].map((s) => [s, s]));
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

  // the image, and the agent's own version (docs/SELF-UPDATE.md), on the device id
  const agentVersion = text(state.agent_version, "");
  cell(row, "id", text(device.id, "?"), "mono",
       text(state.image, "") + (agentVersion ? " · agent " + agentVersion : ""));
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
  const deferred = object(update.deferred);
  if (status === "deferred" && deferred.tag) {
    // "2.0: window until 2026-01-02T02:00:00.000Z" (reason and time as the device said)
    const until = deferred.until ? " until " + text(deferred.until, "?") : "";
    upd.appendChild(el("div", text(deferred.tag, "?") + ": " + text(deferred.reason, "?") +
                    until, "muted"));
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

// -- rollouts (GET /api/v1/rollouts; pause/resume/abort POST) ---------------------------
// Reasons and ids come from devices in the end: textContent only, classes from this list.
const ROLLOUT_CLASS = new Map([["running", "pulling"], ["paused", "warn"], ["halted", "bad"],
                               ["aborted", "bad"], ["succeeded", "ok"], ["pending", "neutral"],
                               ["passed", "ok"], ["timed_out", "bad"], ["sent", "pulling"],
                               ["updating", "pulling"], ["deferred", "warn"],
                               ["offline", "offline"], ["failed", "bad"], ["skipped", "neutral"],
                               ["reverted", "warn"]]);
// which actions a rollout's state allows (the bridge answers 409 to the others)
const ROLLOUT_ACTIONS = [["pause", "Pause", ["running"]], ["resume", "Resume", ["paused"]],
                         ["abort", "Abort", ["running", "paused"]]];
const MAX_ROLLOUTS_SHOWN = 20;
let rolloutsShown = "";  // the last list rendered: redrawn only when it changes (keeps focus)
const rolloutDevicesOpen = new Set();  // rollouts whose device table the operator opened

function when(value) {
  if (typeof value === "number" && isFinite(value)) return new Date(value * 1000).toLocaleTimeString();
  if (typeof value !== "string") return "-";
  const parsed = Date.parse(value);
  return isFinite(parsed) ? new Date(parsed).toLocaleTimeString() : value;
}

function badge(value) {
  return el("span", text(value, "?"), "badge " + classFor(ROLLOUT_CLASS, value));
}

function targetText(spec) {
  const target = object(object(spec).target);
  if (typeof target.group === "string") return "group " + target.group;
  if (target.fleet === true) return "the fleet";
  if (Array.isArray(target.devices)) return target.devices.length + " devices";
  return "?";
}

function headRow(names) {
  const thead = el("thead");
  const tr = el("tr");
  for (const name of names) {
    const th = el("th", name);
    th.scope = "col";
    tr.appendChild(th);
  }
  thead.appendChild(tr);
  return thead;
}

function renderRollout(rollout) {
  const id = text(rollout.id, "?");
  const spec = object(rollout.spec);
  const waves = Array.isArray(rollout.waves) ? rollout.waves : [];
  const article = el("article", null, "rollout");
  article.dataset.rollout = id;
  const titleId = "rollout-title-" + id.replace(/[^A-Za-z0-9_-]/g, "_");
  article.setAttribute("aria-labelledby", titleId);

  const h3 = el("h3");
  h3.id = titleId;
  h3.appendChild(el("span", id, "mono"));
  h3.appendChild(document.createTextNode(" "));
  const state = badge(rollout.state);
  state.dataset.field = "state";
  h3.appendChild(state);
  article.appendChild(h3);

  const counts = object(rollout.counts);
  const summary = Object.keys(counts).filter((k) => counts[k]).map((k) => text(counts[k], "?") + " " + k);
  const about = el("p", "tag " + text(spec.tag, "?") + " to " + targetText(spec) +
                   "; devices: " + (summary.join(", ") || "none"));
  about.dataset.field = "summary";
  article.appendChild(about);
  if (rollout.reason) {
    const reason = el("p", "Reason: " + text(rollout.reason, "?"), "message bad");
    reason.dataset.field = "reason";
    article.appendChild(reason);
  }

  const actions = el("div", null, "rollout-actions");
  for (const [action, label, allowed] of ROLLOUT_ACTIONS) {
    const button = el("button", label);
    button.type = "button";
    button.dataset.action = action;
    button.setAttribute("aria-label", label + " rollout " + id);
    button.disabled = !allowed.includes(rollout.state);
    button.addEventListener("click", () => rolloutAction(id, action));
    actions.appendChild(button);
  }
  article.appendChild(actions);

  const waveTable = el("table", null, "waves");
  const waveCaption = el("caption", "Waves of " + id, "visually-hidden");
  waveTable.appendChild(waveCaption);
  waveTable.appendChild(headRow(["Wave", "State", "Started", "Ended", "Devices"]));
  const waveBody = el("tbody");
  waves.forEach((raw, position) => {
    const wave = object(raw);
    const devices = Array.isArray(wave.devices) ? wave.devices : [];
    const row = el("tr");
    row.dataset.wave = String(position);
    cell(row, "wave", String(position + 1) + " of " + waves.length);
    cell(row, "state", "").appendChild(badge(wave.state));
    cell(row, "started_at", when(wave.started_at), "", text(wave.started_at, ""));
    cell(row, "ended_at", when(wave.ended_at), "", text(wave.ended_at, ""));
    const done = devices.filter((d) => object(d).outcome === "succeeded").length;
    cell(row, "devices", done + " of " + devices.length + " succeeded");
    waveBody.appendChild(row);
  });
  waveTable.appendChild(waveBody);
  article.appendChild(waveTable);

  const details = el("details");
  details.open = rolloutDevicesOpen.has(id);
  details.addEventListener("toggle", () => {
    if (details.open) rolloutDevicesOpen.add(id); else rolloutDevicesOpen.delete(id);
  });
  const total = waves.reduce((n, w) => n + (Array.isArray(object(w).devices) ? w.devices.length : 0), 0);
  details.appendChild(el("summary", "Devices (" + total + ")"));
  const deviceTable = el("table", null, "rollout-devices");
  deviceTable.appendChild(el("caption", "Devices of " + id, "visually-hidden"));
  deviceTable.appendChild(headRow(["Device", "Wave", "Outcome", "Previous tag", "Reason"]));
  const deviceBody = el("tbody");
  waves.forEach((raw, position) => {
    for (const entry of Array.isArray(object(raw).devices) ? raw.devices : []) {
      const device = object(entry);
      const row = el("tr");
      row.dataset.rolloutDevice = text(device.device_id, "");
      cell(row, "device_id", text(device.device_id, "?"), "mono");
      cell(row, "wave", String(position + 1));
      cell(row, "outcome", "").appendChild(badge(device.outcome));
      cell(row, "previous_tag", text(device.previous_tag, "-"), "mono");
      cell(row, "reason", text(device.reason, ""), "muted");
      deviceBody.appendChild(row);
    }
  });
  deviceTable.appendChild(deviceBody);
  details.appendChild(deviceTable);
  article.appendChild(details);
  return article;
}

function renderRollouts(rollouts) {
  const list = Array.isArray(rollouts) ? rollouts.map(object) : [];
  list.sort((a, b) => text(b.created_at, "").localeCompare(text(a.created_at, "")));
  const shown = list.slice(0, MAX_ROLLOUTS_SHOWN);
  const key = JSON.stringify(shown);
  if (key === rolloutsShown) return;
  rolloutsShown = key;
  $("rollouts-empty").hidden = shown.length > 0;
  $("rollout-list").replaceChildren(...shown.map((rollout) => {
    try {
      return renderRollout(rollout);
    } catch (e) {
      return el("p", "a rollout could not be shown: " + e, "muted");
    }
  }));
}

async function refreshRollouts() {
  const { status, data } = await api("GET", "/api/v1/rollouts");
  if (status === 200) {
    renderRollouts(object(data).rollouts);
  } else {
    // 404: a bridge without rollouts; 503: this bridge does not drive them
    $("rollouts-empty").hidden = false;
    $("rollouts-empty").textContent = "Rollouts unavailable (" + status + "): " +
      text(object(data).error, "this bridge does not drive rollouts");
    $("rollout-list").replaceChildren();
    rolloutsShown = "";
  }
}

async function rolloutAction(id, action) {
  const result = $("rollout-result");
  if (action === "abort" && !window.confirm("Abort rollout " + id + "? Devices already updated stay on the new tag.")) {
    return;
  }
  show(result, action + " " + id + "...");
  try {
    const { status, data } = await api("POST", "/api/v1/rollouts/" + encodeURIComponent(id) + "/" + action);
    if (status === 200) {
      show(result, "Rollout " + id + " is " + text(object(data).state, "?") + ".", "ok");
    } else {
      show(result, action + " " + id + " failed (" + status + "): " + text(object(data).error, "?"), "bad");
    }
  } catch (e) {
    show(result, action + " " + id + " failed: " + e, "bad");
  }
  refresh();
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
    await refreshRollouts();
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
