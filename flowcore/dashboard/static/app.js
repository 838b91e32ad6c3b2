// flowcore dashboard: polls the head's JSON API about once a second and
// redraws the visible page.  Plain DOM, no framework, no build step; data is
// only ever put into the page as text (never as HTML).
"use strict";

const PAGES = ["overview", "tasks", "actors", "objects", "timeline", "dag", "jobs"];
const TASK_STATES = ["WAITING_FOR_ARGS", "QUEUED", "INFEASIBLE", "RUNNING",
                     "FINISHED", "FAILED", "CANCELLED", "LOST"];
const DONE_TOTALS = {FINISHED: "finished", FAILED: "failed", CANCELLED: "cancelled"};
const ACTOR_STATES = ["PENDING", "ALIVE", "RESTARTING", "DEAD"];
const POLL_MS = 1000;
const DAG_POLL_MS = 3000;

const ui = {
  page: "overview",
  taskState: null,        // state filter of the tasks page (null = all)
  taskText: "",
  selectedTask: null,
  actorState: null,
  timer: null,
  busy: false,
  again: false,
  dagUrl: null,
};

// ------------------------------------------------------------ helpers
function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k === "style") Object.assign(e.style, v);  // CSSOM: allowed by the CSP
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svgEl(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
}

function fmtNum(x) {
  if (x === null || x === undefined) return "–";
  return Number.isInteger(x) ? String(x) : x.toFixed(x < 10 ? 2 : 1).replace(/\.?0+$/, "");
}

function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  if (s < 0.001) return "<1 ms";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  if (s < 3600) {
    const sec = Math.round(s % 60);
    return Math.floor(s / 60) + " min" + (sec ? " " + sec + " s" : "");
  }
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function fmtClock(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], {hour12: false});
}

// ids begin with the submitting client's random prefix and end with its
// counter: show both ends
function short(id) {
  if (!id) return "–";
  id = String(id);
  return id.length > 14 ? id.slice(0, 6) + "…" + id.slice(26, 32) : id;
}

function shortObject(id) {  // task id + 4-byte return index
  if (!id || id.length !== 40) return short(id);
  const index = id.slice(32);
  return short(id.slice(0, 32)) + "#" + (index === "ffffffff" ? "handle" : parseInt(index, 16));
}

function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

function badge(state) {
  return el("span", {class: "badge s-" + String(state || "unknown").toLowerCase(), text: state || "?"});
}

function bar(frac, label, title) {
  const pct = Math.max(0, Math.min(1, frac || 0)) * 100;
  const level = pct >= 90 ? "high" : pct >= 70 ? "mid" : "low";
  return el("div", {class: "bar", title: title || label},
    el("div", {class: "bar-fill " + level, style: {width: pct.toFixed(1) + "%"}}),
    el("span", {class: "bar-label", text: label}));
}

function errorSummary(text) {
  if (!text) return "";
  const lines = String(text).trim().split("\n").map(l => l.trim()).filter(Boolean);
  return lines.length ? lines[lines.length - 1] : "";
}

function duration(row, now) {
  if (!row.started) return null;
  return (row.ended || now) - row.started;
}

function fill(tbody, rows, make, emptyText, columns) {
  if (!rows.length) {
    tbody.replaceChildren(el("tr", {class: "empty"}, el("td", {colspan: columns, text: emptyText})));
    return;
  }
  tbody.replaceChildren(...rows.map(make));
}

async function api(path) {
  const r = await fetch(path, {headers: {Accept: "application/json"}, cache: "no-store"});
  if (r.status === 401) {
    location.href = "/login?next=" + encodeURIComponent(location.pathname + location.hash);
    throw new Error("not logged in");
  }
  if (!r.ok) {
    let msg = "HTTP " + r.status;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(path + ": " + msg);
  }
  return r.json();
}

// ------------------------------------------------------------ header and cards
function renderHeader(sum) {
  $("head-address").textContent = "head " + (sum.address || "?") + " · v" + (sum.version || "?");
}

function card(title, value, sub, extra) {
  return el("div", {class: "card"},
    el("div", {class: "card-title", text: title}),
    el("div", {class: "card-value", text: value}),
    sub ? el("div", {class: "card-sub", text: sub}) : null,
    extra || null);
}

