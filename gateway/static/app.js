// budget-ledger dashboard: plain JS over the admin API, charts by uPlot (vendored).
// Every day is a UTC day and every time is shown in UTC, whatever the browser's zone.
"use strict";

const KEY = "ledger-admin-key";
const RANGE = "ledger-range";
const POLL_MS = 30000;
const FIGURE_SPACE = "\u2007"; // as wide as a digit: pads decimals so they line up
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const COLORS = ["#2563eb", "#f59e0b", "#10b981", "#8b5cf6", "#ef4444", "#06b6d4", "#84cc16", "#ec4899", "#64748b"];

const $ = (s, root = document) => root.querySelector(s);
const enc = encodeURIComponent;

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  e.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return e;
}

// ------------------------------------------------------------------ formatting

// $1,234.50 at or above a dollar; three significant digits below ($0.0594, $0.000123); $0.50 not $0.5.
function money(v) {
  if (v === null || v === undefined || v === "") return "—";
  const n = Number(v);
  if (!Number.isFinite(n)) return "—";
  const a = Math.abs(n);
  let s;
  if (a === 0) s = "0.00";
  else if (a >= 1) s = a.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  else if (a < 1e-9) s = "0.000000001";
  else {
    const digits = Math.min(9, Math.max(2, 2 - Math.floor(Math.log10(a))));
    s = a.toFixed(digits);
    if (Number(s) >= 1) s = "1.00";
    s = s.replace(/(\.\d\d\d*?)0+$/, "$1");
  }
  return (n < 0 ? "-$" : a > 0 && a < 1e-9 ? "<$" : "$") + s;
}

const decimalsOf = (s) => { const m = /\.(\d+)/.exec(s); return m ? m[1].length : 0; };

// Money strings of one column, padded with figure spaces so the decimal points line up.
function alignMoney(strings) {
  const width = Math.max(0, ...strings.filter((s) => s.includes("$")).map(decimalsOf));
  return strings.map((s) => (s.includes("$") ? s + FIGURE_SPACE.repeat(width - decimalsOf(s)) : s));
}

// Sums of dollar amounts, rounded to a picodollar so float noise (0.0010442000000000001)
// never reaches a label; amounts are exact decimals at the API.
const addUsd = (a, b) => Math.round((a + b) * 1e12) / 1e12;
const count = (n) => Number(n || 0).toLocaleString("en-US");
const pct = (x) => (x > 0 && x < 0.1 ? "<0.1" : x >= 10 || x === 0 ? Math.round(x) : x.toFixed(1)) + "%";
const dayLabel = (iso) => { const [, m, d] = iso.split("-"); return MONTHS[Number(m) - 1] + " " + Number(d); };
const longDay = (iso) => { const [y] = iso.split("-"); return dayLabel(iso) + ", " + y; };
function utc(t, { date = true } = {}) {
  if (!t) return "—";
  const s = new Date(t).toISOString();
  return (date ? s.slice(0, 10) + " " : "") + s.slice(11, 16) + " UTC";
}
// "Nov 30, 00:00 UTC": short enough for a card
const moment = (t) => { const s = new Date(t).toISOString(); return dayLabel(s.slice(0, 10)) + ", " + s.slice(11, 16) + " UTC"; };
const todayUTC = () => new Date().toISOString().slice(0, 10);
function addDays(iso, n) {
  const d = new Date(iso + "T00:00:00Z");
  d.setUTCDate(d.getUTCDate() + n);
  return d.toISOString().slice(0, 10);
}
const shortHash = (h) => (h ? h.slice(0, 12) + "…" : "(no user)");

function windowName(duration) {
  if (!duration) return "for its lifetime (never resets)";
  if (duration === "1d") return "per UTC day";
  if (duration === "7d" || duration === "1w") return "per ISO week (from Monday, UTC)";
  if (duration === "30d" || duration === "1mo") return "per calendar month (UTC)";
  return "per " + duration + " window";
}

// ------------------------------------------------------------------ API

class ApiError extends Error {}

async function api(path, { allow404 = false } = {}) {
  const r = await fetch(path, {
    headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY), "x-ledger-client": "dashboard" },
  });
  if (r.status === 401) {
    sessionStorage.removeItem(KEY);
    showLogin("That key was refused: paste the admin key again.");
    throw new ApiError("401");
  }
  if (r.status === 404 && allow404) return null;
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error.message; } catch (_) { /* not JSON */ }
    throw new ApiError(path.split("?")[0] + ": " + message);
  }
  return r.json();
}

// ------------------------------------------------------------------ state

