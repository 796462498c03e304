// Confide's dashboard: reads the coordinator's JSON endpoints once, then follows its event
// stream (server-sent events). Read-only; every string from the server goes in as text.
"use strict";

const state = { nodes: [], jobs: [], job: null, selected: "", seen: new Set(), events: 0,
                charts: {}, cursor: 0, refetch: null, progress: new Map() };
const MAX_EVENTS = 2000;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function ago(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago`
    : new Date(ms).toLocaleString();
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// ------------------------------------------------------------------ nodes

function renderNodes(nodes) {
  state.nodes = nodes;
  const body = document.querySelector("#nodes tbody");
  const rows = document.createDocumentFragment();
  let online = 0;
  for (const n of nodes) {
    if (n.online) online += 1;
    const tr = el("tr");
    tr.dataset.node = n.id;
    tr.dataset.online = n.online ? "1" : "0";
    tr.append(el("td", n.id.slice(0, 16)), el("td", n.name));
    const status = el("td");
    status.append(el("span", n.online ? (n.busy ? "busy" : "online") : "offline",
                     "badge " + (n.online ? (n.busy ? "busy" : "on") : "off")),
                  el("span", n.busy ? progressText(n.id) : "", "progress"));
    tr.append(status, el("td", n.device || "–"));
    const sets = Object.entries(n.datasets).map(([k, v]) => `${k} (${v})`).join(", ");
    tr.append(el("td", sets || (n.disclosure === "hidden" ? "hidden by its owner" : "–")));
    tr.append(el("td", ago(n.last_heartbeat_ms)));
    const spent = n.privacy.map(p => `${p.dataset}: ${fmt(p.epsilon_spent, 2)}`
      + (p.epsilon_budget ? ` / ${fmt(p.epsilon_budget, 1)}` : "")).join(", ");
    tr.append(el("td", spent || "–"));
    rows.append(tr);
  }
  body.replaceChildren(rows);
  document.getElementById("nodes-summary").textContent =
    `${online} online of ${nodes.length} registered`;
  if (!document.body.dataset.nodesRendered) {
    document.body.dataset.nodesRendered = String(performance.now());
  }
}

function progressText(nodeId) {
  const p = state.progress.get(nodeId);
  if (!p) return "";
  return ` round ${p.round}: step ${p.step}/${p.total}` + (p.loss === null ? "" :
                                                            `, loss ${fmt(p.loss, 3)}`);
}

function showProgress(rows) {  // live-only training progress, beside the node
  for (const p of rows) {
    state.progress.set(p.node, p);
    const row = document.querySelector(`#nodes tbody tr[data-node="${CSS.escape(p.node)}"]`);
    const cell = row && row.querySelector(".progress");
    if (cell) cell.textContent = progressText(p.node);
  }
}

// ------------------------------------------------------------------ jobs

function renderJobs(jobs) {
  state.jobs = jobs;
  const body = document.querySelector("#jobs tbody");
  const rows = document.createDocumentFragment();
  for (const j of jobs) {
    const tr = el("tr");
    tr.dataset.job = j.id;
    if (j.id === state.selected) tr.className = "selected";
    tr.append(el("td", j.id), el("td", j.name), el("td", j.method));
    const st = el("td");
    st.append(el("span", j.state, "badge " + j.state));
    const flags = [j.anonymous && "anonymous", j.secure_aggregation && "secure aggregation",
                   j.budget > 0 && `budget ${j.budget}`].filter(Boolean).join(", ");
    tr.append(st, el("td", `${j.rounds_completed} / ${j.rounds}`), el("td", flags || "–"));
    tr.addEventListener("click", () => select(j.id));
    rows.append(tr);
  }
  body.replaceChildren(rows);
  if (!state.selected && jobs.length) select(jobs[0].id);
}

function select(jobId) {
  state.selected = jobId;
  history.replaceState(null, "", "#job=" + encodeURIComponent(jobId));
  for (const tr of document.querySelectorAll("#jobs tbody tr")) {
    tr.className = tr.dataset.job === jobId ? "selected" : "";
  }
  loadJob();
}

