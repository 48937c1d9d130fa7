// edge fleet console: a page of devices (GET /api/v1/devices with filters), the fleet's
// counts (GET /api/v1/fleet/summary) and live changes over server-sent events read with
// fetch() (GET /api/v1/stream: the token goes in the Authorization header, never in a URL).
// Plain DOM (textContent only: device data is never parsed as HTML). Device data is
// untrusted: CSS classes come from the fixed lists below, never from a device's strings.
"use strict";

const ROLLOUT_REFRESH_MS = 2000;
const RECONNECT_MS = 2000;
const RELOAD_DEBOUNCE_MS = 1000;
const PAGE_SIZE = 50;
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
const COUNT_LABELS = [["online", "online"], ["offline", "offline"], ["updating", "updating"],
                      ["failed", "failed"], ["fallback", "on fallback"], ["deferred", "deferred"],
                      ["available", "update available"], ["unknown", "unknown"]];
const COUNT_CLASS = new Map([["online", "ok"], ["offline", "bad"], ["updating", "warn"],
                             ["failed", "bad"], ["fallback", "warn"], ["deferred", "warn"],
                             ["available", "warn"], ["unknown", "neutral"]]);

const view = { q: "", group: "", tag: "", status: "", sort: "id", offset: 0, total: 0 };
let shown = new Map();  // device id -> its row on this page
let selected = null;  // the device whose detail is open
let streamAbort = null;
let reloadTimer = null;

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

// "no healthcheck" said plainly: a running container without a HEALTHCHECK has no verdict
function healthText(running) {
  if (typeof running.health === "string") return running.health;
  if (running.status === "running") return "no healthcheck (running)";
  return text(running.status, "unknown");
}

function healthClass(running) {
  if (typeof running.health === "string") return classFor(HEALTH_CLASS, running.health);
  return running.status === "running" ? NEUTRAL : classFor(HEALTH_CLASS, running.status);
}

function progressBar(value, label) {
  const bar = el("progress");
  bar.max = 100;
  bar.value = Math.min(Math.max(value, 0), 100);
  bar.setAttribute("aria-label", label);
  return bar;
}

function desiredText(desired) {
  let out = text(desired.tag, "-");
  if (desired.source) {
    out += " (" + text(desired.source, "?") + (desired.group ? " " + text(desired.group, "?") : "") + ")";
  }
  return out;
}

