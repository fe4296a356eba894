// The apigate dashboard: polls the admin API every 2 s while the tab is visible and renders it.
// Route names, consumer ids, IPs and upstream names come from configs and clients, so every value
// is written as text (textContent / text nodes), never parsed as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "apigate.admin.token";
  const POLL_MS = 2000;
  const HISTORY_SECONDS = 300;
  const LATENCY_ROUTES = 8; // the busiest routes get a line in the latency chart
  const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d"];
  const RATE_FILL = "rgba(37, 99, 235, 0.25)";
  const NO_ROUTE = "(no route)";
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300]; // whole seconds between time-axis ticks

  const $ = (id) => document.getElementById(id);

  const view = {
    token: sessionStorage.getItem(TOKEN_KEY),
    timer: null,
    polling: false,
    previous: null, // the last /api/metrics answer, for rates between polls
    rate: { time: [], requests: [], errors: [] },
    latency: { time: [], routes: [], values: new Map() }, // route -> p95 per time
    charts: { rate: null, latency: null, latencyKey: "" },
  };

  class AuthRefused extends Error {
    constructor(status) {
      super(`HTTP ${status}`);
      this.status = status;
    }
  }

  // -- the admin API --------------------------------------------------------------------------------
  async function api(path) {
    const headers = view.token ? { Authorization: `Bearer ${view.token}` } : {};
    let response;
    try {
      response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    } catch (error) {
      // fetch refuses a header value outside Latin-1 before sending: that token cannot be right.
      if (error instanceof TypeError && view.token && !/^[\x20-\x7e]*$/.test(view.token)) {
        throw new AuthRefused(403);
      }
      throw error;
    }
    if (response.status === 401 || response.status === 403) throw new AuthRefused(response.status);
    if (!response.ok) throw new Error(`${path} answered HTTP ${response.status}`);
    return response.json();
  }

  async function poll() {
    clearTimeout(view.timer); // a poll asked for now replaces the one scheduled
    view.timer = null;
    if (view.polling || document.hidden) return;
    view.polling = true;
    try {
      const [metrics, circuits, health] = await Promise.all([
        api("/api/metrics"),
        api("/api/circuits"),
        api("/api/health"),
      ]);
      showDashboard();
      render(metrics, circuits, health);
      setStatus(`Updated ${new Date().toLocaleTimeString()}`, false);
    } catch (error) {
      if (error instanceof AuthRefused) {
        askForToken(error.status === 403 && view.token
          ? "That token was not accepted (403). Check it and try again."
          : view.token
            ? "The admin API refused the token (401). Enter it again."
            : "This gateway's admin API needs its token.", Boolean(view.token));
        return;
      }
      setStatus(`Cannot reach the admin API: ${error.message}. Retrying…`, true);
    } finally {
      view.polling = false;
    }
    schedule();
  }

  function schedule() {
    if (view.timer === null && !document.hidden && $("login").hidden) {
      view.timer = setTimeout(poll, POLL_MS);
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(view.timer);
      view.timer = null;
    } else if (!$("login").hidden) {
      // waiting for a token: nothing to poll
    } else {
      poll();
    }
  });

  // -- login ----------------------------------------------------------------------------------------
  function askForToken(message, isError) {
    clearTimeout(view.timer);
    view.timer = null;
    view.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    forgetData();
    $("dashboard").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    const note = $("login-message");
    note.textContent = message;
    note.classList.toggle("error", isError);
    setStatus(isError ? "Not signed in: the token was refused." : "Not signed in.", isError);
    $("token").value = "";
    $("token").focus();
  }

  function showDashboard() {
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("sign-out").hidden = !view.token;
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    view.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    setStatus("Signing in…", false);
    poll();
  });

  $("sign-out").addEventListener("click", () => askForToken("Signed out. Enter the token to sign in again.", false));

  // -- what is shown --------------------------------------------------------------------------------
  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function forgetData() {
    view.previous = null;
    view.rate = { time: [], requests: [], errors: [] };
    view.latency = { time: [], routes: [], values: new Map() };
    dropChart("rate");
    dropChart("latency");
    for (const node of document.querySelectorAll("#dashboard tbody, #dashboard dl")) node.replaceChildren();
    $("health-overall").textContent = "";
  }

  function render(answer, circuits, health) {
    const metrics = { ...answer, routes: routesOf(answer) };
    track(metrics);
    renderOverview(metrics);
    renderRateChart();
    renderLatency(metrics);
    renderErrors(metrics);
    renderRefused(metrics);
    renderClients(metrics);
    renderUpstreams(metrics, circuits, health);
    renderWebhooks(metrics);
  }

  // Requests no route matched come as "unrouted" (or as the route ""): one row, "(no route)".
  function routesOf(metrics) {
    const routes = { ...(metrics.routes || {}) };
    if (metrics.unrouted) routes[""] = metrics.unrouted;
    return routes;
  }

  // Rates come from the counters' growth between two polls of the same node (same started_at).
  function track(metrics) {
    const before = view.previous;
    view.previous = metrics;
    if (!before || before.started_at !== metrics.started_at) return;
    const seconds = metrics.uptime_seconds - before.uptime_seconds;
    const grown = metrics.requests_total - before.requests_total;
    if (!(seconds > 0) || grown < 0) return; // a worker's counters left with it: wait for the next
    const now = Date.now() / 1000;
    const rate = view.rate;
    rate.time.push(now);
    rate.requests.push(grown / seconds);
    rate.errors.push(Math.max(0, metrics.errors - before.errors) / seconds);
    const latency = view.latency;
    latency.time.push(now);
    for (const [route, values] of latency.values) values.push(lastMinute(metrics.routes[route])?.p95 ?? null);
    for (const route of busiestRoutes(metrics)) {
      if (!latency.values.has(route)) {
        const values = latency.time.map(() => null);
        values[values.length - 1] = lastMinute(metrics.routes[route]).p95;
        latency.values.set(route, values);
      }
    }
    latency.routes = busiestRoutes(metrics);
    trimHistory(now);
  }

  function trimHistory(now) {
    const drop = view.rate.time.findIndex((t) => t >= now - HISTORY_SECONDS);
    if (drop > 0) {
      for (const series of [view.rate.time, view.rate.requests, view.rate.errors, view.latency.time]) {
        series.splice(0, drop);
      }
      for (const values of view.latency.values.values()) values.splice(0, drop);
    }
    for (const route of [...view.latency.values.keys()]) {
      if (!view.latency.routes.includes(route)) view.latency.values.delete(route);
    }
  }

  function lastMinute(route) {
    return route?.latency_ms?.last_minute;
  }

  function busiestRoutes(metrics) {
    return Object.entries(metrics.routes || {})
      .filter(([, route]) => (lastMinute(route)?.count ?? 0) > 0)
      .sort((a, b) => lastMinute(b[1]).count - lastMinute(a[1]).count)
      .slice(0, LATENCY_ROUTES)
      .map(([name]) => name)
      .sort();
  }

  function renderOverview(metrics) {
    const responses = metrics.responses || {};
    tiles($("overview"), [
      ["uptime", duration(metrics.uptime_seconds)],
      ["workers", metrics.workers],
      ["requests", metrics.requests_total],
      ["in flight", metrics.requests_in_flight],
      ["connections", metrics.connections_open],
      ["2xx", responses["2xx"] ?? 0],
      ["4xx", responses["4xx"] ?? 0],
      ["5xx", responses["5xx"] ?? 0],
      ["errors", metrics.errors],
      ["retries", metrics.retries],
    ]);
  }

  function renderRateChart() {
    const rate = view.rate;
    const data = [rate.time, rate.requests, rate.errors];
    if (view.charts.rate) {
      view.charts.rate.setData(data);
      return;
    }
    view.charts.rate = makeChart($("rate-chart"), data, [
      { label: "requests/s", stroke: COLORS[0], fill: RATE_FILL, width: 2, value: perSecond },
      { label: "errors/s", stroke: COLORS[1], width: 2, value: perSecond },
    ]);
  }

  function renderLatency(metrics) {
    const routes = view.latency.routes;
    const key = JSON.stringify(routes);
    const data = [view.latency.time, ...routes.map((route) => view.latency.values.get(route))];
    if (view.charts.latency && view.charts.latencyKey === key) {
      view.charts.latency.setData(data);
    } else {
      // The set of routes changed: a chart with one series per route, drawn afresh.
      dropChart("latency");
      view.charts.latencyKey = key;
      view.charts.latency = makeChart($("latency-chart"), data, routes.map((route, i) => ({
        label: `${routeName(route)} p95`,
        stroke: COLORS[i % COLORS.length],
        width: 2,
        value: milliseconds,
        spanGaps: false,
      })));
    }
    const rows = Object.entries(metrics.routes || {}).sort(byName).map(([route, stats]) => {
      const minute = lastMinute(stats) || {};
      return [routeCell(route), minute.count ?? 0, ms(minute.p50), ms(minute.p95), ms(minute.p99)];
    });
    fillTable($("latency-table"), rows, "No requests yet.");
  }

  function renderErrors(metrics) {
    const rows = Object.entries(metrics.routes || {}).sort(byName).map(([route, stats]) => {
      const responses = stats.responses || {};
      const share = stats.requests ? stats.errors / stats.requests : 0;
      return [
        routeCell(route),
        stats.requests,
        responses["4xx"] ?? 0,
        responses["5xx"] ?? 0,
        stats.errors,
        marked(percent(share), share > 0.05 ? "bad" : share > 0 ? "warn" : null),
      ];
    });
    fillTable($("errors-table"), rows, "No requests yet.");
    const types = Object.entries(metrics.errors_by_type || {}).sort((a, b) => b[1] - a[1]);
    fillTable($("error-types-table"), types, "None.");
  }

  function renderRefused(metrics) {
    tiles($("refused-totals"), [
      ["rate limited", metrics.rate_limited],
      ["auth failures", metrics.auth_failures],
    ]);
    const rows = Object.entries(metrics.routes || {})
      .filter(([, stats]) => stats.rate_limited || stats.auth_failures)
      .sort(byName)
      .map(([route, stats]) => [routeCell(route), stats.rate_limited, stats.auth_failures]);
    fillTable($("refused-table"), rows, "Nothing refused.");
  }

  function renderClients(metrics) {
    const top = metrics.top_clients || {};
    const rows = (list) => (list || []).map((client) => [client.key, client.requests]);
    fillTable($("clients-ip"), rows(top.ip), "No clients yet.");
    fillTable($("clients-consumer"), rows(top.consumer), "No identified consumers yet.");
  }

  const STATE_CLASS = { closed: "good", "half-open": "warn", half_open: "warn", open: "bad" };
  const HEALTH_CLASS = { healthy: "good", degraded: "warn", unhealthy: "bad", unchecked: null };

  function renderUpstreams(metrics, circuits, health) {
    const overall = health.status || "unknown";
    const summary = $("health-overall");
    summary.textContent = `Active checks: ${overall}`;
    summary.className = `summary ${HEALTH_CLASS[overall] || ""}`;
    const healthRows = Object.entries(health.services || {}).sort(byName).map(([name, service]) => [
      name,
      marked(service.status, HEALTH_CLASS[service.status] || null),
      service.targets === undefined ? "–" : `${service.healthy_targets}/${service.targets}`,
      ms(service.response_time_ms),
    ]);
    fillTable($("health-table"), healthRows, "No upstreams.");
    const circuitRows = (circuits.circuits || []).map((circuit) => [
      circuit.upstream,
      circuit.target === null || circuit.target === undefined ? italic("(whole upstream)") : circuit.target,
      marked(circuit.state, STATE_CLASS[circuit.state] || null),
      circuit.failures,
    ]);
    fillTable($("circuits-table"), circuitRows, "No circuit breakers configured.");
    const latencyRows = [];
    for (const [name, upstream] of Object.entries(metrics.upstreams || {}).sort(byName)) {
      latencyRows.push(latencyRow(name, upstream.latency_ms?.last_minute, "upstream"));
      for (const [target, stats] of Object.entries(upstream.targets || {}).sort(byName)) {
        latencyRows.push(latencyRow(`↳ ${target}`, stats.latency_ms?.last_minute, "target"));
      }
    }
    fillTable($("upstream-latency-table"), latencyRows, "No upstream traffic yet.");
  }

  function latencyRow(label, minute, kind) {
    minute = minute || {};
    const row = [label, minute.count ?? 0, ms(minute.p50), ms(minute.p95), ms(minute.p99)];
    row.kind = kind;
    return row;
  }

  function renderWebhooks(metrics) {
    const webhooks = metrics.webhooks || {};
    const sources = Object.entries(webhooks.sources || {}).sort(byName);
    const sum = (field) => sources.reduce((total, [, source]) => total + (source[field] || 0), 0);
    tiles($("webhook-totals"), [
      ["received", webhooks.received ?? 0],
      ["backlog", sum("backlog")],
      ["dead letters", sum("dead_letters")],
    ]);
    const rows = sources.map(([name, source]) => [
      name,
      source.received ?? 0,
      source.delivered ?? 0,
      source.failed ?? 0,
      marked(source.backlog ?? 0, source.backlog ? "warn" : null),
      marked(source.dead_letters ?? 0, source.dead_letters ? "bad" : null),
    ]);
    fillTable($("webhooks-table"), rows, "No webhook sources.");
  }

  // -- building blocks (text only) ------------------------------------------------------------------
  function tiles(list, items) {
    list.replaceChildren(...items.flatMap(([label, value]) => {
      const box = document.createElement("div");
      const term = document.createElement("dt");
      const detail = document.createElement("dd");
      term.textContent = label;
      detail.textContent = String(value ?? "–");
      box.append(term, detail);
      return [box];
    }));
  }

  function fillTable(table, rows, empty) {
    const body = table.tBodies[0];
    if (!rows.length) {
      const cell = document.createElement("td");
      cell.colSpan = table.tHead.rows[0].cells.length;
      cell.className = "empty";
      cell.textContent = empty;
      const row = document.createElement("tr");
      row.append(cell);
      body.replaceChildren(row);
      return;
    }
    body.replaceChildren(...rows.map((values) => {
      const row = document.createElement("tr");
      if (values.kind) row.className = values.kind;
      for (const value of values) {
        const cell = document.createElement("td");
        if (value instanceof Node) cell.append(value);
        else cell.textContent = String(value ?? "–");
        row.append(cell);
      }
      return row;
    }));
  }

  function marked(text, kind) {
    const span = document.createElement("span");
    span.textContent = String(text);
    if (kind) span.className = `mark ${kind}`;
    return span;
  }

  function italic(text) {
    const node = document.createElement("i");
    node.textContent = text;
    return node;
  }

  function routeCell(route) {
    return route === "" ? italic(NO_ROUTE) : route;
  }

  function routeName(route) {
    return route === "" ? NO_ROUTE : route;
  }

  function byName(a, b) {
    return a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0;
  }

  function ms(value) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(value < 10 ? 2 : 1);
  }

  function percent(share) {
    return `${(share * 100).toFixed(share && share < 0.01 ? 2 : 1)}%`;
  }

  function duration(seconds) {
    const s = Math.floor(seconds || 0);
    const [d, h, m] = [Math.floor(s / 86400), Math.floor((s % 86400) / 3600), Math.floor((s % 3600) / 60)];
    return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
  }

  function perSecond(u, value) {
    return value === null || value === undefined ? "–" : value.toFixed(value < 10 ? 2 : 1);
  }

  function milliseconds(u, value) {
    return value === null || value === undefined ? "–" : `${ms(value)} ms`;
  }

  // -- charts (uPlot) -------------------------------------------------------------------------------
  function makeChart(container, data, series) {
    container.replaceChildren();
    const chart = new uPlot({
      width: chartWidth(container),
      height: container.clientWidth < 500 ? 180 : 220,
      series: [{}, ...series],
      scales: { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [{ incrs: TIME_STEPS, values: clockTimes, space: 70 }, { size: 56 }],
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
    }, data, container);
    chart.resizing = new ResizeObserver(() => {
      chart.setSize({ width: chartWidth(container), height: chart.height });
    });
    chart.resizing.observe(container);
    return chart;
  }

  function dropChart(key) {
    const chart = view.charts[key];
    if (chart) {
      chart.resizing.disconnect();
      chart.destroy();
    }
    view.charts[key] = null;
    if (key === "latency") view.charts.latencyKey = "";
  }

  function clockTimes(u, splits) {
    return splits.map((seconds) => new Date(seconds * 1000).toLocaleTimeString([], { hour12: false }));
  }

  function chartWidth(container) {
    return Math.max(200, Math.floor(container.clientWidth));
  }

  // -- start ----------------------------------------------------------------------------------------
  // Without a stored token the first poll goes without one: a gateway without a token (loopback
  // only) answers, one with a token says 401 and the login form appears.
  poll();
})();