function lineChart(id, datasets, scales) {
  return new Chart(document.getElementById(id), {
    type: "line",
    data: { labels: [], datasets: datasets.map(d => ({ pointRadius: 3, tension: 0, spanGaps: true,
                                                        data: [], ...d })) },
    options: { animation: false, maintainAspectRatio: false, responsive: true,
               plugins: { legend: { labels: { boxWidth: 12 } } },
               scales: { x: { title: { display: true, text: "round" } }, ...scales } },
  });
}

function charts() {
  if (state.charts.quality) return state.charts;
  state.charts.quality = lineChart("chart-quality", [
    { label: "accuracy", borderColor: "#2e8b57", backgroundColor: "#2e8b57", yAxisID: "y" },
    { label: "loss", borderColor: "#b03a2e", backgroundColor: "#b03a2e", yAxisID: "y1" },
  ], { y: { position: "left", title: { display: true, text: "accuracy" } },
       y1: { position: "right", grid: { drawOnChartArea: false },
             title: { display: true, text: "loss" } } });
  state.charts.bytes = lineChart("chart-bytes", [
    { label: "bytes up", borderColor: "#1f6fb2", backgroundColor: "#1f6fb2" },
    { label: "bytes down", borderColor: "#d68910", backgroundColor: "#d68910" },
  ], { y: { type: "logarithmic", title: { display: true, text: "bytes" } } });
  state.charts.seconds = lineChart("chart-seconds", [
    { label: "seconds", borderColor: "#5b6675", backgroundColor: "#5b6675" },
  ], { y: { beginAtZero: true } });
  state.charts.epsilon = lineChart("chart-epsilon", [
    { label: "epsilon", borderColor: "#7d3c98", backgroundColor: "#7d3c98" },
  ], { y: { beginAtZero: true } });
  return state.charts;
}

function setSeries(chart, labels, series) {
  chart.data.labels = labels;
  series.forEach((values, i) => { chart.data.datasets[i].data = values; });
  chart.update("none");
}

function renderJob(job) {
  state.job = job;
  const panel = document.getElementById("job");
  panel.hidden = false;
  document.getElementById("job-title").textContent = `${job.id} (${job.method})`;
  const badge = document.getElementById("job-state");
  badge.textContent = job.state;
  badge.className = "badge " + job.state;
  const notes = [`${job.rounds_completed} of ${job.rounds} rounds`];
  if (job.reason) notes.push(job.reason);
  if (job.anonymous) notes.push("anonymous job: no per-node contributions are shown");
  document.getElementById("job-note").textContent = notes.join(" · ");
  const rounds = job.round_list.filter(r => r.state === "completed");
  panel.dataset.rounds = String(rounds.length);
  const labels = rounds.map(r => r.round);
  const positive = v => (v > 0 ? v : null);  // log scale: a zero has no place on it
  const c = charts();
  setSeries(c.quality, labels, [rounds.map(r => r.accuracy), rounds.map(r => r.loss)]);
  setSeries(c.bytes, labels, [rounds.map(r => positive(r.bytes_up)),
                              rounds.map(r => positive(r.bytes_down))]);
  setSeries(c.seconds, labels, [rounds.map(r => r.seconds)]);
  setSeries(c.epsilon, labels, [rounds.map(r => r.epsilon)]);
  caption("chart-quality", rounds.length && rounds.every(r => r.accuracy === null)
    ? "no held-out accuracy yet: the submitter reports it (ReportEvaluation) when it has evaluated a round" : "");
  caption("chart-epsilon", rounds.length && rounds.every(r => r.epsilon === null)
    ? "no differential privacy on this job" : "");
  const dropped = document.querySelector("#dropped tbody");
  const drows = document.createDocumentFragment();
  for (const r of job.round_list) {
    for (const d of r.dropped) {
      const tr = el("tr");
      tr.append(el("td", r.round), el("td", d.node ? d.node.slice(0, 16) : "(anonymous)"),
                el("td", d.reason));
      drows.append(tr);
    }
  }
  if (!drows.childNodes.length) drows.append(emptyRow(3, "none"));
  dropped.replaceChildren(drows);
  const payments = document.querySelector("#payments tbody");
  const prows = document.createDocumentFragment();
  for (const p of job.payments) {
    const tr = el("tr");
    tr.append(el("td", p.round), el("td", p.node ? p.node.slice(0, 16) : "(round total)"),
              el("td", fmt(p.payment, 3)));
    prows.append(tr);
  }
  if (!prows.childNodes.length) prows.append(emptyRow(3, job.budget > 0 ? "none yet" :
                                                         "no incentive budget on this job"));
  payments.replaceChildren(prows);
}