function renderDevice(device) {
  const state = object(device.state);
  const desired = object(state.desired);
  const running = object(state.running);
  const update = object(state.update);
  const fallback = object(state.fallback);
  const row = el("tr");
  const id = text(device.id, "");
  row.dataset.device = id;
  if (device.availability === "offline") row.className = "is-offline";

  // the image, and the agent's own version (docs/SELF-UPDATE.md), on the device id
  const agentVersion = text(state.agent_version, "");
  const idCell = cell(row, "id", "", "mono",
                      text(state.image, "") + (agentVersion ? " · agent " + agentVersion : ""));
  const open = el("button", text(device.id, "?"), "link mono");
  open.type = "button";
  open.setAttribute("aria-label", "Details of " + text(device.id, "?"));
  open.addEventListener("click", () => openDetail(id));
  idCell.appendChild(open);
  const avail = cell(row, "availability", "");
  avail.appendChild(el("span", text(device.availability, "unknown"),
                       "badge " + classFor(AVAILABILITY_CLASS, device.availability)));

  cell(row, "running", text(state.installed_version, text(running.tag, "-")), "mono",
       text(running.digest, ""));
  const want = cell(row, "desired", desiredText(desired), "mono",
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
    const bar = progressBar(progress, "pull progress of " + id);
    upd.appendChild(document.createTextNode(" "));
    upd.appendChild(bar);
    upd.appendChild(el("span", " " + Math.round(bar.value) + "%", "muted"));
  }
  const deferred = object(update.deferred);
  if (status === "deferred" && deferred.tag) {
    const until = deferred.until ? " until " + text(deferred.until, "?") : "";
    upd.appendChild(el("div", text(deferred.tag, "?") + ": " + text(deferred.reason, "?") +
                    until, "muted"));
  }
  if (lastError) upd.appendChild(el("div", lastError, "muted"));

  cell(row, "health", healthText(running), healthClass(running));
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

// -- the list: one page, filtered and sorted by the bridge --------------------------------
function listPath() {
  const params = new URLSearchParams();
  for (const name of ["q", "group", "tag", "status"]) if (view[name]) params.set(name, view[name]);
  params.set("sort", view.sort);
  params.set("limit", String(PAGE_SIZE));
  params.set("offset", String(view.offset));
  return "/api/v1/devices?" + params.toString();
}

async function loadList() {
  if (!token()) {
    show($("message"), "Enter the bridge token (BRIDGE_TOKEN) to see the fleet.", "warn");
    return;
  }
  try {
    const { status, data } = await api("GET", listPath());
    if (status === 401) {
      show($("message"), "The token was refused (401). Enter the right one.", "bad");
      return;
    }
    if (status !== 200) {
      show($("message"), "Bridge answered " + status + ": " + text(object(data).error, "?"), "bad");
      return;
    }
    show($("message"), "");
    renderList(object(data));
  } catch (e) {
    show($("message"), "Bridge unreachable: " + e, "bad");
  }
}

function renderList(data) {
  const devices = Array.isArray(data.devices) ? data.devices : [];
  view.total = typeof data.total === "number" ? data.total : devices.length;
  shown = new Map();
  const rows = devices.map((d) => {
    const row = renderRow(d);
    shown.set(text(object(d).id, ""), row);
    return row;
  });
  document.querySelector("#devices tbody").replaceChildren(...rows);
  $("empty").hidden = devices.length > 0;
  const first = devices.length ? view.offset + 1 : 0;
  $("page-info").textContent = first + "-" + (view.offset + devices.length) + " of " + view.total;
  $("page-prev").disabled = view.offset === 0;
  $("page-next").disabled = view.offset + devices.length >= view.total;
  $("device-ids").replaceChildren(...devices.map((d) => {
    const o = el("option");
    o.value = text(object(d).id, "");
    return o;
  }));
  setBroker(data.broker_connected);
  $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  for (const th of document.querySelectorAll("#devices th[data-sort]")) {
    const field = th.dataset.sort;
    th.setAttribute("aria-sort", view.sort === field ? "ascending"
      : view.sort === "-" + field ? "descending" : "none");
  }
}

function scheduleReload() {
  if (reloadTimer) return;
  reloadTimer = setTimeout(() => { reloadTimer = null; loadList(); }, RELOAD_DEBOUNCE_MS);
}

function setBroker(connected) {
  const broker = $("broker");
  broker.textContent = "broker: " + (connected ? "connected" : "disconnected");
  broker.className = "badge " + (connected ? "ok" : "bad");
}

function setLink(up) {
  const link = $("link");
  link.textContent = "bridge: " + (up ? "live" : "disconnected");
  link.className = "badge " + (up ? "ok" : "bad");
}

// -- overview: counts and the version distribution ---------------------------------------
function renderSummary(summary) {
  const data = object(summary);
  const counts = object(data.counts);
  const items = [el("li", text(data.devices, 0) + " devices", "count")];
  for (const [key, label] of COUNT_LABELS) {
    const li = el("li", null, "count");
    li.dataset.count = key;
    li.appendChild(el("span", text(counts[key], 0), "badge " + COUNT_CLASS.get(key)));
    li.appendChild(document.createTextNode(" " + label));
    items.push(li);
  }
  $("counts").replaceChildren(...items);
  const versions = Array.isArray(data.versions) ? data.versions.map(object) : [];
  const top = Math.max(1, ...versions.map((v) => (typeof v.devices === "number" ? v.devices : 0)));
  $("versions").replaceChildren(...versions.map((v) => {
    const n = typeof v.devices === "number" ? v.devices : 0;
    const li = el("li");
    li.dataset.version = text(v.tag, "");
    const filter = el("button", text(v.tag, "?"), "link mono version-tag");
    filter.type = "button";
    filter.setAttribute("aria-label", "Show devices running " + text(v.tag, "?"));
    filter.addEventListener("click", () => { $("filter-tag").value = text(v.tag, ""); applyFilter(); });
    li.appendChild(filter);
    const bar = el("span", null, "bar");
    bar.style.width = Math.round((n / top) * 100) + "%";
    bar.setAttribute("aria-hidden", "true");
    const track = el("span", null, "track");
    track.appendChild(bar);
    li.appendChild(track);
    li.appendChild(el("span", String(n), "version-count"));
    return li;
  }));
}

async function loadSummary() {
  const { status, data } = await api("GET", "/api/v1/fleet/summary");
  if (status === 200) {
    renderSummary(data);
    setBroker(object(data).broker_connected);
  }
}

// -- live: server-sent events over fetch() -------------------------------------------------
function onStreamEvent(name, data) {
  if (name === "hello") {
    renderSummary(data);
    setBroker(data.broker_connected);
  } else if (name === "broker") {
    setBroker(data.broker_connected);
  } else if (name === "resync") {
    renderSummary(data.summary);
    scheduleReload();
    if (selected) loadDetail();
  } else if (name === "devices") {
    renderSummary(data.summary);
    let membership = Array.isArray(data.gone) && data.gone.some((id) => shown.has(id));
    for (const device of Array.isArray(data.devices) ? data.devices.map(object) : []) {
      const id = text(device.id, "");
      const row = shown.get(id);
      if (row) {
        const fresh = renderRow(device);
        row.replaceWith(fresh);
        shown.set(id, fresh);
      } else if (object(data.summary).devices !== view.total) {
        // a new device may belong on this page; one already counted is on another page
        // of this list (sorted by id, unfiltered: the check below covers the rest)
        membership = true;
      }
      if (id === selected) loadDetail();
    }
    // a filtered or sorted page may gain or lose devices: ask for it again
    if (membership || view.status || view.q || view.tag || view.group || view.sort !== "id") {
      scheduleReload();
    }
    $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  }
}

async function connectStream() {
  if (!token() || streamAbort) return;
  const controller = new AbortController();
  streamAbort = controller;
  try {
    const response = await fetch("/api/v1/stream", {
      headers: { Authorization: "Bearer " + token(), Accept: "text/event-stream" },
      cache: "no-store", signal: controller.signal });
    if (response.status !== 200 || !response.body) throw new Error("status " + response.status);
    setLink(true);
    loadList();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        let data = "";
        for (const line of frame.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (!data) continue;
        try {
          onStreamEvent(name, object(JSON.parse(data)));
        } catch (e) {
          // one bad message must not end the stream
        }
      }
    }
  } catch (e) {
    // fall through: reconnect
  }
  if (streamAbort === controller) {
    streamAbort = null;
    setLink(false);
    if (token()) setTimeout(connectStream, RECONNECT_MS);
  }
}

