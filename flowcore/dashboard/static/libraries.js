// flowcore dashboard: the Serve, Tune and Datasets pages.  The libraries
// publish their views into the head's key-value table; /api/serve,
// /api/tune and /api/datasets return them.  Loaded after app.js, whose
// helpers (el, fill, badge, api, card, fmt*) and tables (PAGES, RENDER) it uses.
"use strict";

const libUi = {experiment: null, dataset: null};

function fmtMs(x) { return x === null || x === undefined ? "–" : fmtNum(x) + " ms"; }

function sinceText(start, end, now) {
  if (!start) return "–";
  return fmtDuration((end || now) - start);
}

// ------------------------------------------------------------ serve
async function renderServe() {
  const v = await api("/api/serve");
  const apps = v.applications || [];
  const deps = [], reps = [];
  for (const a of apps) {
    for (const d of a.deployments || []) {
      deps.push(Object.assign({app: a.name}, d));
      for (const r of d.replicas || []) reps.push(Object.assign({app: a.name, deployment: d.name}, r));
    }
  }
  const rps = deps.reduce((s, d) => s + (d.requests_per_s || 0), 0);
  $("serve-note").textContent = v.state === "NOT_STARTED" ? "Serve is not running on this cluster (serve.run starts it)." :
    v.state === "SHUTDOWN" ? "Serve was shut down." :
    "Published by the serve controller about once a second" + (v.time ? " · last at " + fmtClock(v.time) : "") +
    (v.proxy_url ? " · HTTP proxy " + v.proxy_url : "") + ".";
  $("serve-cards").replaceChildren(
    card("Applications", String(apps.length), apps.filter(a => a.status === "RUNNING").length + " running"),
    card("Deployments", String(deps.length), deps.filter(d => d.status === "HEALTHY").length + " healthy"),
    card("Replicas", String(reps.length), reps.filter(r => r.state === "RUNNING").length + " running"),
    card("Requests/s", fmtNum(Math.round(rps * 10) / 10), "all deployments"));
  fill($("serve-apps-table").tBodies[0], apps, a => el("tr", {"data-app": a.name},
    el("td", {class: "strong", text: a.name}),
    el("td", {}, badge(a.status)),
    el("td", {class: "mono", text: a.route_prefix === null ? "–" : a.route_prefix}),
    el("td", {text: a.ingress || "–"}),
    el("td", {text: fmtClock(a.last_deployed_time_s)}),
    el("td", {class: a.status === "DEPLOY_FAILED" ? "error-cell" : "muted small", text: a.message || ""})),
    "No application.", 6);
  fill($("serve-deployments-table").tBodies[0], deps, d => el("tr", {"data-deployment": d.name},
    el("td", {}, el("div", {class: "strong", text: d.name}), el("div", {class: "muted small", text: d.app})),
    el("td", {}, badge(d.status)),
    el("td", {class: "num", text: (d.replicas || []).filter(r => r.state === "RUNNING").length + " / " + d.target_num_replicas}),
    el("td", {class: "num", text: fmtNum(d.requests_per_s)}),
    el("td", {class: "num", text: fmtMs(d.latency_ms_p50)}),
    el("td", {class: "num", text: fmtMs(d.latency_ms_p99)}),
    el("td", {class: "num", text: String(d.ongoing_requests || 0)}),
    el("td", {class: "num", text: String(d.requests_total || 0)}),
    el("td", {class: "num", text: String(d.errors_total || 0)}),
    el("td", {class: "muted small", text: d.message || ""})),
    "No deployment.", 10);
  fill($("serve-replicas-table").tBodies[0], reps, r => el("tr", {"data-replica": r.replica_id},
    el("td", {class: "mono small", text: r.replica_id}),
    el("td", {text: r.app + " / " + r.deployment}),
    el("td", {}, badge(r.state)),
    el("td", {class: "num", text: r.pid || "–"}),
    el("td", {class: "mono small", text: short(r.node_id)}),
    el("td", {class: "num", text: String(r.queue_len || 0)}),
    el("td", {class: "mono small", text: r.version || "–"})),
    "No replica.", 7);
}

