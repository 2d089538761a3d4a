/* Alfred status page: polls /status.json and redraws the page in place (no reload).
 *
 * Safety rules kept by every line below:
 * - Text from users or Meta (names, texts, error messages) is only ever set with textContent /
 *   append(string) / setAttribute on plain attributes: never parsed as markup, never a URL or on* attribute.
 *   Bidi and control characters are shown as "\u2039U+XXXX\u203a" (as the server does) and sit in <bdi>.
 * - The API token lives in sessionStorage only (this tab): never a cookie, never the URL, never a
 *   form field that could be submitted.
 * - Without a token /status.json gives the open view (counts and states); with it, the detailed
 *   view (names, texts, errors), fetched with the same header as the actions below.
 * - Operator actions are fetch() POSTs carrying `Authorization: Bearer <token>` with
 *   credentials: "omit". This is CSRF-safe by construction: the API accepts no ambient credential
 *   (no cookie, no basic auth), and another site cannot read the token from this origin's
 *   sessionStorage nor set an Authorization header on a cross-origin request without a CORS
 *   preflight, which this server never grants.
 * The structure built here mirrors alfred_bot/templates/status.html: keep the two in step.
 */
(function () {
  "use strict";

  var TOKEN_KEY = "alfred.apiToken";
  var STALE_AFTER_MS = 10000;
  var STATES = ["queued", "sending", "sent", "delivered", "read", "played", "failed"];
  var INVISIBLE = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]/g;

  var pollMs = Number(document.body.dataset.pollMs) || 3000;
  var codes = readCodes();
  var lastOk = Date.now();
  var timer = null;
  var detailedView = false;  // the last /status.json was the detailed view (the token was accepted)

  // ------------------------------------------------------------------ formatting (as the server)

  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function visible(v) {
    if (v === null || v === undefined) return "";
    return String(v).replace(INVISIBLE, function (c) {
      return "\u2039U+" + c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0") + "\u203a";
    });
  }
  function count(v) { return isNum(v) ? Math.round(v).toLocaleString("en-US") : "\u2014"; }
  function ms(v) {
    if (!isNum(v)) return "\u2014";
    return v < 10 ? v.toFixed(1) : Math.round(v).toLocaleString("en-US");
  }
  function pct(v) { return isNum(v) ? (v * 100).toFixed(1) + "%" : "\u2014"; }
  function duration(v) {
    if (!isNum(v)) return "\u2014";
    var s = Math.floor(v), d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
    var m = Math.floor(s % 3600 / 60), sec = s % 60;
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " m";
    return m ? m + " m " + sec + " s" : sec + " s";
  }
  function utc(v) {
    return isNum(v) ? new Date(v * 1000).toISOString().slice(0, 19).replace("T", " ") : "\u2014";
  }
  function codeName(c) { return Object.prototype.hasOwnProperty.call(codes, String(c)) ? codes[String(c)] : ""; }
  function obj(v) { return v && typeof v === "object" && !Array.isArray(v) ? v : {}; }
  function arr(v) { return Array.isArray(v) ? v : []; }

  function readCodes() {
    var el = document.getElementById("graph-codes");
    try { return obj(JSON.parse(el ? el.textContent : "{}")); } catch (e) { return {}; }
  }

  // ------------------------------------------------------------------ DOM building

  var ATTRS = ["class", "title", "colspan", "hidden", "disabled", "type", "min", "max", "low", "high",
    "optimum", "value", "role", "data-tenant", "data-field", "data-id", "data-retry", "data-chart", "aria-label"];

  /** h("td", {class: "x"}, "text", child): children are text or nodes; only known attributes. */
  function h(tag, attrs) {
    var el = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      var v = attrs[k];
      if (ATTRS.indexOf(k) < 0 || v === null || v === undefined || v === false) return;
      el.setAttribute(k, v === true ? "" : String(v));
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (Array.isArray(c)) c.forEach(function (x) { if (x !== null && x !== undefined) el.append(x); });
      else if (c !== null && c !== undefined && c !== false) el.append(c);
    }
    return el;
  }
  var SVG_NS = "http://www.w3.org/2000/svg";
  var SVG_ATTRS = ["class", "viewBox", "role", "aria-labelledby", "focusable", "id", "x", "y", "x1", "y1", "x2",
    "y2", "width", "height", "rx", "d", "text-anchor"];

  /** s("path", {d: "..."}): an SVG element; children are text or nodes; only known attributes. */
  function s(tag, attrs) {
    var el = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (SVG_ATTRS.indexOf(k) >= 0 && attrs[k] !== null && attrs[k] !== undefined) el.setAttribute(k, String(attrs[k]));
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (Array.isArray(c)) c.forEach(function (x) { if (x !== null && x !== undefined) el.append(x); });
      else if (c !== null && c !== undefined) el.append(c);
    }
    return el;
  }
  function text(id, value) { var el = document.getElementById(id); if (el) el.textContent = value; }

  function orderedStates(outbox) {
    var known = STATES.filter(function (s) { return s in outbox; });
    var rest = Object.keys(outbox).filter(function (s) { return STATES.indexOf(s) < 0; }).sort();
    return known.concat(rest).map(function (s) { return [s, outbox[s]]; });
  }

  function pauseBox(p) {
    return h("div", {class: "pause", role: "alert"},
      h("strong", {}, "Paused" + (p.kind ? " (" + visible(p.kind) + ")" : "") + ":"), " ",
      h("bdi", {class: "reason", "data-field": "pause-reason"},
        visible(p.reason) || (detailedView ? "no reason given" : "the reason needs the API token")),
      h("div", {class: "pause-meta"}, "code " + (visible(p.code) || "\u2014") + " \u00b7 since " + utc(p.since)));
  }

  function stat(label, field, value, unit) {
    var dd = unit ? h("dd", {}, h("span", {"data-field": field}, value), h("small", {}, unit))
                  : h("dd", {"data-field": field}, value);
    return h("div", {class: "stat"}, h("dt", {}, label), dd);
  }

  function chips(field, items, empty) {
    return h("ul", {class: "chips", "data-field": field},
      items.length ? items : h("li", {class: "chip empty"}, empty));
  }

  // ------------------------------------------------------------------ charts (as statuspage/charts.py)
  // Same shapes for the same data, coordinate for coordinate: keep in step with charts.py.

  var WIDTH = 320, HEIGHT = 120, LEFT = 38, RIGHT = 8, TOP = 10, BOTTOM = 22;
  var PLOT_W = WIDTH - LEFT - RIGHT, PLOT_H = HEIGHT - TOP - BOTTOM;
  var RATE_HEIGHT = 54, RATE_LEFT = 62, RATE_VALUE = 48, X_TICKS = 5;
  var SERIES = [["inbound", "inbound"], ["sent", "sent"], ["failed", "failed"]];

  function coord(v) { return String(Math.floor(v * 10 + 0.5) / 10); }
  function niceMax(v) {
    var top = 2;
    while (top < v) top = String(top)[0] === "4" ? Math.floor(top * 5 / 2) : top * 2;
    return top;
  }
  function hhmm(at) { return isNum(at) ? new Date(at * 1000).toISOString().slice(11, 16) : ""; }
  function num(v) { return isNum(v) ? v : 0; }
  function xAt(i, n) { return LEFT + (n > 1 ? PLOT_W * i / (n - 1) : PLOT_W / 2); }
  function yAt(v, top) { return TOP + PLOT_H * (1 - Math.min(v, top) / top); }
  function anchor(k, ticks) {
    if (ticks.length > 1 && k === 0) return "start";
    return ticks.length > 1 && k === ticks.length - 1 ? "end" : "middle";
  }

  function frame(points, top) {
    var n = points.length, ys = [0, 1, 2].map(function (k) { return [top * k / 2, yAt(top * k / 2, top)]; });
    var xs = [];
    if (n > 1) for (var k = 0; k < X_TICKS; k++) xs.push(Math.floor((n - 1) * k / (X_TICKS - 1) + 0.5));
    else if (n === 1) xs.push(0);
    return {
      width: WIDTH, height: HEIGHT,
      grid: ys.map(function (p) { return {x1: coord(LEFT), x2: coord(WIDTH - RIGHT), y: coord(p[1])}; }),
      y_ticks: ys.map(function (p) { return {x: coord(LEFT - 4), y: coord(p[1] + 3), label: count(p[0])}; }),
      x_ticks: xs.map(function (i, k) {
        return {x: coord(xAt(i, n)), y: coord(HEIGHT - 6), label: hhmm(points[i].at), anchor: anchor(k, xs)};
      }),
      baseline: {x1: coord(LEFT), x2: coord(WIDTH - RIGHT), y: coord(TOP + PLOT_H)}
    };
  }

  function bars(values, n, top) {
    var width = Math.max(1, PLOT_W / Math.max(n, 1) - 1);
    return values.map(function (iv) {
      return {x: coord(xAt(iv[0], n) - width / 2), y: coord(yAt(iv[1], top)), width: coord(width),
        height: coord(TOP + PLOT_H - yAt(iv[1], top))};
    });
  }

  function countsChart(points) {
    var n = points.length, totals = {}, peak = 0, inbound = [];
    SERIES.forEach(function (sr) {
      totals[sr[0]] = points.reduce(function (sum, p) { return sum + Math.trunc(num(p[sr[0]])); }, 0);
      points.forEach(function (p) { peak = Math.max(peak, num(p[sr[0]])); });
    });
    var top = niceMax(peak);
    points.forEach(function (p, i) { if (num(p.inbound) > 0) inbound.push([i, num(p.inbound)]); });
    var lines = ["sent", "failed"].map(function (key) {
      var steps = points.map(function (p, i) { return coord(xAt(i, n)) + "," + coord(yAt(num(p[key]), top)); });
      return {key: key, d: steps.length ? "M" + steps.join(" L") : ""};
    });
    var legend = SERIES.map(function (sr) { return {key: sr[0], label: sr[1], total: totals[sr[0]]}; });
    return Object.assign(frame(points, top), {top: top, peak: peak, totals: totals, bars: bars(inbound, n, top),
      lines: lines, legend: legend});
  }

  function latencyChart(points) {
    var n = points.length, values = [], peak = 0;
    points.forEach(function (p, i) { if (isNum(p.p95_ms)) { values.push([i, p.p95_ms]); peak = Math.max(peak, p.p95_ms); } });
    var top = niceMax(peak);
    return Object.assign(frame(points, top), {top: top, peak: peak, bars: bars(values, n, top), minutes: n,
      minutes_with_replies: values.length});
  }

  function ratesChart(delivered, read) {
    var track = WIDTH - RATE_LEFT - RATE_VALUE;
    var rows = [["delivered", delivered], ["read", read]].map(function (kv, k) {
      var known = isNum(kv[1]), share = known ? Math.min(1, Math.max(0, kv[1])) : 0, y = 4 + k * 26;
      return {key: kv[0], label: kv[0], y: coord(y), text_y: coord(y + 13), fill: coord(track * share),
        value: known ? (share * 100).toFixed(1) + "%" : "\u2014"};
    });
    return {width: WIDTH, height: RATE_HEIGHT, left: coord(RATE_LEFT), label_x: coord(RATE_LEFT - 6),
      track: coord(track), value_x: coord(WIDTH - RATE_VALUE + 6), rows: rows};
  }

  function svgFrame(c) {
    return [
      s("g", {class: "grid"}, c.grid.map(function (g) { return s("line", {x1: g.x1, y1: g.y, x2: g.x2, y2: g.y}); })),
      s("g", {class: "axis y-axis"}, c.y_ticks.map(function (t) { return s("text", {x: t.x, y: t.y, "text-anchor": "end"}, t.label); })),
      s("g", {class: "axis x-axis"}, c.x_ticks.map(function (t) { return s("text", {x: t.x, y: t.y, "text-anchor": t.anchor}, t.label); })),
      s("line", {class: "baseline", x1: c.baseline.x1, y1: c.baseline.y, x2: c.baseline.x2, y2: c.baseline.y})
    ];
  }
  function span(c) { return c.x_ticks.length ? c.x_ticks[0].label + "\u2013" + c.x_ticks[c.x_ticks.length - 1].label + " UTC" : "no data"; }
  function svgBox(c, id, title, desc, extra) {
    return s("svg", {class: "chart-svg" + (extra ? " " + extra : ""), viewBox: "0 0 " + c.width + " " + c.height, role: "img",
      "aria-labelledby": id + "-t " + id + "-d", focusable: "false"},
      s("title", {id: id + "-t"}, title), s("desc", {id: id + "-d"}, desc));
  }
  function figure(kind, caption, note, svg, after) {
    return h("figure", {class: "chart", "data-chart": kind},
      h("figcaption", {}, caption + " ", h("span", {class: "muted"}, note)), svg, after);
  }

  function tenantCharts(t, n) {
    var points = arr(t.activity).map(obj), del = obj(t.delivery_24h), name = visible(t.name), id = "chart-" + n;
    var c = countsChart(points), l = latencyChart(points), r = ratesChart(del.delivered_ratio, del.read_ratio);
    var counts = svgBox(c, id + "-counts", name + ": messages per minute, last hour", span(c) + ": " +
      count(c.totals.inbound) + " inbound, " + count(c.totals.sent) + " sent, " + count(c.totals.failed) +
      " failed; at most " + count(c.peak) + " in one minute.");
    counts.append.apply(counts, svgFrame(c).concat(c.bars.map(function (b) {
      return s("rect", {class: "bar inbound", x: b.x, y: b.y, width: b.width, height: b.height});
    }), c.lines.map(function (ln) { return s("path", {class: "line " + ln.key, d: ln.d}); })));
    var latency = svgBox(l, id + "-latency", name + ": p95 reply latency per minute in milliseconds, last hour", span(l) + ": " +
      (l.minutes_with_replies ? "replies in " + l.minutes_with_replies + " of " + l.minutes + " minutes; the highest p95 was " + ms(l.peak) + " ms." : "no replies."));
    latency.append.apply(latency, svgFrame(l).concat(l.bars.map(function (b) {
      return s("rect", {class: "bar latency", x: b.x, y: b.y, width: b.width, height: b.height});
    })));
    var rates = svgBox(r, id + "-rates", name + ": delivered and read, last 24 hours",
      r.rows.map(function (row) { return row.label + " " + row.value; }).join(", ") + " of " + count(del.sent) + " sent.", "rates");
    r.rows.forEach(function (row) {
      rates.append(
        s("text", {class: "rate-label", x: r.label_x, y: row.text_y, "text-anchor": "end"}, row.label),
        s("rect", {class: "track", x: r.left, y: row.y, width: r.track, height: 18, rx: 3}),
        s("rect", {class: "fill " + row.key, x: r.left, y: row.y, width: row.fill, height: 18, rx: 3}),
        s("text", {class: "rate-value", x: r.value_x, y: row.text_y}, row.value));
    });
    return h("div", {class: "charts", "data-field": "charts"},
      figure("counts", "Messages per minute", "last hour", counts, h("ul", {class: "legend"}, c.legend.map(function (ln) {
        return h("li", {}, h("span", {class: "swatch " + ln.key}), ln.label + " ", h("b", {}, count(ln.total)));
      }))),
      figure("latency", "p95 reply latency per minute", "ms, last hour", latency),
      figure("rates", "Delivered and read", "of messages sent in the last 24 h", rates));
  }

  function campaignRow(c) {
    var counts = obj(c.counts), state = visible(c.state);
    return h("tr", {"data-id": c.id},
      h("td", {class: "time"}, utc(c.created_at)),
      h("td", {}, visible(c.tenant)),
      h("td", {}, h("bdi", {}, visible(c.name) || "\u2014"), c.template ? [" ", h("span", {class: "muted"}, visible(c.template))] : null),
      h("td", {}, h("span", {class: "badge cs-" + state}, state)),
      h("td", {class: "progress-cell"},
        h("progress", {max: isNum(c.total) && c.total ? c.total : 1, value: isNum(c.done) && c.done ? c.done : 0,
          "aria-label": "sent, failed or skipped of all recipients"}), " ",
        h("span", {"data-field": "progress"}, count(c.done) + " of " + count(c.total) + " \u00b7 " + pct(c.progress))),
      h("td", {class: "n", "data-field": "delivered"}, pct(c.delivered_ratio)),
      h("td", {class: "n", "data-field": "read"}, pct(c.read_ratio)),
      h("td", {class: "n"}, count(counts.failed)),
      h("td", {class: "n"}, count(counts.skipped)));
  }

  function card(t, n) {
    var rate = isNum(t.rate_limit) ? t.rate_limit : null;
    var out = t.outbound_per_minute;
    var load = rate && isNum(out) ? Math.min(1, out / (rate * 60)) : null;
    var lat = obj(t.latency_ms), del = obj(t.delivery_24h), paused = t.paused ? obj(t.paused) : null;
    var errors = Object.keys(obj(t.errors_by_code)).map(function (c) { return [c, t.errors_by_code[c]]; })
      .sort(function (a, b) { return (Number(b[1]) || 0) - (Number(a[1]) || 0) || (a[0] < b[0] ? -1 : 1); });
    return h("article", {class: "card" + (paused ? " is-paused" : ""), "data-tenant": String(t.name)},
      h("header", {class: "card-head"},
        h("h3", {}, h("bdi", {}, visible(t.name))),
        t.handler ? h("span", {class: "handler"}, "handler ", h("code", {}, visible(t.handler))) : null,
        paused ? h("span", {class: "badge bad"}, "paused") : h("span", {class: "badge good"}, "sending")),
      paused ? pauseBox(paused) : null,
      h("dl", {class: "stats"},
        stat("Inbound", "inbound", count(t.inbound_per_minute), "/min"),
        stat("Outbound", "outbound", count(out), "/min"),
        stat("Send queue", "queue", count(t.queue)),
        stat("Latency p50/p95", "latency", ms(lat.p50) + " / " + ms(lat.p95), "ms")),
      h("div", {class: "load"},
        h("meter", {min: 0, max: 1, low: 0.6, high: 0.85, optimum: 0, value: load || 0}),
        h("span", {"data-field": "load"}, pct(load) + " of the limit (" + count(rate === null ? null : rate * 60) + "/min)")),
      tenantCharts(t, n),
      h("h4", {}, "Outbox"),
      chips("outbox", orderedStates(obj(t.outbox)).map(function (p) {
        return h("li", {class: "chip st-" + p[0]}, visible(p[0]) + " ", h("b", {}, count(p[1])));
      }), "empty"),
      h("h4", {}, "Errors by Graph code"),
      chips("errors", errors.map(function (e) {
        var name = codeName(e[0]);
        return h("li", {class: "chip err", title: name}, visible(e[0]),
          name ? [" ", h("span", {class: "code-name"}, name)] : null, " ", h("b", {}, "\u00d7" + count(e[1])));
      }), "none"),
      h("p", {class: "delivery", "data-field": "delivery"}, "24 h: delivered ", h("b", {}, pct(del.delivered_ratio)),
        " \u00b7 read ", h("b", {}, pct(del.read_ratio)), " of " + count(del.sent) + " sent"));
  }

  function rows(tbody, items, columns, makeRow, empty) {
    var el = document.getElementById(tbody);
    if (!el) return;
    el.replaceChildren.apply(el, items.length ? items.map(makeRow)
      : [h("tr", {class: "empty"}, h("td", {colspan: columns}, empty))]);
  }

  function failureRow(f) {
    return h("tr", {"data-id": f.id},
      h("td", {class: "time"}, utc(f.at)),
      h("td", {}, visible(f.tenant)),
      h("td", {class: "phone"}, visible(f.from)),
      h("td", {}, h("bdi", {}, visible(f.name))),
      h("td", {class: "text"}, h("bdi", {}, visible(f.text))),
      h("td", {class: "error"}, h("bdi", {}, visible(f.error))));
  }

  function deadRow(d) {
    return h("tr", {"data-id": d.id},
      h("td", {class: "time"}, utc(d.created_at)),
      h("td", {}, visible(d.tenant)),
      h("td", {class: "phone"}, visible(d.to)),
      h("td", {}, visible(d.type)),
      h("td", {class: "n"}, count(d.attempts)),
      h("td", {class: "error"}, h("span", {class: "code", title: codeName(d.error_code)}, visible(d.error_code)), " ",
        h("bdi", {}, visible(d.error_message))),
      h("td", {}, d.id ? h("button", {type: "button", class: "retry", "data-retry": d.id}, "Retry") : null));
  }

  function attentionRow(a) {
    return h("tr", {class: "attention", "data-field": a.field},
      h("td", {class: "time"}, utc(isNum(a.time) ? a.time : a.received_at)),
      h("td", {}, a.tenant ? visible(a.tenant) : "account (no number)"),
      h("td", {class: "kind"}, h("strong", {}, visible(a.kind))),
      h("td", {class: "detail"}, h("bdi", {}, visible(a.detail)),
        a.waba_id ? [" ", h("span", {class: "muted"}, "WABA " + visible(a.waba_id))] : null));
  }

  function showView(detailed) {
    var note = document.getElementById("open-note");
    if (note) note.hidden = detailed;
    var state = document.getElementById("token-state");
    if (!state) return;
    if (!token()) { state.textContent = ""; state.className = "muted"; return; }
    state.textContent = detailed ? "accepted: detailed view" : "not accepted: open view only";
    state.className = detailed ? "good" : "bad";
  }

  function counters(data) {
    var el = document.getElementById("counters");
    if (!el) return;
    el.replaceChildren.apply(el, ["dispatcher", "sender", "orchestrator"].map(function (group) {
      var values = obj(data[group]), keys = Object.keys(values).sort();
      return h("table", {class: "list"}, h("caption", {}, group), h("tbody", {}, keys.length
        ? keys.map(function (k) { return h("tr", {}, h("th", {}, visible(k)), h("td", {class: "n"}, count(values[k]))); })
        : h("tr", {class: "empty"}, h("td", {colspan: 2}, "none yet"))));
    }));
  }

  function nodesText(nodes) {
    var live = nodes.filter(function (n) { return n.alive === true; });
    var gone = nodes.length - live.length;
    return live.length + " alive" + (live.length ? ": " + live.map(function (n) { return visible(n.role); }).join(", ") : "")
      + (gone ? " \u00b7 " + gone + " gone" : "");
  }

  function render(data) {
    var ok = data.status === "ok", mode = String(data.mode || "unknown"), q = obj(data.queues);
    detailedView = data.view === "detailed";
    var health = document.getElementById("health");
    if (health) { health.textContent = ok ? "ok" : String(data.status || "unavailable"); health.className = "badge " + (ok ? "good" : data.status === "draining" ? "warn" : "bad"); }
    var modeEl = document.getElementById("mode");
    if (modeEl) { modeEl.textContent = mode; modeEl.className = "badge mode-" + mode; }
    var draining = document.getElementById("draining");
    if (draining) draining.hidden = !data.draining;
    var redis = document.getElementById("redis"), shared = obj(data.redis).status;
    if (redis) {
      redis.hidden = !shared;
      var fine = shared === "ok";
      redis.textContent = "redis " + (shared ? (fine ? "ok" : "degraded") : "");
      redis.className = "badge " + (fine ? "good" : "warn");
    }
    text("version", String(data.version || "?"));
    text("uptime", duration(data.uptime_seconds));
    text("q-dispatch", count(q.dispatch) + " / " + count(q.dispatch_size));
    text("q-send", count(q.send));
    text("nodes", nodesText(arr(data.nodes).map(obj)));
    var tenants = document.getElementById("tenants");
    if (tenants) tenants.replaceChildren.apply(tenants, arr(data.tenants).map(function (t, i) { return card(obj(t), i + 1); }));
    rows("campaigns", arr(data.campaigns).map(obj), 9, campaignRow, "No campaign under way.");
    rows("attention", arr(data.attention).map(obj), 4, attentionRow, "Nothing needs attention.");
    rows("failures", arr(data.recent_failures).map(obj), 6, failureRow, "No failures.");
    rows("dead", arr(data.dead_letters).map(obj), 7, deadRow, "No dead letters.");
    counters(data);
    showView(detailedView);
    syncButtons();
    text("updated", "updated " + utc(Date.now() / 1000));
  }

  // ------------------------------------------------------------------ polling

  var pollSeq = 0;

  function poll() {
    clearTimeout(timer);
    var seq = ++pollSeq;
    // The token (if any) asks for the detailed view; header auth, no cookies (see the top).
    var headers = token() ? {"Authorization": "Bearer " + token()} : {};
    // /status.json answers 503 with the same JSON while unavailable: draw it either way.
    return fetch("/status.json", {cache: "no-store", credentials: "omit", headers: headers})
      .then(function (r) { return r.json(); })
      .then(function (data) {
        if (seq !== pollSeq) return;  // an older answer (e.g. from before the token changed)
        lastOk = Date.now();
        render(obj(data));
      })
      .catch(function () { /* shown by the stale badge below */ })
      .then(function () {
        var stale = document.getElementById("stale");
        if (stale) stale.hidden = Date.now() - lastOk < STALE_AFTER_MS;
        if (!document.hidden) timer = setTimeout(poll, pollMs);
      });
  }

  // ------------------------------------------------------------------ operator actions

  var tokenInput = document.getElementById("api-token");
  function token() { return tokenInput ? tokenInput.value.trim() : ""; }

  function syncButtons() {
    var has = token() !== "";
    document.querySelectorAll("[data-retry]").forEach(function (b) {
      if (!b.dataset.busy) b.disabled = !has;
      b.title = has ? "" : "enter the API token first";
    });
    var all = document.getElementById("retry-all");
    if (all) all.disabled = !has || !document.querySelector("#dead [data-retry]");
  }

  function say(message, bad) {
    var el = document.getElementById("action-result");
    if (!el) return;
    el.textContent = message;
    el.className = bad ? "bad" : "good";
  }

  function retry(body, button) {
    if (button) { button.dataset.busy = "1"; button.disabled = true; button.textContent = "Retrying\u2026"; }
    // Header auth, no cookies: see the CSRF note at the top of this file.
    return fetch("/api/dead-letters/retry", {
      method: "POST",
      credentials: "omit",
      cache: "no-store",
      headers: {"Authorization": "Bearer " + token(), "Content-Type": "application/json"},
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        if (r.status === 401) say("Refused: wrong or missing API token.", true);
        else if (!r.ok) say("Retry failed: " + visible(j.error || ("HTTP " + r.status)), true);
        else say("Queued again: " + count(j.retried) + " message(s).", false);
      });
    }).catch(function () {
      say("Retry failed: the server did not answer.", true);
    }).then(function () {
      if (button) { delete button.dataset.busy; button.textContent = "Retry"; }
      return poll();
    });
  }

  var typing = null;
  if (tokenInput) {
    try { tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { /* storage off */ }
    tokenInput.addEventListener("input", function () {
      try {
        if (token()) sessionStorage.setItem(TOKEN_KEY, token()); else sessionStorage.removeItem(TOKEN_KEY);
      } catch (e) { /* storage off: the field still works for this page */ }
      syncButtons();
      clearTimeout(typing);
      typing = setTimeout(poll, 300);  // fetch the view this token allows once typing pauses
    });
  }
  var forget = document.getElementById("forget-token");
  if (forget) forget.addEventListener("click", function () {
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* storage off */ }
    if (tokenInput) tokenInput.value = "";
    syncButtons();
    poll();  // back to the open view at once
  });
  var dead = document.getElementById("dead");
  if (dead) dead.addEventListener("click", function (ev) {
    var b = ev.target instanceof Element ? ev.target.closest("[data-retry]") : null;
    if (b && !b.disabled) retry({ids: [b.dataset.retry]}, b);
  });
  var all = document.getElementById("retry-all");
  if (all) all.addEventListener("click", function () {
    if (window.confirm("Queue every dead letter again?")) retry({all: true}, null);
  });
  document.addEventListener("visibilitychange", function () { if (!document.hidden) poll(); });

  syncButtons();
  poll();
})();
