// opendps fleet dashboard: plain JavaScript, no dependencies, no build step (issue 19).
//
// Sign-in: the user pastes a DPS service connection string. Its key is kept in this tab's sessionStorage and
// imported into WebCrypto as a non-extractable HMAC key; every API call carries a short-lived
// "SharedAccessSignature sr=<HostName>&sig=<HMAC-SHA256(sr + "\n" + se)>&se=<expiry>&skn=<policy>" signed here, the
// same token `opendps` CLI signs (src/opendps/transport/sas.py). The key itself is never sent anywhere.
// Everything shown comes from the management API of this origin; text is always set with textContent (never as
// markup), and the page's Content-Security-Policy allows no inline script.
"use strict";

const STORE_KEY = "opendps.credential";
const TOKEN_TTL = 600; // seconds a signed token lives
const REFRESH_MS = 30000;
const DAY_MS = 86400000;
const POLICY_NAMESPACES = 20; // namespaces whose policies the overview lists: one request each, so a bounded number

const state = {
  credential: null, // {host, name, key: CryptoKey} or {token, expiry}
  token: null, tokenExpiry: 0, skew: 0,
  hubs: [], devices: {tokens: [""], index: 0}, enrollments: {tokens: [""], index: 0},
  timer: null, stream: null,
};

// ---- small DOM helpers ----
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", {colspan: columns, class: "muted"}, empty))]));
}

function showError(message) { $("error").textContent = message || ""; }

// times are shown in UTC, as the API gives them
function utc(iso, withTime = true) {
  if (!iso) return "";
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  const text = d.toISOString();
  return withTime ? text.slice(0, 16).replace("T", " ") + "Z" : text.slice(0, 10);
}

function daysUntil(iso) { return Math.floor((new Date(iso) - Date.now()) / DAY_MS); }

// ---- credentials and tokens (WebCrypto HMAC-SHA256) ----
function b64decode(text) {
  const raw = atob(text.trim());
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

function b64encode(buffer) {
  return btoa(String.fromCharCode(...new Uint8Array(buffer)));
}

function parseConnectionString(text) {
  const parts = {};
  for (const part of text.trim().split(";")) {
    if (!part.trim()) continue;
    const at = part.indexOf("=");
    if (at < 1) throw new Error(`"${part.slice(0, 40)}" is not Name=Value`);
    parts[part.slice(0, at).trim()] = part.slice(at + 1).trim(); // keys may contain '='
  }
  for (const name of ["HostName", "SharedAccessKeyName", "SharedAccessKey"]) {
    if (!parts[name]) throw new Error(`the connection string lacks ${name}`);
  }
  return {host: parts.HostName, name: parts.SharedAccessKeyName, key: parts.SharedAccessKey};
}

async function credentialFrom(text) {
  text = text.trim();
  if (text.startsWith("SharedAccessSignature ")) {
    const se = /(?:^|&)se=(\d+)/.exec(text.slice("SharedAccessSignature ".length));
    return {token: text, expiry: se ? Number(se[1]) : 0, label: "a SharedAccessSignature token"};
  }
  const parsed = parseConnectionString(text);
  const key = await crypto.subtle.importKey("raw", b64decode(parsed.key), {name: "HMAC", hash: "SHA-256"}, false,
                                            ["sign"]);
  return {host: parsed.host, name: parsed.name, key, label: `${parsed.name} @ ${parsed.host}`};
}

async function authorization() {
  const c = state.credential;
  if (c.token) return c.token;
  const now = Math.floor(Date.now() / 1000) + state.skew;
  if (state.token && state.tokenExpiry - now > 60) return state.token;
  const sr = encodeURIComponent(c.host);
  const se = now + TOKEN_TTL;
  const sig = await crypto.subtle.sign("HMAC", c.key, new TextEncoder().encode(`${sr}\n${se}`));
  state.token = `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(b64encode(sig))}&se=${se}` +
    `&skn=${encodeURIComponent(c.name)}`;
  state.tokenExpiry = se;
  return state.token;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  if (!state.credential) throw new ApiError(401, {message: "signed out"}); // a call still under way at sign-out
  const headers = {Authorization: await authorization(), ...(options.headers || {})};
  const response = await fetch(path, {...options, headers, cache: "no-store"});
  if (options.raw && response.ok) return response;
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const error = new ApiError(response.status, body);
    // a 401 is either this credential refused (expired token, key renewed: sign out) or one route it has no right to
    // (the hub service API for a policy other than the owner): only the first ends the session
    if (response.status === 401 && !options.quiet && !(await credentialAccepted())) {
      signOut(`not authorized: ${error.message}`);
    }
    throw error;
  }
  return options.raw ? response : body;
}

