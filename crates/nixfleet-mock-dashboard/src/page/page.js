// The mock dashboard's page: renders the live feed from /events (Server-Sent
// Events, see live.rs) and sends commands through the HTTP API. Everything
// an agent sent is inserted as text, never as HTML.
"use strict";

const MAIN_COMMANDS = ["pull", "switch", "pull-switch", "boot", "rollback", "test", "stop"];
const V3_COMMANDS = ["check-version", "refresh-git", "refresh-lock", "refresh-system",
  "refresh-all", "update", "force-update", "restart", "reboot", "kill"];
// What the agent accepts while a command runs; it rejects everything else.
const ACCEPTED_WHILE_BUSY = new Set(["stop", "kill", "restart", "reboot"]);
const COMPARTMENTS = ["git", "lock", "system", "tests"];
// Output lines kept on the page; older ones stay available through the API.
const MAX_DOM_LINES = 5000;
// Host rows drawn at most: a fleet of 1,000 stays quick to draw; the count
// says how many more match, and the filter finds them.
const MAX_ROWS = 100;
// Metrics samples kept per host for the sparkline (as the mock keeps).
const MAX_SAMPLES = 120;

const $ = (id) => document.getElementById(id);

let hosts = [];
let hostIndex = new Map(); // hostname → its position in hosts
let filterText = "";
let clockOffset = 0; // server clock minus ours
let selected = null;
let source = null;
let lines = 0;
let skipped = 0;
let follow = true;
// Progress read from plain Nix output, for agents without operation_progress.
let derived = freshDerived(null);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key === "title" || key === "href" || key === "type") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function freshDerived(command) {
  return { command, buildsExpected: 0, builds: 0, downloadsExpected: 0, downloads: 0, done: false };
}

const hostByName = (name) => hosts[hostIndex.get(name)];

function setHosts(list) {
  hosts = list;
  hostIndex = new Map(hosts.map((h, i) => [h.hostname, i]));
}

// A changed host comes whole, except that its metrics are only the samples
// taken since the feed's last read: append those newer than ours.
function mergeHost(h) {
  const i = hostIndex.get(h.hostname);
  if (i === undefined) {
    hostIndex.set(h.hostname, hosts.length);
    hosts.push(h);
    return;
  }
  const old = (hosts[i].view && hosts[i].view.metrics) || [];
  const fresh = (h.view && h.view.metrics) || [];
  const lastT = old.length ? old[old.length - 1][0] : -Infinity;
  if (h.view) h.view.metrics = old.concat(fresh.filter((s) => s[0] > lastT)).slice(-MAX_SAMPLES);
  hosts[i] = h;
}
const serverNow = () => Date.now() + clockOffset;