const state = {
  start: null, // inclusive UTC days, YYYY-MM-DD
  end: null,
  mode: "model",
  metaKey: "customer",
  dimension: "team",
  charts: {},
  drawn: {}, // what each chart shows, for tests and for people poking at the console
};
window.ledgerDashboard = state;

function setRange(start, end) {
  state.start = start;
  state.end = end;
  $("#start").value = start;
  $("#end").value = end;
  sessionStorage.setItem(RANGE, JSON.stringify([start, end]));
}

function loadRange() {
  try {
    const [s, e] = JSON.parse(sessionStorage.getItem(RANGE));
    if (/^\d{4}-\d\d-\d\d$/.test(s) && /^\d{4}-\d\d-\d\d$/.test(e) && s <= e) return setRange(s, e);
  } catch (_) { /* none kept */ }
  setRange(addDays(todayUTC(), -29), todayUTC());
}

const rangeQuery = () => "start_date=" + state.start + "&end_date=" + state.end;

// ------------------------------------------------------------------ pieces

function fillTable(id, items, cells, { moneyCols = [] } = {}) {
  const rows = items.map(cells);
  for (const c of moneyCols) {
    const aligned = alignMoney(rows.map((r) => (typeof r[c][0] === "string" ? r[c][0] : "")));
    rows.forEach((r, i) => { if (typeof r[c][0] === "string") r[c][0] = aligned[i]; });
  }
  // each cell carries its column's name: narrow screens show it next to the value
  const labels = [...document.querySelectorAll(id + " thead th")].map((th) => th.textContent.trim());
  $(id + " tbody").replaceChildren(...rows.map((r) => {
    const tr = el("tr");
    for (const [i, [value, cls, title]] of r.entries()) {
      const td = el("td", { class: cls, title, "data-label": labels[i] });
      if (value instanceof Node) td.append(value); else td.textContent = value ?? "—";
      tr.append(td);
    }
    return tr;
  }));
  $(id).hidden = items.length === 0;
}

function empty(id, show, ...content) {
  const box = $(id);
  box.hidden = !show;
  box.replaceChildren(...(show ? content : []));
}

const code = (text) => el("pre", {}, el("code", { text }));
const keyHeader = 'Authorization: Bearer $(cat .data/admin_key)';

function card(title, value, sub, cls) {
  return el("div", { class: "card " + (cls || "") },
    el("div", { class: "card-title", text: title }),
    el("div", { class: "card-value", text: value }),
    sub ? el("div", { class: "card-sub" }, ...[].concat(sub)) : null);
}

// A tag's state in its current window: "blocked" when spend and reservations reach
// the budget, or when its last refusal is newer than anything it admitted since the
// window began and since its definition last changed.
function status(tag, denying) {
  if (!tag || tag.max_budget === null || tag.max_budget === undefined) return { key: "none", label: "no budget" };
  const max = Number(tag.max_budget);
  const used = Number(tag.spend) + Number(tag.reserved);
  const d = denying;
  const t = (x) => (x ? Date.parse(x) : 0);
  const refusing = d && t(d.last_denied_at) >= t(tag.window_start) && t(d.last_denied_at) >= t(tag.updated_at)
    && t(d.last_denied_at) > t(d.last_admitted_at);
  if (used >= max || refusing) return { key: "blocked", label: "blocked" };
  if (tag.soft_budget !== null && tag.soft_budget !== undefined && Number(tag.spend) >= Number(tag.soft_budget)) {
    return { key: "warn", label: "over soft budget" };
  }
  if (max > 0 && used / max >= 0.8) return { key: "warn", label: "near limit" };
  if (d && t(d.last_denied_at) >= t(tag.window_start) && t(d.last_denied_at) >= t(tag.updated_at)) {
    return { key: "warn", label: "refused some" }; // larger requests, while smaller ones still pass
  }
  return { key: "ok", label: "ok" };
}

const pill = (s) => el("span", { class: "pill " + s.key, text: s.label });

