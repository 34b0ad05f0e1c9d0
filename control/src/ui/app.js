// Switchyard's dashboard: follows GET /v1/watch (Server-Sent Events, read
// with fetch so the bearer token can go in a header) and acts through the
// /v1/ API. No framework, nothing loaded from elsewhere.
"use strict";

const history = {};          // "route/backend/metric" -> recent values
const HISTORY = 120;         // samples kept per series (two minutes)
let token = sessionStorage.getItem("switchyard-token") || "";
let stream = null;           // the AbortController of the open watch
let events = [];             // newest last
const drafts = {};           // "route/backend" -> a weight being typed

const $ = (id) => document.getElementById(id);

function headers(json) {
  const h = {};
  if (token) h["Authorization"] = "Bearer " + token;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function refused(resp) {
  try {
    const body = await resp.json();
    return `${resp.status} ${body.error.code}: ${body.error.message}`;
  } catch (_) {
    return `${resp.status} ${resp.statusText}`;
  }
}

// --- the live stream

async function watch() {
  if (stream) stream.abort();
  stream = new AbortController();
  $("connection").textContent = "connecting…";
  try {
    const resp = await fetch("/v1/watch", { headers: headers(false), signal: stream.signal });
    if (!resp.ok) {
      $("connection").textContent = "refused";
      showError(await refused(resp) + (resp.status === 401 ? " (enter the admin token above)" : ""));
      return;
    }
    showError("");
    $("connection").textContent = "live";
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = message.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) render(JSON.parse(data));
      }
    }
  } catch (e) {
    if (e.name === "AbortError") return;
  }
  $("connection").textContent = "reconnecting…";
  setTimeout(watch, 2000);
}

