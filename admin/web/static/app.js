// natbox status page: polls /status every 2 s and updates the numbers and
// charts in place. Without this script the page is a static snapshot.
"use strict";
(function () {
  const every = 2000, keep = 150, w = 150, h = 24;

  function bytes(n) {
    const u = "KMGTPE";
    if (n < 1024) return n + " B";
    let e = -1;
    do { n /= 1024; e++; } while (n >= 1024 && e < u.length - 1);
    return n.toFixed(1) + " " + u[e] + "iB";
  }
  function ago(t, now) {
    if (!t) return "never";
    let s = Math.max(0, (now - Date.parse(t)) / 1000);
    if (s < 60) return Math.floor(s) + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    if (s < 172800) return Math.floor(s / 3600) + "h ago";
    return Math.floor(s / 86400) + "d ago";
  }
  function show(el, v, now) {
    const f = el.dataset.fmt;
    el.textContent = f === "bytes" ? bytes(v || 0) : f === "ago" ? ago(v, now) : (v === undefined ? "" : String(v));
  }
  function get(obj, path) {
    return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
  }
  function refusals(el, m) {
    el.textContent = "";
    const keys = Object.keys(m || {}).filter((k) => m[k] > 0).sort();
    if (!keys.length) {
      const s = document.createElement("span");
      s.className = "none"; s.textContent = "none"; el.append(s);
    }
    for (const k of keys) {
      const s = document.createElement("span"), b = document.createElement("b");
      s.className = "refusal"; s.dataset.reason = k; b.textContent = m[k];
      s.append(k + " ", b); el.append(s, " ");
    }
  }
  function draw(line, hist, top) {
    const x0 = w - (hist.length - 1) * w / (keep - 1);
    line.setAttribute("points", hist.map((r, i) =>
      (x0 + i * w / (keep - 1)).toFixed(1) + "," + (h - 1 - r / top * (h - 2)).toFixed(1)).join(" "));
  }

  // The charts continue the server's history.
  const hist = new Map(), prev = new Map();
  for (const row of document.querySelectorAll("tr[data-mapping]")) {
    const ls = row.querySelectorAll(".spark polyline");
    const parse = (l) => (l.dataset.hist ? l.dataset.hist.split(" ").map(Number) : []);
    hist.set(row.dataset.mapping, { row, lin: ls[0], lout: ls[1], in: parse(ls[0]), out: parse(ls[1]) });
  }

  function update(st) {
    const now = Date.parse(st.time);
    for (const m of st.mappings || []) {
      const hs = hist.get(m.name);
      if (!hs) continue;
      const row = hs.row;
      row.className = "state-" + m.state;
      for (const el of row.querySelectorAll("[data-k]")) {
        const k = el.dataset.k;
        if (k === "refusals") refusals(el, m.refusals);
        else if (k !== "rate_in" && k !== "rate_out") show(el, m[k], now);
      }
      const p = prev.get(m.name);
      if (p && now > p.t) {
        const dt = (now - p.t) / 1000;
        const ri = Math.max(0, m.bytes_in - p.in) / dt, ro = Math.max(0, m.bytes_out - p.out) / dt;
        hs.in.push(ri); hs.out.push(ro);
        if (hs.in.length > keep - 1) { hs.in.shift(); hs.out.shift(); }
        const top = Math.max(1, ...hs.in, ...hs.out); // one scale for both ways
        draw(hs.lin, hs.in, top); draw(hs.lout, hs.out, top);
        row.querySelector('[data-k="rate_in"]').textContent = bytes(Math.round(ri)) + "/s";
        row.querySelector('[data-k="rate_out"]').textContent = bytes(Math.round(ro)) + "/s";
      }
      prev.set(m.name, { t: now, in: m.bytes_in, out: m.bytes_out });
    }
    const peers = new Map(((st.relay || {}).peers || []).map((p) => [p.name, p]));
    for (const row of document.querySelectorAll("tr[data-peer]")) {
      const p = peers.get(row.dataset.peer);
      if (p) for (const el of row.querySelectorAll("[data-k]")) show(el, p[el.dataset.k], now);
    }
    for (const el of document.querySelectorAll("[data-path]")) {
      if (el.dataset.k === "refusals") refusals(el, get(st, el.dataset.path));
      else show(el, get(st, el.dataset.path), now);
    }
    const u = document.getElementById("updated");
    u.textContent = "as of " + new Date(now).toLocaleTimeString();
    u.dataset.time = st.time;
  }

  async function poll() {
    try {
      const r = await fetch("/status", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { location.reload(); return; }
      if (r.ok) update(await r.json());
    } catch (e) {
      document.getElementById("updated").textContent = "natbox not answering";
    }
    setTimeout(poll, every);
  }
  setTimeout(poll, 0);
})();