// ------------------------------------------------------------ tune
async function renderTune() {
  const v = await api("/api/tune");
  const exps = v.experiments || [];
  const now = v.time;
  if (!exps.some(e => e.key === libUi.experiment)) libUi.experiment = exps.length ? exps[0].key : null;
  fill($("tune-table").tBodies[0], exps, e => el("tr", {"data-experiment": e.name,
      class: e.key === libUi.experiment ? "selected" : "",
      onclick: () => { libUi.experiment = e.key; refresh(); }},
    el("td", {}, el("div", {class: "strong", text: e.name}), el("div", {class: "muted mono small", text: e.path || ""})),
    el("td", {}, badge(e.state)),
    el("td", {text: e.metric ? e.metric + " (" + (e.mode || "?") + ")" : "–"}),
    el("td", {class: "small", text: e.num_trials + " · " + Object.entries(e.trial_counts || {}).map(([k, n]) => n + " " + k.toLowerCase()).join(", ")}),
    el("td", {text: fmtClock(e.start_time)}),
    el("td", {class: "num", text: sinceText(e.start_time, e.end_time, now)})),
    "No Tune experiment has run on this cluster yet.", 6);
  const e = exps.find(x => x.key === libUi.experiment);
  $("tune-trials-title").textContent = e ? "Trials of " + e.name : "Trials";
  const trials = e ? e.trials || [] : [];
  fill($("tune-trials-table").tBodies[0], trials, t => el("tr", {"data-trial": t.trial_id,
      class: e && t.trial_id === e.best_trial_id ? "best" : ""},
    el("td", {class: "mono small", text: t.name}),
    el("td", {}, badge(t.status)),
    el("td", {class: "num", text: String(t.iteration || 0)}),
    el("td", {class: "num", text: t.metric === null || t.metric === undefined ? "–" :
      (typeof t.metric === "number" ? fmtNum(t.metric) : String(t.metric)) + (e && t.trial_id === e.best_trial_id ? " ★" : "")}),
    el("td", {class: "mono small config", text: t.config, title: t.config}),
    el("td", {class: t.error ? "error-cell" : "muted small", text: t.error || t.explain || ""})),
    "No trial.", 6);
}

// ------------------------------------------------------------ datasets
async function renderDatasets() {
  const v = await api("/api/datasets");
  const list = v.datasets || [];
  const now = v.time;
  if (!list.some(d => d.key === libUi.dataset)) libUi.dataset = list.length ? list[0].key : null;
  fill($("datasets-table").tBodies[0], list, d => el("tr", {"data-dataset": d.dataset_id,
      class: d.key === libUi.dataset ? "selected" : "",
      onclick: () => { libUi.dataset = d.key; refresh(); }},
    el("td", {class: "plan-cell"}, ...planChain(d.plan || [])),
    el("td", {}, badge(d.state)),
    el("td", {class: "num", text: String(d.rows || 0)}),
    el("td", {class: "num", text: String((d.operators || []).reduce((s, o) => s + (o.tasks || 0), 0))}),
    el("td", {text: fmtClock(d.start_time)}),
    el("td", {class: "num", text: sinceText(d.start_time, d.end_time, now)}),
    el("td", {class: "num", text: d.pid || "–"}),
    el("td", {class: d.error ? "error-cell" : "muted small", text: d.error || ""})),
    "No dataset has been executed on this cluster yet.", 8);
  const d = list.find(x => x.key === libUi.dataset);
  $("dataset-ops-title").textContent = d ? "Operators of " + d.name : "Operators";
  fill($("dataset-ops-table").tBodies[0], d ? d.operators || [] : [], o => el("tr", {},
    el("td", {class: "mono small", text: o.operator}),
    el("td", {class: "num", text: String(o.tasks)}),
    el("td", {class: "num", text: String(o.actors || 0)}),
    el("td", {class: "num", text: String(o.blocks)}),
    el("td", {class: "num", text: String(o.rows)}),
    el("td", {class: "num", text: fmtBytes(o.bytes)}),
    el("td", {class: "num", text: fmtDuration(o.wall_s)})),
    "No operator ran yet.", 7);
}

function planChain(ops) {
  const out = [];
  ops.forEach((name, i) => {
    if (i) out.push(el("span", {class: "plan-arrow", text: " → "}));
    out.push(el("span", {class: "plan-op", text: name}));
  });
  return out;
}

PAGES.push("serve", "tune", "datasets");
Object.assign(RENDER, {serve: renderServe, tune: renderTune, datasets: renderDatasets});