// --- drawing

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    // Through CSSOM: the page's policy allows no inline style attributes.
    else if (k === "style") for (const rule of v.split(";")) {
      const [name, value] = rule.split(":");
      if (name && value) node.style.setProperty(name.trim(), value.trim());
    }
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function spark(key, value) {
  const series = history[key] || (history[key] = []);
  series.push(value === null || value === undefined ? 0 : value);
  if (series.length > HISTORY) series.shift();
  const max = Math.max(...series, 1e-9);
  const points = series.map((v, i) => `${(i * 90) / (HISTORY - 1)},${22 - (v / max) * 20}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 90 22");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  svg.append(line);
  return svg;
}

const fixed = (v, digits, unit) => (v === null || v === undefined ? "–" : v.toFixed(digits) + unit);

function render(snapshot) {
  // Redrawing replaces the weight inputs: keep the one being typed in.
  const focused = document.activeElement && document.activeElement.dataset.draft;
  redraw(snapshot);
  if (focused) {
    const input = document.querySelector(`[data-draft="${focused}"]`);
    if (input) { input.focus(); input.setSelectionRange(input.value.length, input.value.length); }
  }
}

function redraw(snapshot) {
  const state = snapshot.state;
  const overridden = new Set(state.overridden ? state.overridden.routes : []);
  const routes = $("routes");
  routes.replaceChildren(...state.routes.map((route) => {
    const stats = (snapshot.stats || {})[route.name] || {};
    const rollout = (snapshot.rollouts || {})[route.name];
    return el("div", { "data-testid": "route-" + route.name },
      el("h2", {}, "Route ", route.name, overridden.has(route.name) ? el("span", { class: "muted" }, " (weights set over the file)") : null),
      backendsTable(route, stats),
      weightsForm(route, rollout),
      rollout ? rolloutPanel(`/v1/routes/${route.name}/rollout`, rollout) : el("p", { class: "muted" }, "no rollout"));
  }));
  flagsTable(state.flags);
  const flagRollouts = Object.entries(snapshot.flag_rollouts || {});
  $("flag-rollouts").replaceChildren(...flagRollouts.map(([flag, r]) =>
    el("div", { "data-testid": "flag-rollout-" + flag },
      el("h3", {}, "Guarded rollout of ", flag),
      rolloutPanel(`/v1/flags/${flag}/rollout`, r))));
  for (const e of snapshot.events || []) events.push(e);
  events = events.slice(-50);
  $("events").replaceChildren(...events.slice().reverse().map((e) =>
    el("li", { "data-testid": "event" }, `${e.time} ${e.action} ${e.target} by ${e.actor}`)));
}

function backendsTable(route, stats) {
  return el("table", {},
    el("tr", {}, ["backend", "weight", "requests/s", "", "errors", "", "p95", ""].map((h) => el("th", {}, h))),
    route.backends.map((b) => {
      const s = stats[b.name] || {};
      const key = route.name + "/" + b.name;
      return el("tr", { "data-testid": "backend-" + b.name },
        el("td", {}, b.name),
        el("td", { "data-testid": "weight-" + b.name }, el("span", { class: "bar", style: `width:${b.weight}px` }), b.weight + "%"),
        el("td", {}, fixed(s.rate, 1, "")), el("td", {}, spark(key + "/rate", s.rate)),
        el("td", {}, fixed(s.error_rate, 2, " %")), el("td", {}, spark(key + "/errors", s.error_rate)),
        el("td", {}, fixed(s.p95_ms, 1, " ms")), el("td", {}, spark(key + "/p95", s.p95_ms)));
    }));
}

/** A rollout, a route's or a flag's (`path`: its API path). */
function rolloutPanel(path, r) {
  const flag = r.flag !== undefined;
  const steps = r.steps || [];
  const unit = (check) => check === "error_rate" ? " %" : check === "p95" ? " ms" : check.endsWith("_ratio") ? "×" : "";
  const held = seconds(r.held), hold = r.hold ? seconds(r.hold) : 0;
  const active = r.phase === "progressing" || r.phase === "paused";
  const checks = r.last_analysis ? r.last_analysis.checks : [];
  const difference = r.last_analysis && r.last_analysis.error_rate_difference;
  return el("div", { "data-testid": "rollout" },
    el("p", {}, flag ? `on cohort against off (on failure: ${r.on_failure}), now at ${r.rollout_percentage}%${r.enabled ? "" : ", flag off"}: `
      : `${r.strategy} rollout of ${r.target} against ${r.stable}: `,
      el("span", { class: r.phase, "data-testid": "phase" }, r.phase),
      r.reason ? el("span", { class: "muted" }, " — " + r.reason) : null),
    el("div", { class: "steps" }, steps.map((s, i) =>
      el("div", { class: "step" + (i < r.step || r.phase === "promoted" ? " done" : "") + (i === r.step && active ? " current" : "") },
        (flag ? s.rollout_percentage : s.weight) + "%" + (s.hold ? " " + s.hold : "")))),
    active && hold ? el("div", { class: "hold", title: `held ${r.held} of ${r.hold}` },
      el("div", { style: `width:${Math.min(100, (100 * held) / hold)}%` })) : null,
    checks.length ? el("table", {},
      el("tr", {}, ["check", "value", "threshold", "verdict"].map((h) => el("th", {}, h))),
      checks.map((c) => el("tr", {},
        el("td", {}, c.check), el("td", {}, fixed(c.value, 2, unit(c.check))),
        el("td", {}, c.threshold + unit(c.check)), el("td", { class: c.verdict }, c.verdict)))) : null,
    difference ? el("p", { class: "muted", "data-testid": "difference" },
      `on against off: ${difference.points >= 0 ? "+" : ""}${difference.points.toFixed(2)} points of errors (z = ${difference.z.toFixed(2)}), ` +
      (difference.beyond_noise && difference.z > 0 ? "beyond noise" : "within noise")) : null,
    el("div", { class: "actions" }, ["promote", "pause", "resume", "abort", "rollback", "undo"].map((action) =>
      el("button", { "data-testid": "action-" + action, onclick: () => act("POST", `${path}/${action}`) }, action))));
}

function weightsForm(route, rollout) {
  const inputs = route.backends.map((b) => {
    const key = route.name + "/" + b.name;
    return el("input", { class: "weight", name: b.name, value: key in drafts ? drafts[key] : b.weight,
      "data-testid": "set-" + b.name, "data-draft": key, oninput: (e) => { drafts[key] = e.target.value; } });
  });
  const busy = rollout && (rollout.phase === "progressing" || rollout.phase === "paused");
  return el("div", { class: "actions" }, "weights:",
    route.backends.map((b, i) => el("label", {}, b.name + " ", inputs[i])),
    el("button", { disabled: busy ? "" : null, "data-testid": "set-weights", onclick: () => {
      const body = {};
      for (const input of inputs) {
        body[input.name] = Number(input.value);
        delete drafts[route.name + "/" + input.name];
      }
      act("PUT", `/v1/routes/${route.name}/weights`, body);
    } }, "set"));
}

function flagsTable(flags) {
  $("flags").replaceChildren(
    el("tr", {}, ["flag", "enabled", "rollout", ""].map((h) => el("th", {}, h))),
    ...(flags || []).map((f) => el("tr", { "data-testid": "flag-" + f.name },
      el("td", {}, f.name), el("td", {}, f.enabled ? "on" : "off"),
      el("td", {}, f.rollout_percentage + "%"),
      el("td", {}, el("button", { onclick: () => act("PATCH", `/v1/flags/${f.name}`, { enabled: !f.enabled }) },
        f.enabled ? "turn off" : "turn on")))));
}

function seconds(text) {
  let total = 0;
  for (const [, n, u] of String(text).matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g)) {
    total += Number(n) * { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 }[u];
  }
  return total;
}

// --- actions

async function act(method, path, body) {
  const resp = await fetch(path, { method, headers: headers(true), body: body === undefined ? undefined : JSON.stringify(body) });
  showError(resp.ok ? "" : "refused: " + await refused(resp));
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("switchyard-token", token);
  watch();
});
watch();