function ago(t) {
  if (t === null || t === undefined) return "never";
  const s = Math.max(0, Math.floor((serverNow() - t) / 1000));
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

function clock(t) {
  return new Date(t).toLocaleTimeString([], { hour12: false });
}

function duration(ms) {
  if (ms === null || ms === undefined) return null;
  return ms < 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`;
}

function running(h) {
  return (h.view && h.view.running && h.view.running.command)
    || (h.last_heartbeat && h.last_heartbeat.pending_command) || null;
}

function stateOf(h) {
  if (h.online) return { cls: "online", text: "online" };
  if (h.connected) return { cls: "offline", text: "offline (no heartbeat)" };
  return { cls: "offline", text: "offline" };
}

function updateStatus(h) {
  const u = h.update_status || (h.last_heartbeat && h.last_heartbeat.update_status);
  return u && typeof u === "object" ? u : null;
}

function compartmentBadges(h, long) {
  const u = updateStatus(h);
  if (!u) return [];
  return COMPARTMENTS.filter((k) => u[k] && typeof u[k] === "object").map((k) => {
    const c = u[k];
    const status = String(c.status || "unknown");
    const title = [c.message, c.checked_at && `checked ${c.checked_at}`].filter(Boolean).join(" — ");
    return el("span", { class: `badge ${status}`, title, "data-compartment": k },
      long ? `${k}: ${status}` : k);
  });
}

function sparkline(samples) {
  const w = 80, hgt = 20;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", hgt);
  if (samples.length < 2) return svg;
  const t0 = samples[0][0], t1 = samples[samples.length - 1][0];
  for (const [col, cls] of [[1, "cpu"], [2, "ram"]]) {
    const points = samples.filter((s) => typeof s[col] === "number").map((s) => {
      const x = t1 > t0 ? ((s[0] - t0) / (t1 - t0)) * (w - 2) + 1 : 1;
      const y = hgt - 1 - (Math.min(100, Math.max(0, s[col])) / 100) * (hgt - 2);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("class", cls);
    line.setAttribute("fill", "none");
    line.setAttribute("stroke-width", "1.5");
    svg.append(line);
  }
  return svg;
}

function metricsCell(h) {
  const m = h.last_heartbeat && h.last_heartbeat.metrics;
  const samples = (h.view && h.view.metrics) || [];
  const pct = (v) => (typeof v === "number" ? `${Math.round(v)}%` : "–");
  const text = m ? `${pct(m.cpu)} / ${pct(m.ram)}` : "–";
  const title = m ? `cpu ${pct(m.cpu)}, ram ${pct(m.ram)}, swap ${pct(m.swap)}, load ${m.load ?? "–"}` : "no metrics";
  return el("td", { class: "metrics", title }, sparkline(samples), " ", text);
}

function renderHosts() {
  const shown = filterText ? hosts.filter((h) => h.hostname.toLowerCase().includes(filterText)) : hosts;
  const drawn = shown.slice(0, MAX_ROWS);
  $("hosts").tBodies[0].replaceChildren(...drawn.map(hostRow));
  $("no-hosts").hidden = hosts.length > 0;
  const hidden = shown.length - drawn.length;
  const count = $("host-count");
  count.textContent = [`${hosts.length.toLocaleString()} host${hosts.length === 1 ? "" : "s"}`,
    filterText && `${shown.length.toLocaleString()} match`,
    hidden && `${hidden.toLocaleString()} more not shown (filter to find them)`].filter(Boolean).join(", ");
  count.setAttribute("data-total", hosts.length);
  count.setAttribute("data-hidden", hidden);
}

function hostRow(h) {
  const st = stateOf(h);
  const reg = h.register || {};
  const beat = h.last_heartbeat || {};
  const cmd = running(h);
  const row = el("tr", { "data-host": h.hostname, class: `${st.cls}${h.hostname === selected ? " selected" : ""}` },
    el("td", { class: "name" }, el("span", { class: "dot" }), h.hostname),
    el("td", { class: "state", text: st.text }),
    el("td", { class: "age", "data-t": h.last_heartbeat_at ?? "", text: ago(h.last_heartbeat_at) }),
    el("td", { class: "generation", text: beat.generation || reg.generation || "–" }),
    el("td", { class: "agent", text: reg.agent_version || "–" }),
    el("td", { class: "running" }, cmd ? el("span", { class: "badge busy", text: cmd }) : "idle"),
    metricsCell(h),
    el("td", { class: "compartments" }, ...compartmentBadges(h, false)));
  row.addEventListener("click", () => { location.hash = `host=${encodeURIComponent(h.hostname)}`; });
  return row;
}

function tickAges() {
  for (const cell of document.querySelectorAll("#hosts td.age")) {
    const t = cell.getAttribute("data-t");
    cell.textContent = ago(t === "" ? null : Number(t));
  }
}

// --- the host view -----------------------------------------------------------

function commandButton(name) {
  const button = el("button", { type: "button", "data-command": name, class: name === "stop" || name === "kill" ? "stop" : "", text: name });
  button.addEventListener("click", () => sendCommand(name));
  return button;
}

async function sendCommand(name) {
  const result = $("command-result");
  result.textContent = `sending ${name}…`;
  try {
    const response = await fetch(`/api/hosts/${encodeURIComponent(selected)}/command`, {
      method: "POST", body: JSON.stringify({ command: name }),
    });
    const body = await response.json().catch(() => ({}));
    result.textContent = response.ok ? `sent ${name}` : `${name} not sent: ${body.error || response.status}`;
  } catch (e) {
    result.textContent = `${name} not sent: ${e}`;
  }
}

function renderView() {
  const view = $("host-view");
  const h = selected && hostByName(selected);
  view.hidden = !selected;
  if (!selected) return;
  $("view-name").textContent = selected;
  if (!h) {
    $("view-state").textContent = "not registered yet";
    $("view-state").className = "badge offline";
    return;
  }
  const st = stateOf(h);
  $("view-state").textContent = st.text;
  $("view-state").className = `badge ${st.cls}`;
  const reg = h.register || {};
  $("view-meta").textContent = [reg.host_type, reg.agent_version && `agent ${reg.agent_version}`,
    reg.nixpkgs_version && `nixpkgs ${reg.nixpkgs_version}`,
    `heartbeat every ${Math.round(h.heartbeat_interval_ms / 1000)} s`].filter(Boolean).join(" · ");
  const cmd = running(h);
  for (const button of document.querySelectorAll("#commands button[data-command]")) {
    const name = button.getAttribute("data-command");
    button.disabled = !h.connected;
    const rejects = cmd ? !ACCEPTED_WHILE_BUSY.has(name) : name === "stop" || name === "kill";
    button.classList.toggle("would-reject", h.connected && rejects);
    button.title = !h.connected ? "not connected"
      : rejects ? (cmd ? `the agent rejects this while ${cmd} runs` : "nothing is running") : "";
  }
  $("compartments").replaceChildren(...compartmentBadges(h, true));
  renderProgress(h);
}

function renderProgress(h) {
  const box = $("progress");
  const fill = $("progress-fill");
  const v = h.view || {};
  // v3 dashboards' progress is reset to {} when a command is sent: only a
  // payload with a counted phase replaces counting Nix's plain output.
  const hasPhase = (p) => p && typeof p === "object" &&
    Object.values(p.progress || p).some((x) => x && typeof x === "object" && typeof x.total === "number");
  const payload = [h.progress, v.progress].find(hasPhase);
  const root = payload && typeof payload === "object" ? (payload.progress || payload) : null;
  const parts = [];
  let current = 0, total = 0, status = null, detailText = "";
  if (root && typeof root === "object") {
    const main = root.system || Object.values(root).find((p) => p && typeof p.total === "number");
    if (main && typeof main.total === "number") {
      current = Number(main.current) || 0;
      total = main.total;
      status = main.status || null;
    }
    for (const [key, p] of Object.entries(root)) {
      if (p && typeof p === "object" && typeof p.total === "number") parts.push(`${key} ${p.current ?? 0}/${p.total}${p.status ? ` (${p.status})` : ""}`);
    }
    const detail = root.detail || (payload && payload.detail);
    if (detail && typeof detail === "object") {
      detailText = Object.entries(detail).map(([k, d]) => {
        if (d && typeof d === "object" && !Array.isArray(d)) {
          const done = d.done ?? d.current, expected = d.expected ?? d.total;
          if (typeof done === "number" && typeof expected === "number") return `${k} ${done}/${expected}`;
        }
        if (Array.isArray(d)) return d.length ? `${k}: ${d.map((x) => (typeof x === "object" ? (x.name || x.drv || JSON.stringify(x)) : x)).join(", ")}` : "";
        return typeof d === "number" || typeof d === "string" ? `${k} ${d}` : "";
      }).filter(Boolean).join(" · ");
    }
  } else if (derived.buildsExpected + derived.downloadsExpected > 0) {
    const builds = derived.done ? derived.buildsExpected : derived.builds;
    const downloads = derived.done ? derived.downloadsExpected : derived.downloads;
    current = builds + downloads;
    total = derived.buildsExpected + derived.downloadsExpected;
    status = derived.done ? "complete" : "in_progress";
    parts.push(`builds ${builds}/${derived.buildsExpected}`, `downloads ${downloads}/${derived.downloadsExpected}`);
    detailText = "counted from Nix's output";
  }
  const tp = v.test_progress;
  if (tp && typeof tp.total === "number") {
    parts.push(`tests ${tp.current ?? 0}/${tp.total}${typeof tp.passed === "number" ? ` (${tp.passed} passed)` : ""}${tp.result ? ` — ${tp.result}` : ""}`);
    if (!total) { current = Number(tp.current) || 0; total = tp.total; status = tp.running === false ? "complete" : "in_progress"; }
  }
  box.hidden = parts.length === 0;
  if (box.hidden) return;
  fill.style.width = `${total > 0 ? Math.min(100, (100 * current) / total) : 0}%`;
  fill.className = status === "error" ? "error" : status === "complete" ? "ok" : "";
  $("progress-text").textContent = parts.join(" · ");
  $("progress-detail").textContent = detailText;
}

// Nix's plain output says what it will build and fetch, then one line per
// build and per download it starts.
function deriveProgress(command, line) {
  if (derived.command !== command) derived = freshDerived(command);
  let m;
  if ((m = /^these (\d+) derivations will be built:/.exec(line))) derived.buildsExpected += Number(m[1]);
  else if (/^this derivation will be built:/.test(line)) derived.buildsExpected += 1;
  else if ((m = /^these (\d+) paths will be fetched/.exec(line))) derived.downloadsExpected += Number(m[1]);
  else if (/^this path will be fetched/.test(line)) derived.downloadsExpected += 1;
  else if (/^building '\/nix\/store\/[^']+\.drv'/.test(line)) derived.builds += 1;
  else if (/^copying path '\/nix\/store\/[^']+' from '/.test(line)) derived.downloads += 1;
}

function outputLine(cls, text) {
  return el("div", { class: `line ${cls}`, text });
}

function onMessages(messages) {
  const out = $("output");
  const fragment = document.createDocumentFragment();
  for (const m of messages) {
    const p = m.payload || {};
    switch (m.type) {
      case "output": {
        // By is_error, not by stream: Nix writes a good build's whole log to
        // stderr, and the agent says what a line means in is_error.
        const stream = p.is_error === true ? "stderr" : "stdout";
        const text = typeof p.line === "string" ? p.line : JSON.stringify(p.line ?? "");
        lines += 1;
        deriveProgress(p.command, text);
        fragment.append(outputLine(stream, text));
        break;
      }
      case "status": {
        const ok = p.status === "ok";
        if (ok && derived.command === p.command) derived.done = true;
        fragment.append(outputLine(ok ? "status-ok" : "status-error",
          `── ${p.command}: ${p.status}, exit code ${p.exit_code ?? "–"}${p.message ? ` — ${p.message}` : ""} ──`));
        break;
      }
      case "command_rejected":
        fragment.append(outputLine("rejected", `✗ command rejected: ${p.reason ?? "?"}${p.current_command ? ` (running ${p.current_command})` : ""}`));
        break;
      case "register":
        fragment.append(outputLine("note", `— registered (connection #${m.conn}) —`));
        break;
      default:
        break;
    }
  }
  out.append(fragment);
  trimAndScroll();
  renderLineCount();
  const h = hostByName(selected);
  if (h) renderProgress(h);
}