function renderCards(sum) {
  const cards = [], work = [];
  const n = sum.nodes;
  cards.push(card("Nodes alive", n.alive + " / " + n.total,
                  n.total > n.alive ? (n.total - n.alive) + " dead" : "all alive"));
  for (const [name, r] of Object.entries(sum.resources)) {
    cards.push(card(name, fmtNum(r.used) + " / " + fmtNum(r.total), "used / total",
                    bar(r.total ? r.used / r.total : 0, Math.round(100 * (r.total ? r.used / r.total : 0)) + "%")));
  }
  const s = sum.store;
  cards.push(card("Object store", fmtBytes(s.used), "of " + fmtBytes(s.capacity),
                  bar(s.capacity ? s.used / s.capacity : 0,
                      Math.round(100 * (s.capacity ? s.used / s.capacity : 0)) + "%")));
  const st = sum.tasks.by_state, tot = sum.tasks.totals;
  work.push(card("Tasks running", String(st.RUNNING || 0),
                  (st.QUEUED || 0) + " queued · " + (st.WAITING_FOR_ARGS || 0) + " waiting" +
                  (st.INFEASIBLE ? " · " + st.INFEASIBLE + " infeasible" : "")));
  work.push(card("Tasks done", String((tot.finished || 0) + (tot.failed || 0) + (tot.cancelled || 0)),
                  (tot.finished || 0) + " finished · " + (tot.failed || 0) + " failed · " +
                  (tot.cancelled || 0) + " cancelled"));
  const a = sum.actors.by_state;
  work.push(card("Actors alive", String(a.ALIVE || 0),
                  sum.actors.total + " total · " + (a.DEAD || 0) + " dead"));
  work.push(card("Objects", String(sum.objects.count), fmtBytes(sum.objects.bytes) + " referenced"));
  $("cards").replaceChildren(...cards);
  $("cards-work").replaceChildren(...work);
  const w = $("warnings");
  if (sum.warnings && sum.warnings.length) {
    w.replaceChildren(el("h2", {text: "Warnings"}),
      el("ul", {class: "warnings"}, ...sum.warnings.slice().reverse().map(t => el("li", {text: t}))));
  } else {
    w.replaceChildren();
  }
}

// ------------------------------------------------------------ overview
function nodeRow(n) {
  const store = n.store || {};
  const pool = n.pool || {};
  const res = Object.keys(n.resources_total || {}).sort((x, y) => {
    const o = k => (k === "CPU" ? 0 : k === "GPU" ? 1 : 2);
    return o(x) - o(y) || x.localeCompare(y);
  }).map(k => k + " " + fmtNum((n.resources_used || {})[k] || 0) + "/" + fmtNum(n.resources_total[k]));
  const mem = n.mem_total ? bar(n.mem_used / n.mem_total,
                                fmtBytes(n.mem_used) + " / " + fmtBytes(n.mem_total),
                                (n.mem_percent || 0).toFixed(0) + "% of the machine's memory") : "–";
  const cpu = n.cpu_percent !== undefined && n.cpu_percent !== null ?
    bar(n.cpu_percent / 100, n.cpu_percent.toFixed(0) + "%", "CPU use of the machine") : "–";
  const storeCell = store.capacity ? bar(store.used / store.capacity,
    fmtBytes(store.used) + " / " + fmtBytes(store.capacity),
    (store.num_objects || 0) + " objects; " + fmtBytes(store.spilled_bytes || 0) + " spilled") : "–";
  const workers = pool.workers !== undefined ?
    (pool.busy || 0) + " busy · " + (pool.idle || 0) + " idle" + (n.actors ? " · " + plural(n.actors, "actor") : "") : "–";
  const hb = n.alive ? (n.heartbeat_age === null || n.heartbeat_age === undefined ? "–" :
    (n.heartbeat_age < 1 ? "<1 s" : Math.round(n.heartbeat_age) + " s") + " ago") : "–";
  return el("tr", {class: n.alive ? "" : "dead", "data-node": n.node_id},
    el("td", {}, el("div", {class: "strong", text: n.name}), el("div", {class: "muted mono small", text: n.node_id})),
    el("td", {}, badge(n.alive ? "ALIVE" : "DEAD")),
    el("td", {class: "mono small", text: n.address || "–"}),
    el("td", {}, cpu), el("td", {}, mem), el("td", {}, storeCell),
    el("td", {class: "small", text: workers}),
    el("td", {class: "num", text: String(n.running_tasks || 0)}),
    el("td", {class: "small", text: res.join(" · ") || "–"}),
    el("td", {class: "num small", text: hb}));
}