function budgetBar(tag, st) {
  const max = Number(tag.max_budget);
  const spend = Number(tag.spend);
  const reserved = Number(tag.reserved);
  const share = (v) => (max > 0 ? Math.min(100, (v / max) * 100) : v > 0 ? 100 : 0);
  const bar = el("div", { class: "bar", role: "img", "aria-label": money(spend) + " of " + money(max) });
  const fill = el("div", { class: "fill " + st.key });
  fill.style.width = share(spend) + "%";
  const flight = el("div", { class: "flight", title: money(reserved) + " reserved by requests in flight" });
  flight.style.left = share(spend) + "%";
  flight.style.width = Math.max(0, share(spend + reserved) - share(spend)) + "%";
  bar.append(fill, flight);
  for (const t of tag.alert_thresholds || []) {
    const mark = el("div", { class: "mark", title: "alert at " + Math.round(Number(t) * 100) + "%" });
    mark.style.left = Math.min(Number(t) * 100, 100) + "%";
    bar.append(mark);
  }
  if (tag.soft_budget !== null && tag.soft_budget !== undefined && max > 0) {
    const soft = el("div", { class: "soft", title: "soft budget " + money(tag.soft_budget) });
    soft.style.left = Math.min((Number(tag.soft_budget) / max) * 100, 100) + "%";
    bar.append(soft);
  }
  const used = spend + reserved;
  const text = money(spend) + " of " + money(max) + (max > 0 ? " · " + pct((used / max) * 100) : "")
    + (reserved > 0 ? " (" + money(reserved) + " in flight)" : "");
  return el("div", { class: "budget" }, bar, el("div", { class: "budget-text", text }));
}

function why(d) {
  if (d.reason === "redis_unavailable") return "budgets could not be checked (Redis unavailable)";
  if (["rpm_limit", "tpm_limit", "max_parallel_requests"].includes(d.reason)) {
    return "rate limit reached: " + d.reason + (d.subject ? " of " + d.subject : "");
  }
  if (d.max_budget === null || d.max_budget === undefined) return d.reason || "—";
  const inFlight = Number(d.reserved) > 0 ? " (+" + money(d.reserved) + " in flight)" : "";
  return money(d.spent) + " spent" + inFlight + " + up to " + money(d.estimate) + " for this request > "
    + money(d.max_budget) + " budget";
}

function denialRows(id, denials, emptyId, emptyText) {
  fillTable(id, denials, (d) => [
    [utc(d.recorded_at), "nowrap"],
    [d.denied_tag ? tagLink(d.denied_tag) : "—"],
    [why(d), "why", "request " + d.request_id + (d.tags.length ? "; tags: " + d.tags.join(", ") : "")
      + (d.metadata && Object.keys(d.metadata).length ? "; metadata: " + JSON.stringify(d.metadata) : "")],
    [d.model || "—", "opt nowrap"],
    [d.user_hash ? shortHash(d.user_hash) : "—", "opt mono", d.user_hash || undefined],
  ]);
  empty(emptyId, denials.length === 0, el("p", { text: emptyText }));
}

const tagLink = (name) => el("a", { href: "#tag=" + enc(name), text: name });

// ------------------------------------------------------------------ charts

// Daily bars on a UTC-day axis: x is the day's index, labelled with the API's own
// day strings, so no browser time zone can move a bar to another day.
function drawChart(name, container, { days, stacks = [], total = null, lines = [] }) {
  state.drawn[name] = { days, stacks, total, lines };
  const n = days.length;
  const x = days.map((_, i) => i);
  const raw = [null];
  const data = [x];
  const series = [{ label: "Day", value: (u, v) => (v === null || v === undefined ? "—" : longDay(days[v]) + " UTC") }];
  const bars = uPlot.paths.bars({ size: [0.72, 64], gap: 1 });
  // Stacks are drawn as running sums, tallest first, so each segment shows; the
  // legend shows each series' own value, never the running sum.
  const cumulative = [];
  stacks.forEach((s, i) => cumulative.push(s.values.map((v, j) => v + (i ? cumulative[i - 1][j] : 0))));
  for (let i = stacks.length - 1; i >= 0; i--) {
    const s = stacks[i];
    raw.push(s.values);
    data.push(cumulative[i]);
    series.push({ label: s.label, stroke: s.color, fill: s.color, width: 0, paths: bars, points: { show: false },
      value: (u, v, si, di) => (di === null || di === undefined ? "—" : money(raw[si][di])) });
  }
  if (total) {
    raw.push(total.values);
    data.push(total.values);
    series.push({ label: total.label, stroke: total.color || "#1d2433", fill: total.fill || null, width: 0,
      paths: total.fill ? bars : () => null, points: { show: false },
      value: (u, v, si, di) => (di === null || di === undefined ? "—" : money(raw[si][di])) });
  }
  for (const l of lines) {
    raw.push(l.values);
    data.push(l.values);
    series.push({ label: l.label, stroke: l.color, width: 2, points: { show: true, size: 6, fill: l.color },
      value: (u, v, si, di) => (di === null || di === undefined ? "—" : money(raw[si][di])) });
  }
  const width = Math.max(280, container.clientWidth);
  const opts = {
    width,
    height: width < 500 ? 200 : 260,
    legend: { live: true },
    cursor: { points: { show: false }, y: false, drag: { x: false, y: false } },
    scales: {
      x: { time: false, range: () => [-0.5, n - 0.5] },
      y: { range: (u, min, max) => [0, max > 0 ? max * 1.12 : 1] },
    },
    series,
    axes: [
      {
        space: 48,
        gap: 6,
        grid: { show: false },
        splits: (u) => {
          const room = Math.max(1, Math.floor(u.bbox.width / uPlot.pxRatio / 52));
          const step = Math.max(1, Math.ceil(n / room));
          const out = [];
          for (let i = 0; i < n; i += step) out.push(i);
          return out;
        },
        values: (u, vals) => vals.map((v) => (days[v] ? dayLabel(days[v]) : "")),
      },
      { size: 76, values: (u, vals) => vals.map((v) => money(v)), grid: { stroke: "#eceff4" } },
    ],
  };
  if (state.charts[name]) state.charts[name].destroy();
  state.charts[name] = new uPlot(opts, data, container);
}