function stopStream() {
  if (streamAbort) {
    const controller = streamAbort;
    streamAbort = null;
    controller.abort();
  }
}

// -- device detail -------------------------------------------------------------------------
function field(list, name, value, className) {
  const dt = el("dt", name);
  const dd = el("dd", value, className);
  dd.dataset.field = name.toLowerCase().replace(/[^a-z]+/g, "_");
  list.appendChild(dt);
  list.appendChild(dd);
  return dd;
}

function renderDetail(device) {
  const state = object(device.state);
  const desired = object(state.desired);
  const running = object(state.running);
  const update = object(state.update);
  const fallback = object(state.fallback);
  const deferred = object(update.deferred);
  $("detail-title").textContent = "Device " + text(device.id, "?");
  const list = el("dl", null, "fields");
  list.id = "detail-fields";
  field(list, "Availability", text(device.availability, "unknown"));
  field(list, "Desired", desiredText(desired), "mono");
  field(list, "Desired request", text(desired.request_id, "-"), "mono");
  field(list, "Running", text(running.tag, text(state.installed_version, "-")), "mono");
  field(list, "Digest", text(running.digest, "-"), "mono");
  field(list, "Image", text(state.image, "-"), "mono");
  field(list, "Agent version", text(state.agent_version, "-"), "mono");
  field(list, "Groups", Array.isArray(state.groups) && state.groups.length
    ? state.groups.map((g) => text(g, "?")).join(", ") : "none");
  field(list, "Health", healthText(running), healthClass(running));
  field(list, "Update", text(update.status, "unknown"),
        update.status ? classFor(STATUS_CLASS, update.status) : "unknown");
  field(list, "Last check", text(update.last_check_at, "never"));
  field(list, "Last success", text(update.last_success_at, "never"));
  field(list, "Last error", text(update.last_error, "none"), update.last_error ? "error-text" : "");
  field(list, "Fallback", fallback.active === true
    ? "yes: wanted " + text(fallback.requested_tag, "?") + "; " + text(fallback.reason, "?") : "no");
  field(list, "Deferred", deferred.tag ? text(deferred.tag, "?") + ": " + text(deferred.reason, "?") +
    (deferred.detail ? " (" + text(deferred.detail, "?") + ")" : "") +
    (deferred.until ? " until " + text(deferred.until, "?") : "") : "no");
  field(list, "Last seen", text(device.last_seen, "never"));
  $("detail-fields").replaceWith(list);
  const progress = $("detail-progress");
  progress.replaceChildren();
  if (typeof update.progress === "number" && isFinite(update.progress)) {
    progress.appendChild(el("span", "Pull progress ", "muted"));
    progress.appendChild(progressBar(update.progress, "pull progress"));
    progress.appendChild(el("span", " " + Math.round(update.progress) + "%", "muted"));
  }
  const events = Array.isArray(device.recent_events) ? device.recent_events.map(object) : [];
  $("detail-events").querySelector("tbody").replaceChildren(...events.reverse().map((ev) => {
    const row = el("tr");
    cell(row, "ts", text(ev.ts, "-"));
    cell(row, "event", text(ev.event, "?"));
    cell(row, "request_id", text(ev.request_id, "-"), "mono");
    cell(row, "tag", text(ev.tag, "-"), "mono");
    cell(row, "reason", text(ev.reason, text(ev.error, "")));
    return row;
  }));
}