async function renderOverview(sum) {
  renderCards(sum);
  const [nodes, recent, failed] = await Promise.all([
    api("/api/nodes"), api("/api/tasks?limit=8"), api("/api/tasks?state=FAILED&limit=6")]);
  fill($("nodes-table").tBodies[0], nodes.nodes, nodeRow, "No node has joined yet.", 10);
  const now = sum.time;
  fill($("recent-table").tBodies[0], recent.tasks, t => el("tr", {"data-task": t.task_id},
    el("td", {class: "strong", text: t.name}), el("td", {}, badge(t.state)),
    el("td", {text: t.node || "–"}), el("td", {class: "num", text: fmtDuration(duration(t, now))}),
    el("td", {text: fmtClock(t.ended)})), "No task yet.", 5);
  fill($("failures-table").tBodies[0], failed.tasks, t => el("tr", {"data-task": t.task_id},
    el("td", {class: "strong", text: t.name}),
    el("td", {class: "error-cell", text: errorSummary(t.error) || t.cause, title: t.error || t.cause}),
    el("td", {text: fmtClock(t.ended)})), "No failure.", 3);
}

// ------------------------------------------------------------ tasks
function chip(label, count, active, onclick, state) {
  return el("button", {class: "chip" + (active ? " active" : "") + (state ? " c-" + state.toLowerCase() : ""),
                       type: "button", onclick: onclick, "data-state": state || "ALL"},
    label, el("span", {class: "chip-count", text: String(count)}));
}

function taskCount(sum, st) {
  return DONE_TOTALS[st] ? (sum.tasks.totals[DONE_TOTALS[st]] || 0) : (sum.tasks.by_state[st] || 0);
}

async function renderTasks(sum) {
  const chips = [chip("All", sum.tasks.totals.submitted || 0, ui.taskState === null,
                      () => { ui.taskState = null; refresh(); })];
  for (const st of TASK_STATES) {
    const n = taskCount(sum, st);
    if (!n && ui.taskState !== st && (st === "LOST" || st === "INFEASIBLE")) continue;
    chips.push(chip(st, n, ui.taskState === st, () => { ui.taskState = st; refresh(); }, st));
  }
  $("task-chips").replaceChildren(...chips);
  const data = await api("/api/tasks" + (ui.taskState ? "?state=" + ui.taskState : ""));
  const q = ui.taskText.toLowerCase();
  const rows = q ? data.tasks.filter(t => [t.name, t.node, t.error, t.cause, t.task_id]
    .some(v => v && String(v).toLowerCase().includes(q))) : data.tasks;
  $("tasks-note").textContent = "Showing " + rows.length + " of the newest " + data.limit +
    " tasks" + (ui.taskState ? " in state " + ui.taskState : "") +
    ". Click a task for its error, worker and state changes.";
  const now = sum.time;
  fill($("tasks-table").tBodies[0], rows, t => el("tr", {
      "data-task": t.task_id, class: t.task_id === ui.selectedTask ? "selected" : "",
      onclick: () => selectTask(t.task_id)},
    el("td", {}, el("div", {class: "strong", text: t.name}), el("div", {class: "muted mono small", text: short(t.task_id)})),
    el("td", {}, badge(t.state)),
    el("td", {text: t.node || "–"}),
    el("td", {class: "num", text: t.pid || "–"}),
    el("td", {class: "num", text: String(t.attempt || 0)}),
    el("td", {text: fmtClock(t.submitted)}),
    el("td", {class: "num", text: fmtDuration(duration(t, now))}),
    el("td", {class: t.state === "FAILED" ? "error-cell" : "muted small",
              text: t.state === "FAILED" ? (errorSummary(t.error) || t.cause) : (t.cause || ""),
              title: t.error || t.cause || ""})),
    "No task" + (ui.taskState ? " in state " + ui.taskState : "") + ".", 8);
}