const resize = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const chart = Object.values(state.charts).find((c) => c.root.parentNode === entry.target);
    const width = Math.max(280, entry.target.clientWidth);
    if (chart && Math.abs(chart.width - width) > 2) chart.setSize({ width, height: width < 500 ? 200 : 260 });
  }
});

// ------------------------------------------------------------------ overview

function renderCards(ov, blockedCount) {
  const lastSame = Number(ov.last_month_same_period.spend);
  const month = Number(ov.month.spend);
  let change = null;
  if (lastSame > 0) {
    const p = ((month - lastSame) / lastSame) * 100;
    change = el("span", { class: p > 0 ? "up" : "down", text: (p > 0 ? "▲ " : "▼ ") + pct(Math.abs(p)) });
  }
  const monthName = MONTHS[Number(ov.now.slice(5, 7)) - 1] + " " + ov.now.slice(0, 4);
  const unpriced = ov.range.unpriced ? " · " + count(ov.range.unpriced) + " unpriced" : "";
  $("#cards").replaceChildren(
    card("Today · " + dayLabel(ov.now.slice(0, 10)) + " UTC", money(ov.today.spend),
      count(ov.today.requests) + " requests · " + count(ov.today.denials) + " denied"),
    card("This month · " + monthName, money(ov.month.spend), [
      lastSame > 0 ? "vs " + money(lastSame) + " at this point last month " : "nothing by this point last month ",
      change,
      el("br"),
      "last month in all: " + money(ov.last_month.spend),
    ]),
    card("Forecast · month end", ov.forecast_month_end === null ? "—" : money(ov.forecast_month_end),
      ov.forecast_month_end === null ? "too early in the month to tell" : "at this month's average daily rate"),
    card(dayLabel(ov.start_date) + " – " + dayLabel(ov.end_date), money(ov.range.spend),
      count(ov.range.requests) + " requests" + unpriced),
    card("Denials · chosen range", count(ov.range.denials),
      blockedCount ? el("strong", { class: "bad", text: blockedCount + (blockedCount === 1 ? " tag" : " tags") + " blocked now" })
        : "no tag is blocked now", blockedCount ? "alarm" : ""),
  );
}

// LiteLLM's daily activity ({results: [{date, metrics, breakdown}]}) as flat rows
// {day, <as>: name, spend, requests} of one of its breakdowns.
function daily(activity, breakdown, as) {
  const rows = [];
  for (const d of activity.results) {
    for (const [name, m] of Object.entries(d.breakdown[breakdown] || {})) {
      rows.push({ day: d.date, [as]: name === "" ? null : name, spend: m.metrics.spend, requests: m.metrics.api_requests });
    }
  }
  return rows;
}