async function loadDetail() {
  if (!selected) return;
  const id = selected;
  const { status, data } = await api("GET", "/api/v1/devices/" + encodeURIComponent(id));
  if (id !== selected) return;
  if (status === 200) {
    try {
      renderDetail(object(data));
    } catch (e) {
      $("detail-title").textContent = "Device " + id + " could not be shown: " + e;
    }
  } else {
    $("detail-title").textContent = "Device " + id + ": " + text(object(data).error, String(status));
  }
}

function openDetail(id) {
  selected = id;
  $("detail").hidden = false;
  $("set-scope").value = "device";
  scopeButtons();
  $("set-device").value = id;
  loadDetail().then(() => $("detail-title").focus());
}

// -- actions ----------------------------------------------------------------------------
function scopePath(scope, target) {
  if (scope === "fleet") return "/api/v1/fleet";
  return "/api/v1/" + (scope === "group" ? "groups/" : "devices/") + encodeURIComponent(target);
}

function describe(scope, target) {
  return scope === "fleet" ? "the whole fleet" : scope + " " + target;
}

function answerText(status, data) {
  const body = object(data);
  if (status === 200 && body.result !== undefined) return "answered: " + text(body.result, "ok");
  if (status === 200 && body.cleared) return "cleared.";
  if (status === 202) {
    const warnings = Array.isArray(body.warnings) ? " Warnings: " + body.warnings.map((w) => text(w, "?")).join("; ") : "";
    return "published (request " + text(body.request_id, "?") + ")." + warnings;
  }
  return "failed (" + status + "): " + text(body.error, "?");
}

async function act(action, scope, target, tag) {
  const result = $("set-result");
  if (!token()) {
    show(result, "Enter the token first (top right).", "bad");
    $("token").focus();
    return;
  }
  if (scope !== "fleet" && !target) {
    show(result, "Name the " + scope + " first.", "bad");
    return;
  }
  const who = describe(scope, target);
  if (scope !== "device" && !window.confirm(
    (action === "set" ? "Set tag " + tag + " for " : action === "clear" ? "Clear the tag of " : "Send " + action + " to ") +
    who + "? This touches every device in it.")) {
    show(result, "Cancelled.", "");
    return;
  }
  const wait = action === "set" && scope === "device" && $("set-wait").checked;
  let method = "PUT";
  let path = scopePath(scope, target) + "/tag";
  let body;
  if (action === "set") {
    body = { tag };
    if (wait) path += "?wait=" + WAIT_S;
  } else if (action === "clear") {
    method = "DELETE";
  } else {
    method = "POST";
    path = scopePath(scope, target) + "/" + action;
  }
  for (const id of ["set-submit", "set-clear", "set-check", "set-install"]) $(id).disabled = true;
  show(result, action + " for " + who + (wait ? "; waiting for the device..." : "..."));
  try {
    const { status, data } = await api(method, path, body);
    const ok = status === 200 || status === 202;
    let message = "";
    if (action === "set" && status === 200) message = target + " now runs " + tag + ".";
    else if (action === "set" && status === 202) message = "Published " + tag + " for " + who + " (request " + text(object(data).request_id, "?") + ").";
    else message = (action === "set" ? "Set " + tag + " for " : action + " for ") + who + ": " + answerText(status, data);
    show(result, message, ok ? "ok" : "bad");
  } catch (e) {
    show(result, "Request failed: " + e, "bad");
  } finally {
    for (const id of ["set-submit", "set-clear"]) $(id).disabled = false;
    scopeButtons();
  }
}

// The bridge checks one device or the whole fleet, and installs on one device only
// (notify mode is a device's choice): the buttons follow the chosen scope.
function scopeButtons() {
  const scope = $("set-scope").value;
  $("set-check").disabled = scope === "group";
  $("set-install").disabled = scope !== "device";
}