async function credentialAccepted() {
  // the sign-in's own proof, asked again: does the server still take this credential at all?
  try {
    await api("/namespaces", {quiet: true});
    return true;
  } catch (e) {
    return !(e instanceof ApiError && e.status === 401);
  }
}

async function clockSkew() {
  // the server's clock decides whether a token expired: sign against it (its Date header), not the browser's
  try {
    const r = await fetch("/healthz", {cache: "no-store"});
    const server = Date.parse(r.headers.get("Date"));
    if (!isNaN(server)) state.skew = Math.round((server - Date.now()) / 1000);
  } catch (e) { /* keep 0 */ }
}

async function signIn(text, remember) {
  state.credential = await credentialFrom(text);
  state.token = null;
  await clockSkew();
  await api("/namespaces", {quiet: true}); // proves the credential (401 otherwise)
  if (remember) sessionStorage.setItem(STORE_KEY, text.trim());
  $("who").textContent = state.credential.label;
}

function signOut(message) {
  sessionStorage.removeItem(STORE_KEY);
  state.credential = null;
  state.token = null;
  stopTimers();
  $("who").textContent = "";
  show("login");
  $("login-error").textContent = message || "";
}

// ---- views ----
function show(view) {
  for (const id of ["login", "overview", "device"]) $(id).hidden = id !== view;
  const signedIn = view !== "login";
  $("logout").hidden = !signedIn;
  $("refresh").hidden = !signedIn;
}

function stopTimers() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  if (state.stream) state.stream.abort();
  state.stream = null;
}

async function route() {
  stopTimers();
  showError("");
  if (!state.credential) { show("login"); return; }
  const m = /^#\/device\/([^/]+)\/(.+)$/.exec(location.hash);
  let device = null;
  try {
    device = m && [decodeURIComponent(m[1]), decodeURIComponent(m[2])];
  } catch (e) { // a hand-made link with a broken %-escape: the overview and why, not a stale device page
    showError(`the link names no device (${e.message}): ${location.hash.slice(0, 80)}`);
  }
  if (device) {
    show("device");
    await loadDevice(...device);
  } else {
    show("overview");
    await loadOverview();
    state.timer = setInterval(() => refreshAggregates().catch(report), REFRESH_MS);
  }
}

function report(error) {
  if (!state.credential) return; // signed out meanwhile: the sign-in form says why
  showError(String(error.message || error));
}

// ---- overview ----
async function loadOverview() {
  const hubs = await api("/linkedHubs");
  state.hubs = (hubs.value || []).map((h) => h.name);
  const select = $("device-hub");
  const current = select.value || "default";
  select.replaceChildren(...state.hubs.map((name) => el("option", {value: name, selected: name === current}, name)));
  await Promise.all([refreshAggregates(), loadNamespaces(), loadDevices(), loadEnrollments()].map(
    (p) => p.catch(report)));
}

async function refreshAggregates() {
  await Promise.all([loadStatus(), loadExpiry(), loadRegistrations(), loadFailures()].map((p) => p.catch(report)));
}

function tile(label, value, level) {
  return el("div", {class: `tile ${level || ""}`}, el("div", {class: "value"}, value), el("div", {class: "label"}, label));
}

async function loadStatus() {
  // the service summary (GET /status, docs/api.md "Service status"): the top row and the recent refusals
  let s;
  try {
    s = await api("/status?refusals=20");
  } catch (e) {
    if (!(e instanceof ApiError) || e.status === 401) throw e;
    $("tiles").replaceChildren();
    $("tiles-note").hidden = false;
    $("tiles-note").textContent = `The service summary is not available here (GET /status: ${e.message}).`;
    fill($("refusals").tBodies[0], [], "not available", 5);
    return;
  }
  $("tiles-note").hidden = true;
  const n = (x) => (x === undefined || x === null ? "–" : x);
  const e = s.enrollments || {}, d = s.devices || {}, c = s.certificates || {}, r = s.registrations || {};
  const refusals = s.refusals || {};
  $("tiles").replaceChildren(
    tile("devices provisioned", n(d.provisioned)),
    tile("connected now", n(d.connected)),
    tile("valid certificates", n(c.valid)),
    tile("expiring in 7 days", n(c.expiringIn7Days), c.expiringIn7Days ? "bad" : ""),
    tile("expiring in 30 days", n(c.expiringIn30Days), c.expiringIn30Days ? "warn" : ""),
    tile("registrations, last hour", `${n(r.lastHour)}`),
    tile("failed registrations, last hour", n(r.failedLastHour), r.failedLastHour ? "warn" : ""),
    tile("refusals, last hour", n(refusals.lastHour), refusals.lastHour ? "warn" : ""),
    tile("enrollments / groups", `${n(e.individual)}/${n(e.groups)}`),
    tile("namespaces / policies / hubs", `${n(s.namespaces)}/${n(s.policies)}/${n(s.linkedHubs)}`),
  );
  const rows = (refusals.recent || []).map((x) => el("tr", {},
    el("td", {class: "nowrap"}, utc(x.time)), el("td", {class: "mono nowrap"}, x.id),
    el("td", {class: "nowrap"}, `${x.kind === "hubConnect" ? `hub CONNECT${x.hub ? ` (${x.hub})` : ""}` : "registration"}, ${x.transport}`),
    el("td", {}, `${x.reason} (${x.errorCode})`), el("td", {}, x.message)));
  fill($("refusals").tBodies[0], rows, "none lately", 5);
  $("refusals-note").textContent = "Device requests refused (registrations and hub CONNECTs), newest first.";
}

