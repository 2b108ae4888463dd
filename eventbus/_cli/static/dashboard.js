// eventbus dashboard: polls api/history and api/snapshot, draws tables and SVG charts.
// Plain JS, no dependencies, no build step. Names from Redis are set as text, never markup.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 600, H = 200, LEFT = 52, RIGHT = 12, TOP = 10, BOTTOM = 24;
  const PALETTE = ["#2e90fa", "#f79009", "#12b76a", "#f04438", "#7a5af8", "#06aed4",
                   "#ee46bc", "#84cc16", "#a15c07", "#667085"];

  const state = { points: [], snapshot: null, keep: 600, interval: 1, windowSec: 300 };

  function $(id) { return document.getElementById(id); }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  // Colours in order of first appearance: distinct for the first ten names of a
  // chart's kind, and a name keeps its colour while the page is open.
  const colors = new Map();
  function colorFor(kind, name) {
    let byName = colors.get(kind);
    if (!byName) colors.set(kind, (byName = new Map()));
    if (!byName.has(name)) byName.set(name, PALETTE[byName.size % PALETTE.length]);
    return byName.get(name);
  }

  // -- formatting ------------------------------------------------------------------

  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function fmtRate(v) {
    if (!isNum(v)) return "–";
    return v < 10 ? v.toFixed(1) : String(Math.round(v));
  }
  function fmtPerSecond(v) { return isNum(v) ? fmtRate(v) + "/s" : "–"; }
  function fmtInt(v) { return isNum(v) ? String(Math.round(v)) : "–"; }
  function fmtSeconds(v) {
    if (!isNum(v)) return "–";
    const a = Math.abs(v), sign = v < 0 ? "-" : "";
    if (a < 60) return sign + a.toFixed(1) + " s";
    if (a < 3600) return sign + Math.floor(a / 60) + " min " + Math.floor(a % 60) + " s";
    if (a < 86400) return sign + Math.floor(a / 3600) + " h " + Math.floor((a % 3600) / 60) + " min";
    return sign + Math.floor(a / 86400) + " d " + Math.floor((a % 86400) / 3600) + " h";
  }
  function fmtAxis(v) {
    if (v === 0) return "0";
    if (v >= 1e6) return (v / 1e6).toPrecision(3).replace(/\.?0+$/, "") + "M";
    if (v >= 1e3) return (v / 1e3).toPrecision(3).replace(/\.?0+$/, "") + "k";
    return v < 10 ? String(+v.toPrecision(2)) : String(Math.round(v));
  }
  function clock(epoch) {
    return new Date(epoch * 1000).toLocaleTimeString();
  }
  function sum(values) {
    let total = 0, any = false;
    for (const v of values) if (isNum(v)) { total += v; any = true; }
    return any ? total : null;
  }

  // -- charts ----------------------------------------------------------------------

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // series: [{name, values: [[at, value|null], ...]}]; end: the newest time drawn.
  function drawChart(svgId, legendId, series, end, emptyText) {
    const svg = $(svgId), legend = $(legendId);
    svg.replaceChildren();
    legend.replaceChildren();
    const start = end - state.windowSec;
    const pw = W - LEFT - RIGHT, ph = H - TOP - BOTTOM;
    let max = 0;
    for (const s of series) for (const [, v] of s.values) if (isNum(v) && v > max) max = v;
    const yMax = niceCeil(max);
    const x = (t) => LEFT + ((t - start) / state.windowSec) * pw;
    const y = (v) => TOP + ph - (v / yMax) * ph;

    for (const f of [0, 0.5, 1]) {
      const yy = y(yMax * f);
      svg.appendChild(svgEl("line", { x1: LEFT, x2: W - RIGHT, y1: yy, y2: yy, class: "axis" }));
      const label = svgEl("text", { x: LEFT - 6, y: yy + 4, "text-anchor": "end" });
      label.textContent = fmtAxis(yMax * f);
      svg.appendChild(label);
    }
    const minutes = state.windowSec / 60;
    for (const f of [0, 0.5, 1]) {
      const label = svgEl("text", {
        x: LEFT + f * pw, y: H - 6,
        "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle",
      });
      label.textContent = f === 1 ? "now" : "-" + +(minutes * (1 - f)).toFixed(1) + " min";
      svg.appendChild(label);
    }
    if (!series.length) {
      const t = svgEl("text", { x: LEFT + pw / 2, y: TOP + ph / 2, "text-anchor": "middle", class: "empty" });
      t.textContent = emptyText;
      svg.appendChild(t);
      return;
    }
    for (const s of series) {
      let d = "", pen = false, count = 0;
      for (const [at, v] of s.values) {
        if (at < start || !isNum(v)) { pen = false; continue; }
        d += (pen ? "L" : "M") + x(at).toFixed(1) + " " + y(v).toFixed(1);
        pen = true;
        count++;
      }
      const color = colorFor(svgId, s.name);
      const path = svgEl("path", { d: d || "M0 0", class: "series", stroke: color });
      path.dataset.series = s.name;
      path.dataset.points = String(count);
      svg.appendChild(path);
      const li = el("li");
      const swatch = el("span", null, "swatch");
      swatch.style.background = color;
      const last = s.values.length ? s.values[s.values.length - 1][1] : null;
      li.append(swatch, el("span", s.name), el("span", s.fmt(last), "muted"));
      legend.appendChild(li);
    }
  }

  // The names seen in the window, and each one's values over it.
  function collect(pick, fmt) {
    const start = (state.points.length ? state.points[state.points.length - 1].at : 0) - state.windowSec;
    const names = new Set();
    const shown = state.points.filter((p) => p.at >= start);
    for (const p of shown) for (const name of Object.keys(pick(p) || {})) names.add(name);
    return Array.from(names).sort().map((name) => ({
      name, fmt,
      values: shown.map((p) => {
        const row = (pick(p) || {})[name];
        return [p.at, row === undefined ? null : row];
      }),
    }));
  }

  function field(obj, key) {
    const out = {};
    for (const name in obj) out[name] = obj[name][key];
    return out;
  }

  function drawCharts() {
    const end = state.points.length ? state.points[state.points.length - 1].at : Date.now() / 1000;
    drawChart("chart-publish", "legend-publish",
      collect((p) => field(p.topics, "rate"), fmtPerSecond), end, "no durable topics");
    drawChart("chart-consume", "legend-consume",
      collect((p) => field(p.groups, "rate"), fmtPerSecond), end, "no consumer groups");
    drawChart("chart-lag", "legend-lag",
      collect((p) => field(p.groups, "lag"), fmtInt), end, "no consumer groups");
    drawChart("chart-backlog", "legend-backlog",
      collect((p) => {
        const out = field(p.queues, "length");
        out["delayed events"] = p.delayed ? p.delayed.pending : null;
        return out;
      }, fmtInt), end, "");
  }

  // -- tables and cards ------------------------------------------------------------

  function fillTable(id, rows, cells, empty) {
    const body = $(id).tBodies[0];
    body.replaceChildren();
    if (!rows.length) {
      const tr = el("tr", null, "none");
      const td = el("td", empty);
      td.colSpan = $(id).tHead.rows[0].cells.length;
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    for (const row of rows) {
      const tr = el("tr");
      for (const [text, cls] of cells(row)) tr.appendChild(el("td", text, cls || ""));
      body.appendChild(tr);
    }
  }

  const num = "num", bad = (v) => (isNum(v) && v > 0 ? "num bad" : "num");

  function drawTables(s) {
    const topics = s.topics || [];
    const groups = [];
    for (const t of topics) for (const g of t.groups || []) groups.push([t, g]);
    const queues = s.queues || [];
    const delayed = s.delayed || {};

    fillTable("topics", topics, (t) => [
      [t.name], [fmtRate(t.publish_rate), num], [fmtInt(t.length), num],
      [fmtInt(t.dead_letters), bad(t.dead_letters)], [String((t.groups || []).length), num],
      [t.last_id || "–"],
    ], "no durable topics under this prefix");
    fillTable("groups", groups, ([t, g]) => [
      [t.name], [g.name], [fmtRate(g.consume_rate), num], [fmtInt(g.pending), num],
      [fmtInt(g.lag), num], [fmtInt(g.consumers), num],
      [fmtSeconds(g.oldest_pending_age), num], [fmtInt(g.dead_letters), bad(g.dead_letters)],
    ], "no consumer groups");
    fillTable("queues", queues, (q) => [
      [q.name], [(q.waiting || []).join(" / "), num], [fmtInt(q.scheduled), num],
      [fmtInt(q.processing), num], [fmtInt(q.workers), num],
      [fmtInt(q.dead_letters), bad(q.dead_letters)], [fmtSeconds(q.oldest_waiting_age), num],
      [fmtRate(q.started_per_s), num], [fmtRate(q.finished_per_s), num],
      [fmtRate(q.failed_per_s), bad(q.failed_per_s)],
    ], "no work queues");
    $("delayed-summary").textContent = isNum(delayed.pending) && delayed.pending > 0
      ? delayed.pending + " pending; next due in " + fmtSeconds(delayed.next_due_in)
        + "; overdue by " + fmtSeconds(delayed.overdue_by)
      : "none pending";
    fillTable("delayed", delayed.topics || [], (d) => [
      [d.name], [fmtInt(d.pending), num], [fmtSeconds(d.next_due_in), num],
    ], "no delayed events");
    fillTable("schedules", s.schedules || [], (r) => [
      [r.name], [r.topic], [fmtSeconds(r.next_due_in), num],
      [isNum(r.last_released_ago) ? fmtSeconds(r.last_released_ago) + " ago" : "never", num],
    ], "no recurring events");

    const deadLetters = sum(topics.map((t) => t.dead_letters).concat(queues.map((q) => q.dead_letters)));
    const cards = [
      ["topics", String(topics.length)],
      ["published/s", fmtRate(sum(topics.map((t) => t.publish_rate)))],
      ["consumed/s", fmtRate(sum(groups.map(([, g]) => g.consume_rate)))],
      ["lag (all groups)", fmtInt(sum(groups.map(([, g]) => g.lag)))],
      ["pending (all groups)", fmtInt(sum(groups.map(([, g]) => g.pending)))],
      ["dead letters", fmtInt(deadLetters), isNum(deadLetters) && deadLetters > 0],
      ["jobs waiting", fmtInt(sum(queues.map((q) => q.length)))],
      ["delayed", fmtInt(delayed.pending)],
      ["overdue by", fmtSeconds(delayed.overdue_by), isNum(delayed.overdue_by) && delayed.overdue_by > 5],
    ];
    const box = $("cards");
    box.replaceChildren();
    for (const [label, value, isBad] of cards) {
      const card = el("div", null, isBad ? "card bad" : "card");
      card.append(el("div", value, "value"), el("div", label, "label"));
      box.appendChild(card);
    }
    $("where").textContent = "prefix " + s.prefix;
  }

  function setStatus(text, isBad) {
    const box = $("status");
    box.textContent = text;
    box.className = isBad ? "status bad" : "status";
  }

  // -- polling ---------------------------------------------------------------------

  async function getJSON(path) {
    const reply = await fetch(path, { cache: "no-store" });
    if (!reply.ok) throw new Error(path + ": HTTP " + reply.status);
    return reply.json();
  }

  async function tick() {
    try {
      const last = state.points.length ? state.points[state.points.length - 1].at : null;
      const [history, snap] = await Promise.all([
        getJSON(last === null ? "api/history" : "api/history?after=" + last),
        getJSON("api/snapshot"),
      ]);
      state.keep = history.keep;
      state.interval = history.interval;
      for (const p of history.points) state.points.push(p);
      const newest = state.points.length ? state.points[state.points.length - 1].at : 0;
      while (state.points.length && state.points[0].at < newest - state.keep) state.points.shift();
      state.snapshot = snap;
      drawTables(snap);
      drawCharts();
      $("interval").textContent = String(state.interval);
      const sampler = snap.sampler || {};
      if (sampler.error) {
        setStatus("Redis: " + sampler.error + " (since " + clock(sampler.error_since) + ")", true);
      } else {
        setStatus("live · " + clock(snap.at), false);
      }
    } catch (err) {
      setStatus("dashboard server unreachable (" + err.message + ")", true);
    }
    setTimeout(tick, Math.max(500, state.interval * 1000));
  }

  document.addEventListener("DOMContentLoaded", () => {
    const choice = $("window");
    state.windowSec = Number(choice.value);
    choice.addEventListener("change", () => {
      state.windowSec = Number(choice.value);
      drawCharts();
    });
    tick();
  });
})();