function caption(canvasId, text) {  // a chart with nothing to draw says why
  const figure = document.getElementById(canvasId).closest("figure");
  let note = figure.querySelector(".empty");
  if (!note) { note = el("p", "", "empty"); figure.append(note); }
  note.textContent = text;
}

function emptyRow(span, text) {
  const tr = el("tr");
  const td = el("td", text, "note");
  td.colSpan = span;
  tr.append(td);
  return tr;
}

async function loadJob() {
  if (!state.selected) return;
  try {
    renderJob(await getJSON("/api/jobs/" + encodeURIComponent(state.selected)));
  } catch (err) {
    document.getElementById("job-note").textContent = String(err);
  }
}

function scheduleJobReload() {  // many events in a burst: one fetch
  if (state.refetch) return;
  state.refetch = setTimeout(() => { state.refetch = null; loadJob(); }, 150);
}

// ------------------------------------------------------------------ events

function addEvent(e) {
  const key = `${e.job}/${e.seq}`;
  if (state.seen.has(key)) return;
  state.seen.add(key);
  const list = document.getElementById("events");
  const li = el("li");
  li.dataset.kind = e.kind;
  li.append(el("span", new Date(e.time_ms).toLocaleTimeString() + " "),
            el("span", e.job + " ", "job"), el("span", e.kind, "kind"));
  const parts = [];
  if (e.round) parts.push(`round ${e.round}`);
  if (e.node) parts.push(`node ${e.node.slice(0, 12)}`);
  if (e.message) parts.push(e.message);
  li.append(el("span", parts.length ? " " + parts.join(" · ") : ""));
  list.prepend(li);
  while (list.childNodes.length > MAX_EVENTS) list.lastChild.remove();
  state.events += 1;
  document.getElementById("events-count").textContent = `${state.events} events`;
  if (e.job === state.selected) scheduleJobReload();
}

function follow() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/stream?after=" + state.cursor);
  source.onopen = () => { live.textContent = "live"; live.className = "badge on"; };
  source.onerror = () => { live.textContent = "reconnecting"; live.className = "badge off"; };
  source.addEventListener("event", m => addEvent(JSON.parse(m.data)));
  source.addEventListener("cursor", m => { state.cursor = JSON.parse(m.data); });
  source.addEventListener("nodes", m => renderNodes(JSON.parse(m.data)));
  source.addEventListener("jobs", m => renderJobs(JSON.parse(m.data)));
  source.addEventListener("progress", m => showProgress(JSON.parse(m.data)));
  window.dashboardSource = source;
}

async function main() {
  const wanted = new URLSearchParams(location.hash.slice(1)).get("job");
  if (wanted) state.selected = wanted;
  const [nodes, jobs, recent] = await Promise.all(
    [getJSON("/api/nodes"), getJSON("/api/jobs"), getJSON("/api/events?count=500")]);
  renderNodes(nodes.nodes);
  renderJobs(jobs.jobs);
  for (const e of recent.events) addEvent(e);
  state.cursor = recent.cursor;
  if (state.selected) loadJob();
  follow();
}

window.dashboard = state;
main().catch(err => { document.getElementById("live").textContent = String(err); });