async function loadFailures() {
  const log = await api("/auditLog?action=registration.failed&top=10");
  const rows = (log.value || []).map((x) => el("tr", {},
    el("td", {class: "nowrap"}, utc(x.time)), el("td", {class: "mono"}, x.deviceId || ""), el("td", {}, x.subject || ""),
    el("td", {}, JSON.stringify(x.details || {}))));
  fill($("failures").tBodies[0], rows, "none", 4);
}

function barChart(container, bars, options) {
  // bars: [{label, parts: [{value, cls}], title, attrs}]; drawn as inline SVG, one group per bar
  const width = 900, height = 220, left = 34, bottom = 22, top = 8;
  const max = Math.max(1, ...bars.map((b) => b.parts.reduce((a, p) => a + p.value, 0)));
  const step = (width - left) / Math.max(1, bars.length);
  const scale = (v) => (v / max) * (height - top - bottom);
  const root = svg("svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": options.label});
  root.append(svg("line", {x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: "axis"}));
  root.append(svg("line", {x1: left, y1: top, x2: left, y2: height - bottom, class: "axis"}));
  root.append(svg("text", {x: left - 4, y: top + 10, "text-anchor": "end"}, String(max)));
  root.append(svg("text", {x: left - 4, y: height - bottom, "text-anchor": "end"}, "0"));
  bars.forEach((b, i) => {
    const group = svg("g", {...(b.attrs || {})});
    group.append(svg("title", {}, b.title));
    let y = height - bottom;
    for (const p of b.parts) {
      if (!p.value) continue;
      const h = Math.max(2, scale(p.value));
      y -= h;
      group.append(svg("rect", {x: (left + i * step + 1).toFixed(1), y: y.toFixed(1), width: Math.max(1, step - 2).toFixed(1),
                                height: h.toFixed(1), class: `bar ${p.cls || ""}`}));
    }
    // an invisible full-height target, so a hover shows the title even on an empty day
    group.append(svg("rect", {x: (left + i * step).toFixed(1), y: top, width: step.toFixed(1), height: height - top - bottom,
                              fill: "transparent"}));
    root.append(group);
    if (b.label) {
      root.append(svg("text", {x: (left + i * step + step / 2).toFixed(1), y: height - 6, "text-anchor": "middle"},
                      b.label));
    }
  });
  container.replaceChildren(root);
}

async function loadExpiry() {
  const ns = $("expiry-namespace").value;
  const t = await api(`/fleet/expiryTimeline?days=90${ns ? `&namespace=${encodeURIComponent(ns)}` : ""}`);
  $("expiry-total").textContent = `${t.total} certificate${t.total === 1 ? "" : "s"} expire within ${t.days} days`;
  barChart($("expiry-chart"), t.value.map((d, i) => ({
    label: i % 15 === 0 ? d.date.slice(5) : "",
    parts: [{value: d.count, cls: i < 7 ? "soon" : ""}],
    title: `${d.date}: ${d.count} certificate${d.count === 1 ? "" : "s"} expire`,
    attrs: {"data-date": d.date, "data-count": d.count},
  })), {label: "certificates expiring per day"});
}

async function loadRegistrations() {
  const r = await api("/fleet/registrationsPerMinute?minutes=60");
  $("registrations-total").textContent = `${r.total} registration${r.total === 1 ? "" : "s"} in the last hour` +
    " (green: assigned, red: failed allocation)";
  barChart($("registrations-chart"), r.value.map((m, i) => ({
    label: i % 10 === 0 ? m.minute.slice(11, 16) : "",
    parts: [{value: m.assigned, cls: "assigned"}, {value: m.failed, cls: "failed"}, {value: m.assigning, cls: ""}],
    title: `${m.minute}: ${m.assigned} assigned, ${m.failed} failed`,
    attrs: {"data-minute": m.minute, "data-count": m.total},
  })), {label: "registrations per minute"});
}