async function selectTask(tid) {
  ui.selectedTask = tid;
  for (const tr of $("tasks-table").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.task === tid);
  const box = $("task-detail");
  box.hidden = false;
  box.replaceChildren(el("p", {class: "muted", text: "Loading…"}));
  let t;
  try {
    t = await api("/api/tasks/" + tid);
  } catch (e) {
    box.replaceChildren(el("p", {class: "error", text: String(e.message || e)}));
    return;
  }
  const dl = el("dl", {class: "kv"});
  const add = (k, v) => { dl.append(el("dt", {text: k}), el("dd", {text: v === null || v === undefined || v === "" ? "–" : String(v)})); };
  add("Task id", t.task_id); add("Kind", t.kind); add("Node", t.node); add("Worker pid", t.pid);
  add("Attempt", t.attempt); add("Submitted", fmtClock(t.submitted)); add("Started", fmtClock(t.started));
  add("Ended", fmtClock(t.ended)); add("Cause", t.cause);
  const parts = [
    el("div", {class: "detail-head"}, el("h3", {text: t.name}), badge(t.state),
       el("button", {type: "button", class: "close", title: "Close",
                     onclick: () => { ui.selectedTask = null; box.hidden = true; }}, "×")),
    dl];
  if (t.error) parts.push(el("h4", {text: "Error"}), el("pre", {class: "traceback", text: t.error}));
  if (t.events && t.events.length) {
    parts.push(el("h4", {text: "State changes"}),
      el("ol", {class: "events"}, ...t.events.map(ev => el("li", {},
        el("span", {class: "mono small", text: fmtClock(ev.time) + " "}),
        (ev.from || "NEW") + " → " + ev.to + " ", el("span", {class: "muted", text: ev.cause})))));
  }
  box.replaceChildren(...parts);
}

// ------------------------------------------------------------ actors
async function renderActors(sum) {
  const chips = [chip("All", sum.actors.total, ui.actorState === null, () => { ui.actorState = null; refresh(); })];
  for (const st of ACTOR_STATES) {
    chips.push(chip(st, sum.actors.by_state[st] || 0, ui.actorState === st,
                    () => { ui.actorState = st; refresh(); }, st));
  }
  $("actor-chips").replaceChildren(...chips);
  const data = await api("/api/actors");
  const rows = ui.actorState ? data.actors.filter(a => a.state === ui.actorState) : data.actors;
  fill($("actors-table").tBodies[0], rows, a => el("tr", {"data-actor": a.actor_id},
    el("td", {}, el("div", {class: "strong", text: a.class_name}), el("div", {class: "muted mono small", text: short(a.actor_id)})),
    el("td", {text: a.name ? a.namespace + "/" + a.name : "–"}),
    el("td", {}, badge(a.state)),
    el("td", {text: a.node || "–"}),
    el("td", {class: "num", text: a.pid || "–"}),
    el("td", {class: "num", text: a.restarts + " / " + (a.max_restarts === -1 ? "∞" : a.max_restarts)}),
    el("td", {class: "num", text: String(a.pending_calls)}),
    el("td", {text: fmtClock(a.created)}),
    el("td", {class: a.state === "DEAD" ? "error-cell" : "muted small", text: a.death_cause || "",
              title: a.death_cause || ""})),
    "No actor.", 9);
}

// ------------------------------------------------------------ objects
async function renderObjects(sum) {
  const data = await api("/api/objects");
  const s = data.summary;
  $("object-cards").replaceChildren(
    card("Objects", String(s.count), Object.entries(s.by_state).map(([k, v]) => v + " " + k.toLowerCase()).join(" · ")),
    card("Total size", fmtBytes(s.bytes)),
    card("In node stores", fmtBytes(s.store_bytes)),
    card("Inline (in messages)", fmtBytes(s.inline_bytes)),
    card("Errors", String(s.errors), "objects holding an exception"));
  $("objects-note").textContent = "The newest " + data.objects.length + " of " + s.count +
    " objects. References = driver/worker handles + tasks and containers holding it.";
  const now = data.time;
  fill($("objects-table").tBodies[0], data.objects, o => el("tr", {"data-object": o.object_id},
    el("td", {class: "mono small", text: shortObject(o.object_id), title: o.object_id}),
    el("td", {text: o.kind === "actor handle" ? "(actor handle)" : (o.task || "–")}),
    el("td", {}, badge(o.error ? "ERROR" : o.state)),
    el("td", {class: "num", text: fmtBytes(o.size)}),
    el("td", {text: o.inline ? "inline" : (o.nodes.join(", ") || "–")}),
    el("td", {class: "num", text: String(o.references), title: o.clients + " client(s), " + o.holds + " hold(s)"}),
    el("td", {class: "mono small", text: o.owner || "–"}),
    el("td", {class: "num", text: fmtDuration(now - o.created)})),
    "No object.", 8);
}

// ------------------------------------------------------------ timeline
const TL_COLORS = {FINISHED: "#43a047", FAILED: "#e53935", RUNNING: "#f9a825", CANCELLED: "#757575"};