function renderTags(tags, spendTags, ov) {
  const denying = Object.fromEntries(ov.denying.map((d) => [d.tag, d]));
  const byName = new Map();
  for (const t of tags) byName.set(t.name, { name: t.name, info: t.defined === false ? null : t, spend: 0, requests: 0 });
  for (const s of spendTags) {
    const row = byName.get(s.tag) || { name: s.tag, info: null, spend: 0, requests: 0 };
    row.spend = Number(s.spend);
    row.requests = Number(s.requests);
    byName.set(s.tag, row);
  }
  const rank = { blocked: 0, warn: 1, ok: 2, none: 3 };
  const rows = [...byName.values()].map((r) => ({ ...r, st: status(r.info, denying[r.name]) }));
  rows.sort((a, b) => rank[a.st.key] - rank[b.st.key] || b.spend - a.spend || a.name.localeCompare(b.name));
  fillTable("#tags", rows, (r) => [
    [tagLink(r.name), "tag"],
    [pill(r.st)],
    r.info && r.info.max_budget !== null ? [budgetBar(r.info, r.st), "wide"] : [el("span", { class: "muted", text: "no budget" }), "wide nobudget"],
    [r.info && r.info.reset_at ? utc(r.info.reset_at) : "—", "opt nowrap"],
    [r.info && r.info.forecast_exhausted_at ? utc(r.info.forecast_exhausted_at) : "—", "opt nowrap"],
    [money(r.spend), "num"],
    [count(r.requests), "num opt2"],
  ], { moneyCols: [5] });
  empty("#tags-empty", rows.length === 0,
    el("p", { text: "No tags yet. Tags come with requests (metadata.tags, x-ledger-tags) and with the keys that carry them. Give one a budget:" }),
    code(`curl -s -XPOST ${location.origin}/tag/new -H "${keyHeader}" \\\n  -d '{"name": "team:search", "max_budget": 25, "budget_duration": "1d"}'`));
  return rows.filter((r) => r.st.key === "blocked").length;
}

function renderChart(ov, activity) {
  const days = ov.days.map((d) => d.day);
  const totals = ov.days.map((d) => Number(d.spend));
  const anySpend = ov.days.some((d) => d.requests > 0);
  $("#chart").hidden = !anySpend;
  empty("#chart-empty", !anySpend,
    el("p", { text: "No spend between " + longDay(ov.start_date) + " and " + longDay(ov.end_date) + " (UTC). Send a request through the gateway with the demo key (ledger dev keeps it in .data/demo_key):" }),
    code(`curl -s ${location.origin}/v1/chat/completions -H "Authorization: Bearer $(cat .data/demo_key)" \\\n  -d '{"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}'`));
  if (!anySpend) {
    $("#chart-note").textContent = "";
    state.drawn.overview = { days, stacks: [], total: { label: "all requests", values: totals }, lines: [] };
    return;
  }
  if (state.mode === "tag" && activity) {
    const spendOf = new Map();
    for (const r of activity) {
      const m = spendOf.get(r.tag) || new Map();
      m.set(r.day, addUsd(m.get(r.day) || 0, Number(r.spend)));
      spendOf.set(r.tag, m);
    }
    const ranked = [...spendOf.entries()].map(([tag, m]) => [tag, [...m.values()].reduce(addUsd, 0), m])
      .sort((a, b) => b[1] - a[1]).slice(0, 8);
    drawChart("overview", $("#chart"), {
      days,
      total: { label: "all requests", values: totals, fill: "#cbd5e1", color: "#94a3b8" },
      lines: ranked.map(([tag, , m], i) => ({ label: tag, values: days.map((d) => m.get(d) || 0), color: COLORS[i % COLORS.length] })),
    });
    $("#chart-note").textContent = "Bars: each day's spend, every request once. Lines: spend per tag (the 8 largest). "
      + "Tags overlap: a request with several tags counts under each, so the lines can add up to more than the bar.";
    return;
  }
  const models = new Map();
  for (const r of ov.by_model) models.set(r.model ?? "(swept)", addUsd(models.get(r.model ?? "(swept)") || 0, Number(r.spend)));
  const order = [...models.entries()].sort((a, b) => b[1] - a[1]).map(([m]) => m);
  const stacks = order.map((m, i) => {
    const per = new Map(ov.by_model.filter((r) => (r.model ?? "(swept)") === m).map((r) => [r.day, Number(r.spend)]));
    return { label: m, values: days.map((d) => per.get(d) || 0), color: COLORS[i % COLORS.length] };
  });
  drawChart("overview", $("#chart"), { days, stacks, total: { label: "total", values: totals } });
  $("#chart-note").textContent = "Each request counts once; the models of a day add up to its total. Hover a day for its values.";
}

function renderUsers(users) {
  fillTable("#users", users, (u) => [[shortHash(u.user_hash), "mono", u.user_hash], [money(u.spend), "num"], [count(u.requests), "num"]], { moneyCols: [1] });
  empty("#users-empty", users.length === 0, el("p", { text: "No end users in this range. Requests that pass a user field (stored only as a keyed hash) show here." }));
}