async function loadNamespaces() {
  const list = await api("/namespaces");
  const names = (list.value || []).map((n) => n.name);
  const select = $("expiry-namespace");
  const current = select.value;
  select.replaceChildren(el("option", {value: ""}, "all"),
                         ...names.map((n) => el("option", {value: n, selected: n === current}, n)));
  const all = list.value || [], shown = all.slice(0, POLICY_NAMESPACES);
  const policies = await Promise.all(shown.map(
    (ns) => api(`/namespaces/${encodeURIComponent(ns.name)}/credentials/default/policies`)));
  const rows = [];
  shown.forEach((ns, i) => {
    for (const p of policies[i].value || []) {
      const cert = (p.properties || {}).certificate || {};
      const ca = cert.certificateAuthorityConfiguration || {}, leaf = cert.leafCertificateConfiguration || {};
      rows.push(el("tr", {}, el("td", {}, ns.name), el("td", {}, p.name),
                   el("td", {class: "num"}, `${leaf.validityPeriodInDays} days`), el("td", {}, utc(ca.notAfter, false)),
                   el("td", {}, ca.keyBackend || "")));
    }
  });
  if (all.length > shown.length) {
    rows.push(el("tr", {id: "namespaces-more"}, el("td", {colspan: 5, class: "muted"},
      `and ${all.length - shown.length} more namespaces (opendps adr ns list)`)));
  }
  fill($("namespaces").tBodies[0], rows, "no namespace yet", 5);
}

function pager(which, prev, next, label, more) {
  const p = state[which];
  $(prev).disabled = p.index === 0;
  $(next).disabled = !more;
  $(label).textContent = `page ${p.index + 1}`;
}

async function loadDevices() {
  const hub = $("device-hub").value || "default";
  const prefix = $("device-prefix").value.trim();
  const p = state.devices;
  const query = new URLSearchParams({hub, top: "25"});
  if (prefix) query.set("prefix", prefix);
  if (p.tokens[p.index]) query.set("continuationToken", p.tokens[p.index]);
  const page = await api(`/fleet/devices?${query}`);
  p.tokens.length = p.index + 1;
  if (page.continuationToken) p.tokens.push(page.continuationToken);
  const rows = page.value.map((d) => {
    const c = d.certificate;
    const days = c && c.notAfter ? daysUntil(c.notAfter) : null;
    return el("tr", {"data-device-id": d.deviceId},
      el("td", {}, el("a", {href: `#/device/${encodeURIComponent(hub)}/${encodeURIComponent(d.deviceId)}`}, d.deviceId)),
      el("td", {}, d.status),
      el("td", {}, el("span", {class: d.connected ? "dot on" : "dot"}), d.connected ? "connected" : "no"),
      el("td", {}, d.connected ? "now" : utc(d.lastSeen) || "never"),
      el("td", {class: "serial"}, c ? c.serialNumber : "–"),
      el("td", {class: days !== null && days < 7 ? "expires soon" : "expires"},
         c && c.notAfter ? `${utc(c.notAfter)} (${days < 0 ? "expired" : `in ${days} d`})` : "–"),
      el("td", {}, c ? `${c.namespace} / ${c.policy || "–"}` : ""));
  });
  fill($("devices").tBodies[0], rows, prefix ? `no device id starts with "${prefix}"` : "no device in this hub", 7);
  pager("devices", "devices-prev", "devices-next", "devices-page", Boolean(page.continuationToken));
}

async function loadEnrollments() {
  const kind = $("enrollment-kind").value;
  const p = state.enrollments;
  const query = new URLSearchParams({kind, top: "10"});
  if (p.tokens[p.index]) query.set("continuationToken", p.tokens[p.index]);
  const page = await api(`/fleet/enrollments?${query}`);
  p.tokens.length = p.index + 1;
  if (page.continuationToken) p.tokens.push(page.continuationToken);
  const rows = page.value.map((e) => el("tr", {},
    el("td", {class: "mono"}, e.id), el("td", {}, e.attestationType), el("td", {}, e.provisioningStatus),
    el("td", {}, e.credentialPolicyName ? `${e.namespaceName || ""} / ${e.credentialPolicyName}` : "–"),
    el("td", {}, e.allocationPolicy || ""), el("td", {}, (e.iotHubs || []).join(", ") || "all")));
  fill($("enrollments").tBodies[0], rows, "none", 6);
  pager("enrollments", "enrollments-prev", "enrollments-next", "enrollments-page", Boolean(page.continuationToken));
}