function niceStep(span, target) {
  const raw = span / target;
  const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600];
  return steps.find(s => s >= raw) || 600;
}

async function renderTimeline(sum) {
  const data = await api("/api/timeline");
  const win = Number($("timeline-window").value);
  const now = data.now, t0 = now - win;
  const bars = data.tasks.filter(b => (b.end || now) >= t0);
  // lanes: one per worker process of a node; running tasks (whose pid the
  // head learns when they end) are packed into "running" lanes of their node
  const lanes = new Map();
  const laneOf = (key, label, node) => {
    if (!lanes.has(key)) lanes.set(key, {label, node, bars: [], end: -Infinity});
    return lanes.get(key);
  };
  const done = bars.filter(b => b.end !== null).sort((a, b) => a.start - b.start);
  for (const b of done) {
    const key = (b.node || "?") + "|" + (b.pid || "?");
    laneOf(key, (b.node || "?") + " · pid " + (b.pid || "?"), b.node || "?").bars.push(b);
  }
  const running = bars.filter(b => b.end === null).sort((a, b) => a.start - b.start);
  for (const b of running) {
    let k = 0, lane;
    for (;;) {
      lane = laneOf((b.node || "?") + "|run" + k, (b.node || "?") + " · running", b.node || "?");
      if (lane.end <= b.start) break;
      k++;
    }
    lane.bars.push(b);
    lane.end = Infinity;
  }
  const sorted = [...lanes.values()].sort((a, b) => a.node.localeCompare(b.node) || a.label.localeCompare(b.label));
  const box = $("timeline");
  const width = Math.max(box.clientWidth || 900, 600), labelW = 190, rowH = 22, top = 24;
  const height = top + Math.max(sorted.length, 1) * rowH + 8;
  const plotW = width - labelW - 12;
  const x = t => labelW + ((Math.max(t, t0) - t0) / win) * plotW;
  const svg = svgEl("svg", {width, height, viewBox: "0 0 " + width + " " + height, class: "tl-svg", role: "img",
                            "aria-label": "task timeline"});
  const step = niceStep(win, 8);
  for (let s = 0; s <= win + 1e-9; s += step) {
    const xx = labelW + (s / win) * plotW;
    svg.append(svgEl("line", {x1: xx, x2: xx, y1: top - 4, y2: height, class: "tl-grid"}));
    const ago = win - s;
    svg.append(svgEl("text", {x: xx, y: 14, class: "tl-tick", "text-anchor": ago < 1e-9 ? "end" : "middle"},
                     ago < 1e-9 ? "now" : ago % 60 === 0 ? "−" + ago / 60 + " min" : "−" + ago + " s"));
  }
  sorted.forEach((lane, i) => {
    const y = top + i * rowH;
    if (i % 2) svg.append(svgEl("rect", {x: 0, y, width, height: rowH, class: "tl-stripe"}));
    svg.append(svgEl("text", {x: 6, y: y + rowH / 2 + 4, class: "tl-label"}, lane.label));
    for (const b of lane.bars) {
      const x1 = x(b.start), x2 = Math.max(x(b.end || now), x1 + 2);
      const r = svgEl("rect", {x: x1, y: y + 3, width: x2 - x1, height: rowH - 6, rx: 2,
                               fill: TL_COLORS[b.state] || "#90a4ae", class: "tl-bar", "data-task": b.task_id});
      r.append(svgEl("title", {}, b.name + " · " + b.state + " · " + fmtDuration((b.end || now) - b.start) +
                     (b.pid ? " · pid " + b.pid : "")));
      svg.append(r);
    }
  });
  if (!sorted.length) {
    svg.append(svgEl("text", {x: labelW + plotW / 2, y: top + 14, "text-anchor": "middle", class: "tl-label"},
                     "No task ran in this window."));
  }
  box.replaceChildren(svg);
  $("timeline-note").textContent = bars.length + " task(s) in the last " + fmtDuration(win) +
    " (at most " + sum.limits.timeline + " are kept for the timeline). Hover a bar for details.";
  $("timeline-legend").replaceChildren(...Object.entries(TL_COLORS).map(([k, c]) =>
    el("span", {class: "legend-item"}, el("span", {class: "swatch", style: {background: c}}), k)));
}

