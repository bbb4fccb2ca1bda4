// budget-ledger dashboard: plain JS, data from the admin API, charts by uPlot.
"use strict";
const KEY = "ledger-admin-key";
const $ = (s) => document.querySelector(s);
const fmt = (usd) => (usd === null || usd === undefined) ? "-" : "$" + Number(usd).toFixed(6).replace(/0+$/, "").replace(/\.$/, "");
const when = (t) => t ? new Date(t).toISOString().replace("T", " ").slice(0, 16) + " UTC" : "-";
let plot = null;

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY) } });
  if (r.status === 401) { sessionStorage.removeItem(KEY); showLogin("That key was refused."); throw new Error("401"); }
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

function showLogin(message) {
  $("#dashboard").hidden = true; $("#logout").hidden = true; $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

function rows(table, items, cells) {
  const body = $(table + " tbody");
  body.replaceChildren(...items.map((item) => {
    const tr = document.createElement("tr");
    for (const [value, cls] of cells(item)) {
      const td = document.createElement("td");
      if (value instanceof Node) td.append(value); else td.textContent = value;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  }));
}

function bar(tag) {
  const el = document.createElement("div");
  el.className = "bar";
  const fill = document.createElement("div");
  const pct = tag.max_budget ? (Number(tag.spend) / Number(tag.max_budget)) * 100 : 0;
  fill.className = "fill" + (pct >= 100 ? " over" : pct >= 80 ? " warn" : "");
  fill.style.width = Math.min(pct, 100) + "%";
  el.append(fill);
  for (const t of tag.alert_thresholds || []) {
    const mark = document.createElement("div");
    mark.className = "mark"; mark.style.left = Math.min(Number(t) * 100, 100) + "%"; mark.title = Math.round(t * 100) + "%";
    el.append(mark);
  }
  return el;
}

function chart(activity, stackTag) {
  const days = [...new Set(activity.map((r) => r.day))].sort();
  if (!days.length) days.push(new Date().toISOString().slice(0, 10));
  const keyOf = stackTag ? (r) => r.model : (r) => r.tag;
  const rowsIn = stackTag ? activity.filter((r) => r.tag === stackTag) : activity;
  const names = [...new Set(rowsIn.map(keyOf))].sort();
  const x = days.map((d) => Date.parse(d + "T00:00:00Z") / 1000);
  const series = names.map((n) => days.map((d) => rowsIn.filter((r) => r.day === d && keyOf(r) === n).reduce((s, r) => s + Number(r.spend), 0)));
  // stacked: each series adds the ones before it; drawn tallest first so all show
  for (let i = 1; i < series.length; i++) series[i] = series[i].map((v, j) => v + series[i - 1][j]);
  const order = names.map((n, i) => i).reverse();
  const colors = ["#3b82f6", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#84cc16", "#ec4899"];
  const bars = uPlot.paths.bars({ size: [0.6, 48] });
  const opts = {
    width: Math.min(1100, window.innerWidth - 80), height: 260,
    scales: {
      x: { time: true, range: () => [x[0] - 86400, x[x.length - 1] + 86400] },
      y: { range: (u, min, max) => [0, (max || 1e-6) * 1.15] },
    },
    series: [{}, ...order.map((i) => ({
      label: names[i], stroke: colors[i % colors.length], fill: colors[i % colors.length] + "cc", paths: bars,
      value: (u, v) => v == null ? "-" : fmt(v),
    }))],
    axes: [{}, { size: 80, values: (u, vals) => vals.map((v) => fmt(v)) }],
  };
  if (plot) plot.destroy();
  plot = new uPlot(opts, [x, ...order.map((i) => series[i])], $("#chart"));
}

// /tag/daily/activity answers in LiteLLM's shape (per day: breakdown by tag, or by
// model when one tag is asked for); the chart wants flat {day, tag, model, spend} rows.
function flatten(activity, stackTag) {
  return activity.results.flatMap((d) => Object.entries(stackTag ? d.breakdown.models : d.breakdown.entities)
    .map(([name, m]) => ({ day: d.date, tag: stackTag || name, model: stackTag ? name : "", spend: m.metrics.spend })));
}

async function refresh() {
  const since = new Date(Date.now() - 30 * 86400e3).toISOString().slice(0, 10);
  const metaKey = $("#meta-key").value.trim() || "customer";
  const stackTag = $("#stack").value;
  const [tags, activity, users, meta, denials, alerts] = await Promise.all([
    api("/tag/list"),
    api("/tag/daily/activity?page_size=1000&start_date=" + since + (stackTag ? "&tags=" + encodeURIComponent(stackTag) : "")),
    api("/spend/users?limit=10"),
    api("/spend/report?interval=month&group_by=" + encodeURIComponent("metadata." + metaKey)),
    api("/spend/logs?kind=denied&limit=15"),
    api("/alerts?limit=15"),
  ]);
  rows("#tags", tags, (t) => [
    [t.name],
    [bar(t)],
    [t.max_budget ? Math.round((Number(t.spend) / Number(t.max_budget)) * 100) + "% of " + fmt(t.max_budget) : fmt(t.total_spend) + " (no budget)", "pct"],
    [when(t.reset_at)],
    [t.forecast_exhausted_at ? "runs out " + when(t.forecast_exhausted_at) : "-"],
  ]);
  const select = $("#stack"); const chosen = select.value;
  select.replaceChildren(new Option("by tag", ""), ...tags.map((t) => new Option(t.name + " by model", t.name)));
  select.value = chosen;
  chart(flatten(activity, chosen), chosen);
  rows("#users", users, (u) => [[u.user_hash.slice(0, 12) + "…"], [fmt(u.spend), "num"], [u.requests, "num"]]);
  const totals = {};
  for (const r of meta.rows) { const k = r.group ?? "(none)"; totals[k] = totals[k] || { spend: 0, requests: 0 }; totals[k].spend += Number(r.spend); totals[k].requests += r.requests; }
  rows("#meta", Object.entries(totals).sort((a, b) => b[1].spend - a[1].spend).slice(0, 10), ([k, v]) => [[k], [fmt(v.spend), "num"], [v.requests, "num"]]);
  rows("#denials", denials, (d) => [[when(d.recorded_at)], [d.request_id.slice(0, 12)], [d.tags.join(", ")]]);
  rows("#alerts", alerts, (a) => [[when(a.recorded_at)], [a.tag], [a.description]]);
  $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function open() {
  $("#login").hidden = true; $("#dashboard").hidden = false; $("#logout").hidden = false;
  try { await refresh(); } catch (e) { if (e.message !== "401") $("#updated").textContent = String(e); }
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("#key").value.trim());
  $("#key").value = "";
  open();
});
$("#logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(); });
$("#stack").addEventListener("change", () => refresh());
$("#meta-key").addEventListener("change", () => refresh());
if (sessionStorage.getItem(KEY)) open(); else showLogin();
setInterval(() => { if (sessionStorage.getItem(KEY)) refresh().catch(() => {}); }, 10000);