function renderMeta(report) {
  const totals = new Map();
  for (const r of report.rows) {
    if (r.group === null) continue;
    const t = totals.get(r.group) || { spend: 0, requests: 0 };
    t.spend = addUsd(t.spend, Number(r.spend));
    t.requests += r.requests;
    totals.set(r.group, t);
  }
  const rows = [...totals.entries()].sort((a, b) => b[1].spend - a[1].spend).slice(0, 10);
  fillTable("#meta", rows, ([k, v]) => [[k], [money(v.spend), "num"], [count(v.requests), "num"]], { moneyCols: [1] });
  empty("#meta-empty", rows.length === 0,
    el("p", { text: `No request in this range has metadata.${state.metaKey}. Send it as metadata.spend_logs_metadata or in the header:` }),
    code(`x-ledger-spend-logs-metadata: {"${state.metaKey}": "acme"}`));
}

// The split report of one tag dimension: rows that add up to the total, each against
// the period of the same length before; the biggest mover (largest change) is marked.
function renderBill(report) {
  const total = Number(report.total);
  const groups = report.groups.filter((g) => Number(g.spend) !== 0 || Number(g.previous_spend || 0) !== 0);
  let mover = null;
  for (const g of groups) {
    if (g.change !== null && Number(g.change) !== 0 && (mover === null || Math.abs(Number(g.change)) > Math.abs(Number(mover.change)))) mover = g;
  }
  const change = (g) => {
    if (g.change === null) return ["—", "num"];
    const sign = Number(g.change) > 0 ? "+" : "";
    const text = sign + money(g.change) + (g.change_pct === null ? "" : " (" + sign + g.change_pct + "%)");
    return g === mover ? [el("strong", { class: "mover", title: "biggest mover", text: "▲▼"[Number(g.change) > 0 ? 0 : 1] + " " + text }), "num"] : [text, "num"];
  };
  fillTable("#bill", groups, (g) => [
    [g.group],
    [money(g.spend), "num"],
    [total > 0 ? pct((Number(g.spend) / total) * 100) : "—", "num"],
    [g.previous_spend === null ? "—" : money(g.previous_spend), "num"],
    change(g),
  ], { moneyCols: [1, 3] });
  empty("#bill-empty", groups.length === 0,
    el("p", { text: `No charged request in this range. Tags of the form ${state.dimension}:<value> put requests in this dimension, for example:` }),
    code(`x-ledger-tags: ${state.dimension}:search`));
}

function renderAlerts(alerts) {
  fillTable("#alerts", alerts, (a) => [[utc(a.recorded_at), "nowrap"], [tagLink(a.tag)], [a.description]]);
  empty("#alerts-empty", alerts.length === 0, el("p", { text: "No alerts yet. A budget raises one at each of its alert_thresholds (50%, 80% and 100% unless set), at its soft_budget, and when its forecast runs out before the reset." }));
}

async function refreshOverview() {
  const q = rangeQuery();
  const [ov, tags, spendTags, users, meta, alerts, activity, bill] = await Promise.all([
    api("/ui/api/overview?" + q),
    api("/tag/list"),
    api("/spend/tags?" + q),
    api("/spend/users?limit=10&" + q),
    api("/spend/report?interval=month&group_by=" + enc("metadata." + state.metaKey) + "&" + q),
    api("/alerts?limit=20"),
    state.mode === "tag" ? api("/tag/daily/activity?page_size=1000&" + q).then((a) => daily(a, "entities", "tag")) : Promise.resolve(null),
    // a dimension the API refuses (say "a:b") shows an empty bill, not a broken page
    api("/spend/report?interval=month&allocation=split&group_by=" + enc("tag:" + state.dimension) + "&" + q)
      .catch((e) => { if (e.message === "401") throw e; return { total: 0, groups: [] }; }),
  ]);
  state.overview = ov;
  const blocked = renderTags(tags, spendTags, ov);
  renderCards(ov, blocked);
  renderChart(ov, activity);
  renderUsers(users);
  renderMeta(meta);
  renderBill(bill);
  denialRows("#denials", ov.denials.slice(0, 8), "#denials-empty", "No denials in this range: no budget refused a request.");
  renderAlerts(alerts);
}

// ------------------------------------------------------------------ one tag

function describeChange(changes) {
  const parts = Object.entries(changes).map(([field, c]) => {
    const show = (v) => (v === null || v === undefined ? "—"
      : field === "max_budget" || field === "soft_budget" ? money(v)
      : typeof v === "object" ? JSON.stringify(v) : String(v));
    return c.old === null || c.old === undefined ? field + " = " + show(c.new) : field + ": " + show(c.old) + " → " + show(c.new);
  });
  return parts.join("; ") || "—";
}