function onSkipped(s) {
  skipped += s.lines || 0;
  const what = [s.lines ? `${s.lines.toLocaleString()} lines skipped` : null,
    s.messages ? `${s.messages.toLocaleString()} messages no longer stored` : null].filter(Boolean).join(", ");
  const count = Math.max(1, (s.to || 0) - (s.from || 0));
  const link = el("a", { href: `/api/hosts/${encodeURIComponent(selected)}/messages?type=output&since=${s.from}&limit=${count}`, target: "_blank", text: "see the API" });
  $("output").append(el("div", { class: "line note skipped" }, `… ${what} (the page fell behind), `, link, " …"));
  trimAndScroll();
  renderLineCount();
}

function trimAndScroll() {
  const out = $("output");
  while (out.childElementCount > MAX_DOM_LINES) out.firstElementChild.remove();
  if (follow) out.scrollTop = out.scrollHeight;
}

function renderLineCount() {
  $("line-count").textContent = `${(lines + skipped).toLocaleString()} lines${skipped ? ` (${skipped.toLocaleString()} skipped)` : ""}`;
  $("line-count").setAttribute("data-lines", lines + skipped);
}

function renderTimeline(data) {
  const body = $("timeline").tBodies[0];
  body.replaceChildren();
  for (const e of [...(data.events || [])].reverse()) {
    let text;
    let badge = e.kind;
    switch (e.kind) {
      case "registered":
        text = `registered on connection #${e.conn} from ${e.remote}${e.agent_version ? ` (agent ${e.agent_version})` : ""}`;
        break;
      case "closed": {
        const bits = [`connection #${e.id} closed by ${e.closed_by ?? "?"}`];
        if (e.close_code !== null && e.close_code !== undefined) bits.push(`agent's close code ${e.close_code}${e.close_reason ? ` "${e.close_reason}"` : ""}`);
        if (e.sent_close_code !== null && e.sent_close_code !== undefined) bits.push(`dashboard's close code ${e.sent_close_code}${e.sent_close_reason ? ` "${e.sent_close_reason}"` : ""}`);
        if (e.error) bits.push(e.error);
        text = bits.join(", ");
        break;
      }
      case "sent":
        text = e.what === "command" ? `sent command ${e.detail}` : `sent ${e.what} ${JSON.stringify(e.detail)}`;
        break;
      case "rejected":
        text = `rejected: ${e.reason ?? "?"}${e.current_command ? ` (running ${e.current_command})` : ""}`;
        break;
      case "status":
        badge = e.status === "ok" ? "ok" : "error";
        text = [`${e.command}: ${e.status}`, `exit code ${e.exit_code ?? "–"}`, duration(e.duration_ms), e.message].filter(Boolean).join(" · ");
        break;
      default:
        text = JSON.stringify(e);
    }
    body.append(el("tr", { "data-kind": e.kind },
      el("td", { class: "t", text: clock(e.t) }),
      el("td", {}, el("span", { class: `badge ${badge}`, text: e.kind })),
      el("td", { class: "text", text })));
  }
}

