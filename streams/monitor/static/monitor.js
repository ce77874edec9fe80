// The operations page: polls /api/status and redraws in place, without a reload.
// Plain script with no dependencies: the page must work on networks that reach nothing outside.
"use strict";

(() => {
  const DEFAULT_INTERVAL_S = 2;
  const DASH = "—";
  const STATUSES = ["OK", "WARN", "STALL", "STOP", "ERR"];

  const state = {
    snapshot: null, // the last snapshot the server answered
    intervalS: DEFAULT_INTERVAL_S,
    lastOkAt: null, // client clock of the last good answer: the server's clock may differ
    serverDown: false,
  };

  // ---- formatting: every shown number also sits raw in data-value, so tests read what is shown

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);

  function fmtInt(v) {
    return isNum(v) ? Math.round(v).toLocaleString("en-US") : DASH;
  }

  function fmtRate(v) {
    if (!isNum(v)) return DASH;
    const digits = Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2;
    return v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  function fmtMs(v) {
    if (!isNum(v)) return DASH;
    const digits = Math.abs(v) >= 100 ? 0 : 1;
    return v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  function fmtDuration(s) {
    if (!isNum(s)) return DASH;
    if (s < 60) return `${s.toFixed(1)} s`;
    const pad = (n) => String(Math.floor(n)).padStart(2, "0");
    if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${pad((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${pad((s % 86400) / 3600)} h`;
  }

  function fmtPercent(r) {
    return isNum(r) ? `${(r * 100).toFixed(1)} %` : DASH;
  }

  function fmtClock(ms) {
    if (!isNum(ms)) return DASH;
    return new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
  }

  // ---- DOM helpers

  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined) continue;
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  /** Sets an element's shown text and its raw value (empty when unknown). */
  function show(node, value, text) {
    if (!node) return;
    node.dataset.value = value === null || value === undefined ? "" : String(value);
    if (node.textContent !== text) node.textContent = text;
  }

  const field = (name, scope = document) => scope.querySelector(`[data-field="${name}"]`);

  function badge(status, reason) {
    const known = STATUSES.includes(status) ? status : "ERR";
    return el("span", {
      className: `badge status-${known}`,
      text: status || "?",
      title: reason || "",
      "data-value": status || "",
    });
  }

  function setBadge(node, status, reason) {
    const known = STATUSES.includes(status) ? status : "ERR";
    node.className = `badge status-${known}`;
    node.textContent = status || "?";
    node.title = reason || "";
    node.dataset.value = status || "";
  }

  // ---- header and banners

  function renderHeader(snap) {
    show(field("bootstrap_servers"), snap.bootstrap_servers, snap.bootstrap_servers || DASH);
    show(field("generated_at"), snap.generated_at, fmtClock(snap.generated_at));
    const interval = snap.interval_seconds;
    show(field("interval_seconds"), interval, isNum(interval) ? `every ${interval} s` : DASH);
    const groups = field("groups");
    const links = (snap.groups || []).map((g) =>
      el("a", { href: `#${encodeURIComponent(`group-${g.group}`)}`, className: "group-link", "data-group": g.group }, [
        el("span", { text: g.group }),
        badge(g.status, null),
      ]),
    );
    groups.replaceChildren(...(links.length ? links : [el("span", { className: "muted", text: DASH })]));
  }

  function renderKafkaError(snap) {
    const banner = field("error");
    banner.hidden = !snap.error;
    banner.textContent = snap.error || "";
  }

  function renderConnection() {
    const conn = field("connection");
    if (state.serverDown) {
      conn.className = "conn conn-down";
      conn.textContent = "server unreachable";
    } else if (state.lastOkAt === null) {
      conn.className = "conn conn-wait";
      conn.textContent = "connecting";
    } else {
      const age = Math.max(0, Math.round((Date.now() - state.lastOkAt) / 1000));
      conn.className = "conn conn-live";
      conn.textContent = `live · updated ${age} s ago`;
    }
  }

  function serverFailed(error) {
    const answered = error instanceof ServerAnswer;
    state.serverDown = !answered;
    document.body.classList.toggle("stale", state.snapshot !== null);
    const banner = field("server_error");
    const what = answered
      ? `The monitor server answered ${error.message}.`
      : `Cannot reach the monitor server at ${location.host} (${error.message}).`;
    const since = state.snapshot
      ? ` The numbers below are from ${fmtClock(state.snapshot.generated_at)} and are not live.`
      : "";
    banner.textContent = `${what}${since} Retrying every ${state.intervalS} s.`;
    banner.hidden = false;
    renderConnection();
  }

  function serverAnswered() {
    state.serverDown = false;
    state.lastOkAt = Date.now();
    document.body.classList.remove("stale");
    field("server_error").hidden = true;
    renderConnection();
  }

  // ---- tiles

  function renderTiles(snap) {
    const rates = snap.rates || {};
    show(field("events_in_per_s"), rates.events_in_per_s, fmtRate(rates.events_in_per_s));
    const recs = rates.recommendations_out_per_s;
    show(field("recommendations_out_per_s"), recs, fmtRate(recs));
    renderDeadLetters(rates.dead_letters_per_s || {});
    const latency = snap.latency || {};
    show(field("p50_ms"), latency.p50_ms, fmtMs(latency.p50_ms));
    show(field("p99_ms"), latency.p99_ms, fmtMs(latency.p99_ms));
    const note = isNum(latency.samples)
      ? `${fmtInt(latency.samples)} samples, last ${latency.window_seconds ?? "?"} s`
      : "no samples";
    show(field("latency_note"), latency.samples, note);
    renderModels(snap.models || []);
  }

  function renderDeadLetters(byReason) {
    const reasons = Object.keys(byReason).sort();
    const known = reasons.map((r) => byReason[r]).filter(isNum);
    const total = known.length ? known.reduce((a, b) => a + b, 0) : null;
    show(field("dead_letters_total_per_s"), total, fmtRate(total));
    const items = reasons.map((reason) => {
      const rate = byReason[reason];
      const value = el("span", { "data-field": "dead_letters_per_s", "data-reason": reason });
      show(value, rate, `${fmtRate(rate)}/s`);
      const quiet = !isNum(rate) || rate === 0;
      return el("li", { className: quiet ? "muted" : "hot" }, [el("span", { text: reason }), value]);
    });
    const list = document.querySelector('[data-list="dead_letters"]');
    list.replaceChildren(...(items.length ? items : [el("li", { className: "muted", text: "none" })]));
  }

  function renderModels(models) {
    const items = models.map((m) => {
      const attrs = (name) => ({ "data-field": name, "data-version": m.version });
      const version = el("span", { className: "version", ...attrs("model_version") });
      show(version, m.version, m.version ?? DASH);
      const share = el("span", attrs("model_share"));
      show(share, m.share, `${fmtPercent(m.share)} of events`);
      const rate = el("span", { className: "hit-rate", ...attrs("hit_rate") });
      show(rate, m.hit_rate, fmtPercent(m.hit_rate));
      const counts = el("span", {
        className: "muted",
        text: `${fmtInt(m.hits)} hits / ${fmtInt(m.events)} events`,
      });
      return el("li", {}, [
        el("div", { className: "model-line" }, [version, share]),
        el("div", { className: "model-line" }, [el("span", { text: "hit rate" }), rate, counts]),
      ]);
    });
    const list = document.querySelector('[data-list="models"]');
    list.replaceChildren(...(items.length ? items : [el("li", { className: "muted", text: DASH })]));
  }

  // ---- groups: one section and table per group, updated in place so tooltips survive a refresh

  const COLUMNS = [
    ["committed", "num", (p) => [p.committed, fmtInt(p.committed)]],
    ["end", "num", (p) => [p.end, fmtInt(p.end)]],
    ["lag", "num", (p) => [p.lag, fmtInt(p.lag)]],
    ["lag_seconds", "num", (p) => [p.lag_seconds, fmtDuration(p.lag_seconds)]],
  ];

  function groupSection(name) {
    const id = `group-${name}`;
    const existing = document.getElementById(id);
    if (existing) return existing;
    const head = el("tr", {}, [
      el("th", { text: "topic" }),
      el("th", { className: "num", text: "partition" }),
      el("th", { className: "num", text: "committed" }),
      el("th", { className: "num", text: "end" }),
      el("th", { className: "num", text: "lag" }),
      el("th", { className: "num", text: "lag in time" }),
      el("th", { text: "status" }),
    ]);
    const section = el("section", { id, className: "group", "data-group": name }, [
      el("header", { className: "group-head" }, [
        el("h2", { text: name }),
        el("span", { className: "badge", "data-field": "group_status" }),
        el("span", { className: "group-fact" }, ["members ", el("b", { "data-field": "members" })]),
        el("span", { className: "group-fact" }, ["total lag ", el("b", { "data-field": "group_lag" })]),
        el("span", { className: "group-fact" }, [
          "max lag in time ",
          el("b", { "data-field": "group_lag_seconds" }),
        ]),
      ]),
      el("table", {}, [el("thead", {}, [head]), el("tbody")]),
    ]);
    document.getElementById("groups").append(section);
    return section;
  }

  function partitionRow(group, p) {
    const keys = { "data-group": group, "data-topic": p.topic, "data-partition": p.partition };
    const cells = [
      el("td", { "data-field": "topic", ...keys, text: p.topic }),
      el("td", { className: "num", "data-field": "partition", ...keys, text: String(p.partition) }),
      ...COLUMNS.map(([name, cls]) => el("td", { className: cls, "data-field": name, ...keys })),
      el("td", {}, [el("span", { className: "badge", "data-field": "status", ...keys })]),
    ];
    return el("tr", keys, cells);
  }

  function renderGroup(g) {
    const section = groupSection(g.group);
    setBadge(field("group_status", section), g.status, null);
    show(field("members", section), g.members, isNum(g.members) ? String(g.members) : DASH);
    show(field("group_lag", section), g.lag, fmtInt(g.lag));
    show(field("group_lag_seconds", section), g.lag_seconds, fmtDuration(g.lag_seconds));
    const partitions = g.partitions || [];
    const body = section.querySelector("tbody");
    const keyOf = (p) => `${p.topic}\u0000${p.partition}`;
    const wanted = partitions.map(keyOf).join("\u0001");
    if (body.dataset.keys !== wanted) {
      body.replaceChildren(...partitions.map((p) => partitionRow(g.group, p)));
      body.dataset.keys = wanted;
    }
    partitions.forEach((p, i) => {
      const row = body.rows[i];
      for (const [name, , value] of COLUMNS) show(field(name, row), ...value(p));
      setBadge(field("status", row), p.status, p.reason);
      row.className = `row-${STATUSES.includes(p.status) ? p.status : "ERR"}`;
    });
    if (!partitions.length) {
      body.replaceChildren(el("tr", {}, [el("td", { colspan: 7, className: "muted", text: "no partitions" })]));
      body.dataset.keys = "";
    }
  }

  function renderGroups(snap) {
    const groups = snap.groups || [];
    const names = new Set(groups.map((g) => g.group));
    for (const section of document.querySelectorAll("section.group")) {
      if (!names.has(section.dataset.group)) section.remove();
    }
    groups.forEach(renderGroup);
    const placeholder = field("groups_placeholder");
    placeholder.hidden = groups.length > 0;
    placeholder.textContent = snap.error
      ? "No consumer group data: see the message above."
      : "No consumer group to show.";
  }

  // ---- charts: a small line chart on a canvas, gaps where a value is null

  const COLORS = { blue: "#2563eb", amber: "#d97706", green: "#059669", violet: "#7c3aed", red: "#dc2626" };

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const exp = 10 ** Math.floor(Math.log10(v));
    const m = v / exp;
    // Maxima whose quarters read well, since the axis has four divisions.
    const step = m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 10;
    return step * exp;
  }

  function axisMax(series, axis) {
    let max = 0;
    for (const s of series) {
      if ((s.axis || "left") !== axis) continue;
      for (const v of s.values) if (isNum(v) && v > max) max = v;
    }
    return niceMax(max * 1.05);
  }

  function fitCanvas(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 300;
    const height = Number(canvas.getAttribute("height")) || 180;
    canvas.style.height = `${height}px`;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return { ctx, width, height };
  }

  function drawAxes(ctx, box, axes, span) {
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i += 1) {
      const y = box.bottom - (i / 4) * (box.bottom - box.top);
      ctx.strokeStyle = i === 0 ? "#9ca3af" : "#e5e7eb";
      ctx.beginPath();
      ctx.moveTo(box.left, Math.round(y) + 0.5);
      ctx.lineTo(box.right, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillStyle = "#6b7280";
      ctx.textBaseline = "middle";
      ctx.textAlign = "right";
      ctx.fillText(axes.left.format((i / 4) * axes.left.max), box.left - 6, y);
      if (axes.right) {
        ctx.textAlign = "left";
        ctx.fillText(axes.right.format((i / 4) * axes.right.max), box.right + 6, y);
      }
    }
    const steps = [15, 30, 60, 120, 300, 600];
    const step = steps.find((s) => span / 1000 / s <= 6) || 600;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let back = 0; back * 1000 <= span; back += step) {
      const x = box.right - (back * 1000 * (box.right - box.left)) / span;
      const label = back === 0 ? "now" : back < 60 ? `-${back}s` : `-${back / 60}m`;
      ctx.fillText(label, x, box.bottom + 5);
    }
  }

  function drawLine(ctx, box, t, tMin, span, s, max) {
    const xOf = (ms) => box.left + ((ms - tMin) / span) * (box.right - box.left);
    const yOf = (v) => box.bottom - (v / max) * (box.bottom - box.top);
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 2;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    let open = false;
    s.values.forEach((v, i) => {
      if (!isNum(v) || !isNum(t[i])) {
        open = false;
        return;
      }
      const x = xOf(t[i]);
      const y = yOf(v);
      const lonely = !isNum(s.values[i - 1]) && !isNum(s.values[i + 1]);
      if (lonely) ctx.fillRect(x - 1.5, y - 1.5, 3, 3);
      if (open) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      open = true;
    });
    ctx.stroke();
    ctx.setLineDash([]);
  }

  function drawChart(canvas, t, series, axes) {
    const { ctx, width, height } = fitCanvas(canvas);
    ctx.clearRect(0, 0, width, height);
    const box = { left: 56, right: width - (axes.right ? 56 : 14), top: 8, bottom: height - 22 };
    const times = t.filter(isNum);
    const tMax = times.length ? times[times.length - 1] : Date.now();
    const span = Math.max(60_000, times.length ? tMax - times[0] : 0);
    axes.left.max = axisMax(series, "left");
    if (axes.right) axes.right.max = axisMax(series, "right");
    drawAxes(ctx, box, axes, span);
    const hasData = series.some((s) => s.values.some(isNum));
    if (!hasData) {
      ctx.fillStyle = "#9ca3af";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("no data yet", (box.left + box.right) / 2, (box.top + box.bottom) / 2);
      return;
    }
    for (const s of series) {
      const max = (s.axis === "right" ? axes.right : axes.left).max;
      drawLine(ctx, box, t, tMax - span, span, s, max);
    }
  }

  function renderLegend(name, series) {
    const node = document.querySelector(`[data-legend="${name}"]`);
    const items = series.map((s) => {
      const last = [...s.values].reverse().find(isNum);
      const value = el("b", { "data-field": `chart_${s.key}` });
      show(value, last ?? null, s.format(last));
      return el("span", { className: "legend-item" }, [
        el("i", { className: "swatch", style: `background:${s.color}` }),
        `${s.label} `,
        value,
      ]);
    });
    node.replaceChildren(...items);
  }

  function renderCharts(snap) {
    const h = snap.history || {};
    const t = Array.isArray(h.t) ? h.t : [];
    const col = (name) => (Array.isArray(h[name]) ? h[name] : []);
    const messages = (v) => (isNum(v) ? fmtInt(v) : DASH);
    const perSecond = (v) => (isNum(v) ? `${fmtRate(v)}/s` : DASH);
    const ms = (v) => (isNum(v) ? `${fmtMs(v)} ms` : DASH);
    const charts = {
      lag: [
        { key: "lag", label: "messages", values: col("lag"), color: COLORS.blue, format: messages },
        {
          key: "lag_seconds", label: "age of oldest (right axis)", values: col("lag_seconds"),
          color: COLORS.amber, axis: "right", dash: [5, 3], format: fmtDuration,
        },
      ],
      throughput: [
        { key: "events_in_per_s", label: "events in", values: col("events_in_per_s"), color: COLORS.blue, format: perSecond },
        {
          key: "recommendations_out_per_s", label: "recommendations out",
          values: col("recommendations_out_per_s"), color: COLORS.green, dash: [5, 3], format: perSecond,
        },
      ],
      latency: [
        { key: "p50_ms", label: "p50", values: col("p50_ms"), color: COLORS.violet, format: ms },
        { key: "p99_ms", label: "p99", values: col("p99_ms"), color: COLORS.red, format: ms },
      ],
    };
    const axes = {
      lag: { left: { format: compact }, right: { format: (v) => `${compact(v)} s` } },
      throughput: { left: { format: (v) => `${compact(v)}/s` } },
      latency: { left: { format: (v) => `${compact(v)} ms` } },
    };
    for (const [name, series] of Object.entries(charts)) {
      renderLegend(name, series);
      drawChart(document.querySelector(`[data-chart="${name}"]`), t, series, axes[name]);
    }
  }

  function compact(v) {
    if (v >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
    if (v >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
    return `${+v.toFixed(v < 10 ? 2 : 0)}`;
  }

  // ---- polling

  function render(snap) {
    state.snapshot = snap;
    if (isNum(snap.interval_seconds) && snap.interval_seconds > 0) {
      state.intervalS = Math.min(60, Math.max(0.2, snap.interval_seconds));
    }
    renderHeader(snap);
    renderKafkaError(snap);
    renderTiles(snap);
    renderGroups(snap);
    renderCharts(snap);
    document.body.dataset.generatedAt = String(snap.generated_at ?? "");
  }

  /** An answer that is not a snapshot: the server runs, but has nothing to show yet. */
  class ServerAnswer extends Error {}

  async function fetchSnapshot() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), Math.max(3000, state.intervalS * 2000));
    let response;
    let text;
    try {
      response = await fetch("/api/status", { cache: "no-store", signal: abort.signal });
      text = await response.text();
    } catch (error) {
      throw new Error(error.name === "AbortError" ? "no answer in time" : error.message);
    } finally {
      clearTimeout(timer);
    }
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      throw new ServerAnswer(`HTTP ${response.status}: the answer is not JSON`);
    }
    if (!response.ok) throw new ServerAnswer(`HTTP ${response.status}: ${body.error ?? text}`);
    return body;
  }

  function renderFailed(error) {
    const banner = field("page_error");
    banner.textContent = `This page could not show the last snapshot: ${error.message}`;
    banner.hidden = false;
    // Rethrown outside the poll loop so that it reaches the console and the browser's error log.
    setTimeout(() => {
      throw error;
    });
  }

  async function poll() {
    try {
      const snap = await fetchSnapshot();
      serverAnswered();
      try {
        render(snap);
        field("page_error").hidden = true;
      } catch (error) {
        renderFailed(error);
      }
    } catch (error) {
      serverFailed(error);
    } finally {
      setTimeout(poll, state.intervalS * 1000);
    }
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => state.snapshot && renderCharts(state.snapshot), 150);
  });
  setInterval(renderConnection, 1000);
  poll();
})();