// ---- one device ----
async function loadDevice(hub, id) {
  $("device-title").textContent = `${id}`;
  $("device-state").textContent = `hub ${hub}`;
  $("device-twin").textContent = "";
  $("device-telemetry").replaceChildren();
  const q = `hub=${encodeURIComponent(hub)}`;
  const [twin, certs] = await Promise.all([
    api(`/twins/${encodeURIComponent(id)}?${q}`).catch((e) => { report(e); return null; }),
    api(`/deviceCertificates?deviceId=${encodeURIComponent(id)}`).catch((e) => { report(e); return {value: []}; }),
  ]);
  if (twin) {
    $("device-state").textContent = `hub ${hub} · ${twin.status} · ${twin.connectionState} · ${twin.authenticationType}`;
    $("device-twin").textContent = JSON.stringify({tags: twin.tags, properties: twin.properties}, null, 2);
  }
  const rows = (certs.value || []).map((c) => el("tr", {"data-serial": c.serialNumber},
    el("td", {class: "serial"}, c.serialNumber), el("td", {}, utc(c.issuedAt)), el("td", {}, utc(c.notAfter)),
    el("td", {class: c.revoked ? "soon" : ""}, c.revoked ? `revoked (${c.revocationReason})`
      : (new Date(c.notAfter) < new Date() ? "expired" : "valid"))));
  fill($("device-certificates").tBodies[0], rows, "no certificate issued", 4);
  followTelemetry(hub, id).catch(report);
}

async function followTelemetry(hub, id) {
  // the hub service API's NDJSON stream from now on (GET /events from=latest), until the page is left
  const controller = new AbortController();
  state.stream = controller;
  const query = new URLSearchParams({hub, deviceId: id, from: "latest", timeout: "0"});
  const list = $("device-telemetry");
  list.replaceChildren();
  $("device-telemetry-wait").hidden = false;
  let response;
  try {
    response = await api(`/events?${query}`, {raw: true, signal: controller.signal});
  } catch (e) {
    if (e.name === "AbortError") return;
    throw e;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffered += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, cut).trim();
        buffered = buffered.slice(cut + 1);
        if (!line) continue; // the stream's heartbeat
        const event = JSON.parse(line);
        const e = event.event || {};
        const when = ((e.properties || {}).system || {})["iothub-enqueuedtime"] || "";
        $("device-telemetry-wait").hidden = true;
        list.prepend(el("li", {}, `${when ? utc(when) + " " : ""}#${event.position} `,
                        typeof e.payload === "string" ? e.payload : JSON.stringify(e.payload)));
        while (list.children.length > 200) list.lastChild.remove();
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") throw e;
  }
}

// ---- wiring ----
function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

function resetPaging(which) { state[which] = {tokens: [""], index: 0}; }

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("login-error").textContent = "";
    try {
      await signIn($("credential").value, true);
      $("credential").value = "";
      await route();
    } catch (e) {
      state.credential = null;
      $("login-error").textContent = e instanceof ApiError && e.status === 401
        ? `not accepted: ${e.message}` : `cannot sign in: ${e.message || e}`;
    }
  });
  $("logout").addEventListener("click", () => { signOut(""); location.hash = "#/"; });
  $("refresh").addEventListener("click", () => route().catch(report));
  $("expiry-namespace").addEventListener("change", () => loadExpiry().catch(report));
  $("device-hub").addEventListener("change", () => { resetPaging("devices"); loadDevices().catch(report); });
  $("device-prefix").addEventListener("input", debounce(() => { resetPaging("devices"); loadDevices().catch(report); },
                                                        250));
  $("devices-next").addEventListener("click", () => { state.devices.index += 1; loadDevices().catch(report); });
  $("devices-prev").addEventListener("click", () => { state.devices.index -= 1; loadDevices().catch(report); });
  $("enrollment-kind").addEventListener("change", () => { resetPaging("enrollments"); loadEnrollments().catch(report); });
  $("enrollments-next").addEventListener("click", () => { state.enrollments.index += 1; loadEnrollments().catch(report); });
  $("enrollments-prev").addEventListener("click", () => { state.enrollments.index -= 1; loadEnrollments().catch(report); });
  window.addEventListener("hashchange", () => route().catch(report));
  const saved = sessionStorage.getItem(STORE_KEY);
  if (saved) {
    try { await signIn(saved, false); } catch (e) { signOut(`signed out: ${e.message || e}`); return; }
  }
  route().catch(report);
});