// --- the feed ----------------------------------------------------------------

function connect() {
  if (source) source.close();
  const url = selected ? `/events?host=${encodeURIComponent(selected)}` : "/events";
  source = new EventSource(url);
  const feed = $("feed");
  source.onopen = () => { feed.textContent = "live"; feed.setAttribute("data-state", "live"); };
  source.onerror = () => { feed.textContent = "reconnecting…"; feed.setAttribute("data-state", "connecting"); };
  source.addEventListener("hosts", (e) => {
    const data = JSON.parse(e.data);
    clockOffset = data.now - Date.now();
    setHosts(data.hosts || []);
    renderHosts();
    renderView();
  });
  source.addEventListener("hosts_changed", (e) => {
    const data = JSON.parse(e.data);
    clockOffset = data.now - Date.now();
    for (const h of data.hosts || []) mergeHost(h);
    renderHosts();
    renderView();
  });
  source.addEventListener("timeline", (e) => renderTimeline(JSON.parse(e.data)));
  source.addEventListener("messages", (e) => onMessages(JSON.parse(e.data)));
  source.addEventListener("skipped", (e) => onSkipped(JSON.parse(e.data)));
}

function select() {
  const m = /^#host=(.+)$/.exec(location.hash);
  const name = m ? decodeURIComponent(m[1]) : null;
  if (name === selected && source) return;
  selected = name;
  lines = 0;
  skipped = 0;
  follow = true;
  derived = freshDerived(null);
  $("output").replaceChildren();
  $("timeline").tBodies[0].replaceChildren();
  $("command-result").textContent = "";
  $("follow").hidden = true;
  renderLineCount();
  renderHosts();
  renderView();
  connect();
}

function init() {
  $("main-commands").append(...MAIN_COMMANDS.map(commandButton));
  $("v3-commands").append(...V3_COMMANDS.map(commandButton));
  const out = $("output");
  out.addEventListener("scroll", () => {
    follow = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    $("follow").hidden = follow;
  });
  $("follow").addEventListener("click", () => {
    follow = true;
    $("follow").hidden = true;
    out.scrollTop = out.scrollHeight;
  });
  $("host-filter").addEventListener("input", (e) => {
    filterText = e.target.value.trim().toLowerCase();
    renderHosts();
  });
  window.addEventListener("hashchange", select);
  setInterval(tickAges, 1000);
  select();
}

init();
