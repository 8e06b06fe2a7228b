// fedflock dashboard: fetches api/status (schema 1, broker_server/ops/status.py) and renders it.
// Plain DOM, no dependencies. Everything a device reports is inserted with textContent, never as HTML.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PLOT = { width: 640, height: 240, left: 44, right: 16, top: 12, bottom: 30 };

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function fmt(value, digits) {
    return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "–";
  }

  function age(seconds) {
    if (typeof seconds !== "number") return "–";
    if (seconds < 90) return Math.round(seconds) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return (seconds / 3600).toFixed(1) + " h ago";
  }

  function yesNo(flag) {
    return el("span", flag ? "yes" : "no", flag ? "yes" : "no");
  }

  function row(cells, attrs) {
    const tr = document.createElement("tr");
    for (const [name, value] of Object.entries(attrs || {})) tr.setAttribute(name, String(value));
    for (const cell of cells) {
      if (cell instanceof Node) {
        const td = el("td");
        td.appendChild(cell);
        tr.appendChild(td);
      } else {
        tr.appendChild(el("td", cell.text, cell.cls));
      }
    }
    return tr;
  }

  function renderSummary(status) {
    const counts = status.device_counts;
    const server = status.server;
    document.getElementById("summary").textContent =
      "model v" + status.model_version + " · " + server.strategy + " · round " + status.rounds_total +
      " of " + server.rounds + " · devices " + counts.online + " online / " + counts.known + " known, " +
      counts.eligible + " eligible";
  }

  function renderDevices(devices) {
    const body = document.querySelector("#devices tbody");
    body.replaceChildren();
    for (const d of devices) {
      const reasons = d.reasons.map((r) => r.code + (r.text ? ": " + r.text : "")).join("; ");
      body.appendChild(row([
        { text: d.device_id },
        { text: d.device_class },
        yesNo(d.online),
        yesNo(d.eligible),
        { text: reasons, cls: "reasons" },
        { text: d.agent_version },
        { text: d.num_examples, cls: "num" },
        { text: age(d.last_seen_age_s) },
      ], { "data-device-id": d.device_id, class: "device" }));
    }
    if (!devices.length) body.appendChild(row([{ text: "No device has reported yet.", cls: "muted" }]));
  }

  function renderRounds(rounds) {
    const body = document.querySelector("#rounds tbody");
    body.replaceChildren();
    for (const r of rounds.slice().reverse()) {
      body.appendChild(row([
        { text: r.round, cls: "num" },
        { text: r.outcome, cls: r.completed ? "yes" : "no" },
        { text: "v" + r.model_version },
        { text: r.reported + " / " + r.selected, cls: "num" },
        { text: r.failed, cls: "num" },
        { text: r.num_examples, cls: "num" },
        { text: fmt(r.test_accuracy, 4), cls: "num" },
        { text: fmt(r.test_loss, 4), cls: "num" },
        { text: fmt(r.duration_s, 1) + " s", cls: "num" },
        { text: r.reason, cls: "reasons" },
      ], { "data-round": r.round, class: "round" }));
    }
  }

  function renderPlot(rounds) {
    const plot = document.getElementById("accuracy-plot");
    const points = rounds
      .filter((r) => r.completed && typeof r.test_accuracy === "number")
      .map((r) => ({ round: r.round, accuracy: Math.min(1, Math.max(0, r.test_accuracy)) }));
    plot.replaceChildren();
    document.getElementById("accuracy-empty").hidden = points.length > 0;
    plot.classList.toggle("empty", points.length === 0);
    if (!points.length) return;
    const w = PLOT.width - PLOT.left - PLOT.right;
    const h = PLOT.height - PLOT.top - PLOT.bottom;
    const first = points[0].round;
    const last = points[points.length - 1].round;
    const x = (n) => PLOT.left + (last === first ? w / 2 : ((n - first) / (last - first)) * w);
    const y = (a) => PLOT.top + (1 - a) * h;
    for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
      plot.appendChild(svg("line", { x1: PLOT.left, x2: PLOT.left + w, y1: y(tick), y2: y(tick), class: "grid" }));
      plot.appendChild(svg("text", { x: PLOT.left - 6, y: y(tick) + 4, "text-anchor": "end", class: "label" }, tick.toFixed(2)));
    }
    plot.appendChild(svg("line", { x1: PLOT.left, x2: PLOT.left, y1: PLOT.top, y2: PLOT.top + h, class: "axis" }));
    plot.appendChild(svg("line", { x1: PLOT.left, x2: PLOT.left + w, y1: PLOT.top + h, y2: PLOT.top + h, class: "axis" }));
    for (const n of new Set([first, last])) {
      plot.appendChild(svg("text", { x: x(n), y: PLOT.top + h + 18, "text-anchor": "middle", class: "label" }, "round " + n));
    }
    const coords = points.map((p) => x(p.round).toFixed(1) + "," + y(p.accuracy).toFixed(1));
    plot.appendChild(svg("polyline", { points: coords.join(" "), class: "accuracy-line" }));
    for (const p of points) {
      const dot = svg("circle", { cx: x(p.round), cy: y(p.accuracy), r: 3, class: "accuracy-point" });
      dot.appendChild(svg("title", {}, "round " + p.round + ": " + p.accuracy.toFixed(4)));
      plot.appendChild(dot);
    }
  }

  function renderRollout(rollout) {
    const box = document.getElementById("rollout");
    box.replaceChildren();
    if (!rollout) {
      box.appendChild(el("p", "No rollout.", "muted"));
      return;
    }
    const dl = el("dl", null, "kv");
    const add = (term, value, cls) => {
      dl.appendChild(el("dt", term));
      dl.appendChild(el("dd", value, cls));
    };
    add("Rollout", rollout.rollout_id);
    add("Versions", "v" + rollout.baseline_version + " → v" + rollout.version);
    add("Status", rollout.status, "status-" + rollout.status);
    add("Stage", (rollout.stage + 1) + " of " + rollout.stages.length + " (" + rollout.stages.join("% → ") + "%)");
    add("Share on new version", rollout.percent + "%");
    add("Installs", rollout.installs.ok + " ok, " + rollout.installs.failed + " failed");
    add(rollout.metric, "canary " + fmt(rollout.canary_mean, 4) + " (" + rollout.canary_reports + ") vs baseline " +
      fmt(rollout.baseline_mean, 4) + " (" + rollout.baseline_reports + ")");
    if (rollout.reason) add("Reason", rollout.reason);
    if (rollout.blockers.length) add("Waiting for", rollout.blockers.join("; "));
    box.appendChild(dl);
  }

  function renderTrust(trust) {
    const on = Boolean(trust);
    document.getElementById("trust-off").hidden = on;
    document.getElementById("quarantined").hidden = !on;
    document.getElementById("trust-events").hidden = !on || !trust.recent.length;
    const held = document.querySelector("#quarantined tbody");
    const events = document.querySelector("#trust-events tbody");
    held.replaceChildren();
    events.replaceChildren();
    if (!on) return;
    for (const q of trust.quarantined) {
      held.appendChild(row([
        { text: q.device_id },
        { text: fmt(q.score, 2), cls: "num" },
        { text: q.strikes, cls: "num" },
        { text: q.reason, cls: "reasons" },
      ], { "data-device-id": q.device_id, class: "quarantined" }));
    }
    if (!trust.quarantined.length) held.appendChild(row([{ text: "No device is quarantined.", cls: "muted" }]));
    for (const e of trust.recent.slice().reverse()) {
      events.appendChild(row([
        { text: e.round, cls: "num" },
        { text: e.device_id },
        { text: e.action, cls: "trust-" + e.action },
        { text: fmt(e.score, 2), cls: "num" },
        { text: e.reason, cls: "reasons" },
      ], { class: "trust-event" }));
    }
  }

  function render(status) {
    renderSummary(status);
    renderDevices(status.devices);
    renderRounds(status.rounds);
    renderPlot(status.rounds);
    renderRollout(status.rollout);
    renderTrust(status.trust);
  }

  function showError(message) {
    const node = document.getElementById("error");
    node.textContent = message;
    node.hidden = !message;
  }

  async function refresh() {
    try {
      const response = await fetch("api/status", { cache: "no-store" });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error ? body.error.message : "HTTP " + response.status);
      render(body);
      showError("");
    } catch (err) {
      showError("status unavailable: " + err.message);
    } finally {
      setTimeout(refresh, REFRESH_MS);
    }
  }

  refresh();
})();