async function refreshTag(name) {
  const q = rangeQuery();
  const [tags, detail, activity] = await Promise.all([
    api("/tag/list"), // a tag that only labels spend has no definition, and no entry here
    api("/ui/api/tag?name=" + enc(name) + "&" + q),
    api("/tag/daily/activity?page_size=1000&tags=" + enc(name) + "&" + q).then((a) => daily(a, "models", "model")),
  ]);
  const info = tags.find((t) => t.name === name && t.defined !== false) || null;
  const history = info ? await api("/tag/" + enc(name) + "/history", { allow404: true }) : [];
  const st = status(info, detail.denying);
  $("#tag-name").textContent = name;
  $("#tag-status").replaceChildren(pill(st));
  $("#tag-description").textContent = info && info.description ? info.description : "";
  const cards = [];
  if (info && info.max_budget !== null) {
    cards.push(card("Budget", money(info.max_budget), windowName(info.budget_duration)));
    cards.push(card("Spent this window", money(info.spend),
      [Number(info.reserved) > 0 ? money(info.reserved) + " in flight · " : "", pct(((Number(info.spend) + Number(info.reserved)) / Math.max(Number(info.max_budget), 1e-12)) * 100) + " of the budget"],
      st.key === "blocked" ? "alarm" : st.key === "warn" ? "caution" : ""));
    cards.push(card("Remaining", money(info.remaining), st.key === "blocked" ? el("strong", { class: "bad", text: "requests are refused" }) : "before requests are refused"));
    cards.push(card("Resets", info.reset_at ? moment(info.reset_at) : "never", info.window_start ? "window began " + utc(info.window_start) : null, "time"));
    cards.push(card("Runs out", info.forecast_exhausted_at ? moment(info.forecast_exhausted_at) : "not this window", "at this window's rate so far", "time"));
  } else {
    cards.push(card("Budget", "none", info ? "defined without max_budget" : "this tag has no definition; it only labels spend"));
  }
  const inRange = detail.by_model.reduce((a, g) => addUsd(a, Number(g.spend)), 0);
  const requests = detail.by_model.reduce((a, g) => a + g.requests, 0);
  cards.push(card(dayLabel(detail.start_date) + " – " + dayLabel(detail.end_date), money(inRange), count(requests) + " requests"));
  $("#tag-cards").replaceChildren(...cards);

  const def = [];
  const add = (k, v) => def.push(el("dt", { text: k }), el("dd", {}, v));
  if (info) {
    add("Budget", info.max_budget === null ? "none" : money(info.max_budget) + " " + windowName(info.budget_duration));
    add("Soft budget", info.soft_budget === null ? "none" : money(info.soft_budget) + " (an alert, never a refusal)");
    add("Alerts at", (info.alert_thresholds || []).map((t) => Math.round(Number(t) * 100) + "%").join(", ") || "—");
    add("Models allowed", info.models && info.models.length ? info.models.join(", ") : "any");
    add("Window", info.window_start ? utc(info.window_start) + " → " + (info.reset_at ? utc(info.reset_at) : "never resets") : "—");
    add("All time", money(info.total_spend) + " over " + count(info.request_count) + " requests");
    if (info.metadata && Object.keys(info.metadata).length) add("Metadata", el("code", { text: JSON.stringify(info.metadata) }));
    add("Created / updated", utc(info.created_at) + " / " + utc(info.updated_at));
  } else {
    add("Budget", "none: give it one with");
    def.push(el("dd", { class: "full" }, code(`curl -s -XPOST ${location.origin}/tag/new -H "${keyHeader}" \\\n  -d '{"name": ${JSON.stringify(name)}, "max_budget": 25, "budget_duration": "1d"}'`)));
  }
  $("#tag-def").replaceChildren(...def);

  const days = [];
  for (let d = detail.start_date; d <= detail.end_date; d = addDays(d, 1)) days.push(d);
  const models = new Map();
  for (const r of activity) models.set(r.model || "(swept)", addUsd(models.get(r.model || "(swept)") || 0, Number(r.spend)));
  const order = [...models.entries()].sort((a, b) => b[1] - a[1]).map(([m]) => m);
  const stacks = order.map((m, i) => {
    const per = new Map();
    for (const r of activity.filter((a) => (a.model || "(swept)") === m)) per.set(r.day, addUsd(per.get(r.day) || 0, Number(r.spend)));
    return { label: m, values: days.map((d) => per.get(d) || 0), color: COLORS[i % COLORS.length] };
  });
  const any = activity.some((r) => r.requests > 0);
  $("#tag-chart").hidden = !any;
  empty("#tag-chart-empty", !any, el("p", { text: "No spend with this tag in the chosen range." }));
  if (any) {
    const totals = days.map((_, j) => stacks.reduce((a, s) => addUsd(a, s.values[j]), 0));
    drawChart("tag", $("#tag-chart"), { days, stacks, total: { label: "total", values: totals } });
  } else {
    state.drawn.tag = { days, stacks: [], total: null, lines: [] };
  }

  const groupCells = (label) => (g) => [
    [label(g), g.name === null ? "muted" : "mono", g.name || undefined],
    [g.unpriced === g.requests && g.requests > 0 ? "unpriced" : money(g.spend), "num",
      g.unpriced ? g.unpriced + " request(s) to a model without a known price, recorded at $0" : undefined],
    [count(g.requests), "num"],
  ];
  fillTable("#tag-models", detail.by_model, groupCells((g) => g.name ?? "(swept at estimate)"), { moneyCols: [1] });
  fillTable("#tag-users", detail.by_user, groupCells((g) => shortHash(g.name)), { moneyCols: [1] });
  denialRows("#tag-denials", detail.denials.slice(0, 25), "#tag-denials-empty", "No request with this tag was refused in the chosen range.");
  $("#tag-denials-note").textContent = detail.denials.length > 25 ? "the newest 25 shown" : "requests carrying this tag that were refused";
  const items = (history || []).slice().reverse();
  fillTable("#tag-history", items, (h) => [[utc(h.at), "nowrap"], [h.type.replace(/^Tag/, "").toLowerCase() + ": " + describeChange(h.changes)], [h.actor, "opt"]]);
  empty("#tag-history-empty", items.length === 0, el("p", { text: "No definition: this tag was never created with /tag/new." }));
}