function formAct(action) {
  const scope = $("set-scope").value;
  const target = $("set-device").value.trim();
  const tag = $("set-tag").value.trim();
  if (action === "set" && !tag) {
    show($("set-result"), "Enter a tag.", "bad");
    return;
  }
  act(action, scope, target, tag);
}

function applyFilter(event) {
  if (event) event.preventDefault();
  view.q = $("filter-q").value.trim();
  view.group = $("filter-group").value.trim();
  view.tag = $("filter-tag").value.trim();
  view.status = $("filter-status").value;
  view.offset = 0;
  loadList();
}

function sortBy(field) {
  view.sort = view.sort === field ? "-" + field : field;
  view.offset = 0;
  loadList();
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
  refreshRollouts();
}


function parseWaves(value) {
  return value.split(",").map((w) => w.trim()).filter((w) => w).map((w) => (/^[0-9]+$/.test(w) ? Number(w) : w));
}

async function startRollout(event) {
  event.preventDefault();
  const result = $("rollout-result");
  const kind = $("rollout-target-kind").value;
  const value = $("rollout-target").value.trim();
  const target = kind === "fleet" ? { fleet: true }
    : kind === "group" ? { group: value }
      : { devices: value.split(",").map((d) => d.trim()).filter((d) => d) };
  const spec = { tag: $("rollout-tag").value.trim(), target,
                 waves: parseWaves($("rollout-waves").value),
                 max_updating: Number($("rollout-max").value) || 1,
                 on_halt: $("rollout-on-halt").value };
  const who = kind === "fleet" ? "the whole fleet" : kind + " " + value;
  if (!window.confirm("Start a rollout of " + spec.tag + " to " + who + "?")) return;
  show(result, "Starting a rollout of " + spec.tag + "...");
  try {
    const { status, data } = await api("POST", "/api/v1/rollouts", spec);
    if (status === 201) show(result, "Rollout " + text(object(data).id, "?") + " started.", "ok");
    else show(result, "Rollout refused (" + status + "): " + text(object(data).error, "?"), "bad");
  } catch (e) {
    show(result, "Request failed: " + e, "bad");
  }
  refreshRollouts();
}

function saveToken(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  $("token").placeholder = value ? "token set" : "BRIDGE_TOKEN";
  stopStream();
  start();
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  $("token").placeholder = "BRIDGE_TOKEN";
  stopStream();
  document.querySelector("#devices tbody").replaceChildren();
  shown = new Map();
  setLink(false);
  loadList();
}

function start() {
  if (!token()) {
    loadList();
    return;
  }
  loadList();
  loadSummary();
  refreshRollouts();
  connectStream();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", saveToken);
  $("token-forget").addEventListener("click", forgetToken);
  $("set-form").addEventListener("submit", (event) => { event.preventDefault(); formAct("set"); });
  $("set-clear").addEventListener("click", () => formAct("clear"));
  $("set-check").addEventListener("click", () => formAct("check"));
  $("set-install").addEventListener("click", () => formAct("install"));
  $("set-scope").addEventListener("change", scopeButtons);
  scopeButtons();
  $("filter-form").addEventListener("submit", applyFilter);
  $("filter-status").addEventListener("change", applyFilter);
  $("filter-clear").addEventListener("click", () => {
    for (const id of ["filter-q", "filter-group", "filter-tag", "filter-status"]) $(id).value = "";
    applyFilter();
  });
  for (const th of document.querySelectorAll("#devices th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => sortBy(th.dataset.sort));
  }
  $("page-prev").addEventListener("click", () => { view.offset = Math.max(0, view.offset - PAGE_SIZE); loadList(); });
  $("page-next").addEventListener("click", () => { view.offset += PAGE_SIZE; loadList(); });
  $("detail-check").addEventListener("click", () => selected && act("check", "device", selected));
  $("detail-install").addEventListener("click", () => selected && act("install", "device", selected));
  $("detail-clear").addEventListener("click", () => selected && act("clear", "device", selected));
  $("detail-close").addEventListener("click", () => { selected = null; $("detail").hidden = true; });
  $("detail-title").tabIndex = -1;
  $("rollout-form").addEventListener("submit", startRollout);
  if (token()) $("token").placeholder = "token set";
  setLink(false);
  start();
  setInterval(() => { if (token()) refreshRollouts(); }, ROLLOUT_REFRESH_MS);
  // "last seen" ages on the page without asking the bridge
  setInterval(() => {
    for (const td of document.querySelectorAll('#devices td[data-field="last_seen"]')) {
      if (td.title) td.textContent = ago(td.title);
    }
  }, 5000);
});