// ------------------------------------------------------------ DAG
async function renderDag() {
  const msg = $("dag-message"), img = $("dag-img");
  const r = await fetch("/api/dag.svg", {cache: "no-store"});
  if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent("/#dag"); return; }
  if (r.status === 200) {
    const url = URL.createObjectURL(await r.blob());
    img.src = url;
    if (ui.dagUrl) URL.revokeObjectURL(ui.dagUrl);
    ui.dagUrl = url;
    img.hidden = false;
    msg.hidden = true;
    return;
  }
  img.hidden = true;
  msg.hidden = false;
  msg.textContent = await r.text();
}

// ------------------------------------------------------------ jobs
async function renderJobs() {
  const data = await api("/api/jobs/");
  const now = Date.now();
  const rows = data.jobs.slice().reverse();  // newest first
  ui.jobs = Object.fromEntries(rows.map(j => [j.submission_id, j]));
  fill($("jobs-table").tBodies[0], rows, j => el("tr", {"data-job": j.submission_id,
      class: ui.job === j.submission_id ? "selected" : "", onclick: () => selectJob(j.submission_id)},
    el("td", {class: "mono", text: j.submission_id}),
    el("td", {}, badge(j.status)),
    el("td", {class: "mono small entrypoint", text: j.entrypoint, title: j.entrypoint}),
    el("td", {text: j.start_time ? fmtClock(j.start_time / 1000) : "–"}),
    el("td", {class: "num", text: j.start_time ? fmtDuration(((j.end_time || now) - j.start_time) / 1000) : "–"}),
    el("td", {class: "num", text: j.driver_exit_code === null ? "–" : String(j.driver_exit_code)}),
    el("td", {class: j.status === "FAILED" ? "error-cell" : "muted small",
              text: errorSummary(j.message || ""), title: j.message || ""})),
    "No job submitted yet.", 7);
  if (ui.job) await selectJob(ui.job, true);
}

// where a job's entrypoint runs and what it holds there
function jobPlacement(j) {
  if (!j) return "";
  const res = Object.assign({CPU: j.entrypoint_num_cpus, GPU: j.entrypoint_num_gpus,
                             memory: j.entrypoint_memory}, j.entrypoint_resources || {});
  const held = Object.entries(res).filter(([, v]) => v).map(([k, v]) => k + "=" + v).join(", ");
  if (!held) return "runs on the head's node, reserving nothing";
  return "reserves " + held + (j.driver_node_id ? " · on node " + j.driver_node_id : "");
}

async function selectJob(sid, quiet) {
  ui.job = sid;
  const r = await api("/api/jobs/" + encodeURIComponent(sid) + "/logs?offset=0");
  const box = $("job-detail");
  box.hidden = false;
  box.replaceChildren(el("h3", {class: "mono", text: sid}), el("div", {}, badge(r.status)),
                      el("div", {class: "muted small job-placement", text: jobPlacement((ui.jobs || {})[sid])}),
                      el("pre", {class: "logs", text: r.logs || "(no output yet)"}));
  if (!quiet) for (const tr of $("jobs-table").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.job === sid);
}

// ------------------------------------------------------------ loop
const RENDER = {overview: renderOverview, tasks: renderTasks, actors: renderActors,
                objects: renderObjects, timeline: renderTimeline, dag: renderDag,
                jobs: renderJobs};

function setLive(ok, text) {
  $("live").className = "dot " + (ok ? "ok" : "bad");
  $("updated").textContent = text;
}

async function refresh() {
  if (ui.busy) { ui.again = true; return; }
  ui.busy = true;
  clearTimeout(ui.timer);
  try {
    const sum = await api("/api/summary");
    renderHeader(sum);
    await RENDER[ui.page](sum);
    setLive(true, "live · updated " + fmtClock(sum.time));
  } catch (e) {
    setLive(false, "offline: " + (e.message || e));
  } finally {
    ui.busy = false;
    if (ui.again) { ui.again = false; refresh(); return; }
    ui.timer = setTimeout(tick, ui.page === "dag" ? DAG_POLL_MS : POLL_MS);
  }
}

function tick() {
  if (document.hidden) { ui.timer = setTimeout(tick, POLL_MS); return; }
  refresh();
}

function showPage() {
  const want = (location.hash || "#overview").slice(1);
  ui.page = PAGES.includes(want) ? want : "overview";
  for (const p of PAGES) $("page-" + p).hidden = p !== ui.page;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.page === ui.page);
  document.title = "flowcore · " + ui.page;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  window.addEventListener("hashchange", showPage);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  $("task-search").addEventListener("input", e => { ui.taskText = e.target.value; refresh(); });
  $("timeline-window").addEventListener("change", refresh);
  showPage();
});