// ------------------------------------------------------------------ navigation

function currentTag() {
  const m = /^#tag=(.+)$/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

function showLogin(message) {
  for (const id of ["#overview", "#tag-view", "#range", "#logout"]) $(id).hidden = true;
  $("#login-view").hidden = false;
  $("#login-error").textContent = message || "";
  $("#updated").textContent = "";
  $("#key").focus();
}

let refreshing = null;
async function refresh() {
  if (!sessionStorage.getItem(KEY)) return showLogin();
  const tag = currentTag();
  $("#login-view").hidden = true;
  $("#range").hidden = false;
  $("#logout").hidden = false;
  $("#overview").hidden = tag !== null;
  $("#tag-view").hidden = tag === null;
  const run = (tag === null ? refreshOverview() : refreshTag(tag)).then(() => {
    $("#error").hidden = true;
    $("#updated").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
    document.body.dataset.loaded = tag === null ? "overview" : "tag";
  }, (e) => {
    if (e.message === "401") return;
    $("#error").hidden = false;
    $("#error").textContent = "Could not load: " + e.message;
  });
  refreshing = run;
  return run;
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("#key").value.trim());
  $("#key").value = "";
  refresh();
});
$("#logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(); });
$("#range").addEventListener("change", () => {
  const s = $("#start").value;
  const e = $("#end").value;
  if (s && e && s <= e) { setRange(s, e); refresh(); }
});
$("#range").addEventListener("submit", (ev) => ev.preventDefault());
for (const b of document.querySelectorAll(".presets button")) {
  b.addEventListener("click", () => {
    const today = todayUTC();
    if (b.dataset.days) setRange(addDays(today, 1 - Number(b.dataset.days)), today);
    else if (b.dataset.preset === "month") setRange(today.slice(0, 8) + "01", today);
    else {
      const lastEnd = addDays(today.slice(0, 8) + "01", -1);
      setRange(lastEnd.slice(0, 8) + "01", lastEnd);
    }
    refresh();
  });
}
$("#mode").addEventListener("change", () => { state.mode = $("#mode").value; refresh(); });
$("#meta-key").addEventListener("change", () => { state.metaKey = $("#meta-key").value.trim() || "customer"; refresh(); });
$("#dimension").addEventListener("change", () => { state.dimension = $("#dimension").value.trim().replace(/^tag:/, "") || "team"; refresh(); });
window.addEventListener("hashchange", () => { window.scrollTo(0, 0); refresh(); });
resize.observe($("#chart"));
resize.observe($("#tag-chart"));

loadRange();
refresh();
setInterval(() => { if (sessionStorage.getItem(KEY) && !document.hidden) refresh(); }, POLL_MS);
