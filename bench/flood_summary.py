#!/usr/bin/env python3
"""Summarize a bench/flood.sh run.

usage: flood_summary.py summary RAW_DIR RESULTS_DIR   (prints markdown; writes RESULTS_DIR/results.json)
       flood_summary.py client CLIENT_JSON           (one progress line)
"""
import json
import os
import sys

MODE_NAMES = {"nftdnat": "kernel nftables DNAT", "natbox": "natbox"}


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def host_busy_cores(path):
    """Busy cores of the whole host between two /proc/stat 'cpu' lines."""
    lines = (read(path) or "").splitlines()
    if len(lines) < 2:
        return None
    a, b = ([int(x) for x in l.split()[1:]] for l in lines[:2])
    d = [y - x for x, y in zip(a, b)]
    total = sum(d[:8])
    idle = d[3] + d[4]
    return (total - idle) / total * (os.cpu_count() or 1) if total > 0 else None


def phase(d):
    """Everything one phase directory holds."""
    if not os.path.isdir(d):
        return None
    p = {
        "client": load(os.path.join(d, "client.json")),
        "flood": load(os.path.join(d, "flood.json")),
        "watch": load(os.path.join(d, "watch.json")),
        "host_busy_cores": host_busy_cores(os.path.join(d, "hostcpu.txt")),
    }
    for name in ("held", "conntrack"):
        v = read(os.path.join(d, name + ".txt"))
        if v not in (None, ""):
            try:
                p[name] = float(v) if "." in v else int(v)
            except ValueError:
                p[name] = v
    st = load(os.path.join(d, "status.json"))
    if isinstance(st, dict):
        # the figures a flood moves; the whole `natbox status --json` stays in the raw directory
        p["natbox_status"] = {
            "tun": st.get("tun"), "budget_hits": st.get("budget_hits"), "inflight_dials": st.get("inflight_dials"),
            "mappings": [{k: m.get(k) for k in ("name", "hits", "sessions_opened", "sessions_active", "refusals")}
                         for m in st.get("mappings") or []],
        }
    return p


def collect(raw):
    out = {}
    base = os.path.join(raw, "raw")
    modes = os.listdir(base) if os.path.isdir(base) else []
    order = list(MODE_NAMES)  # the kernel first, as the tables read
    for mode in sorted(modes, key=lambda m: (order.index(m) if m in order else len(order), m)):
        m = {}
        md = os.path.join(base, mode)
        for g in ("syn", "unmapped", "udp"):
            gd = os.path.join(md, g)
            if not os.path.isdir(gd):
                continue
            bg = read(os.path.join(gd, "bg.txt"))
            m.setdefault("bg_busy_cores", {})[g] = float(bg) if bg else None
            if g == "syn":
                m["baseline"] = phase(os.path.join(gd, "baseline"))
                m["syn_mapped"] = phase(os.path.join(gd, "flood"))
            else:
                m["syn_unmapped" if g == "unmapped" else "udp"] = phase(gd)
        out[mode] = m
    return out


def g(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def f(v, nd=0, unit=""):
    return "n/a" if v is None else "%.*f%s" % (nd, v, unit)


def tcp_cell(p):
    t = g(p, "client", "tcp")
    if not t:
        return "n/a"
    cell = "%d/%d" % (t["ok"], t["attempts"])
    if t["ok"]:
        cell += ", p50 %s p99 %s ms" % (f(t["connect_p50_ms"], 1), f(t["connect_p99_ms"], 1))
    return cell


def gap_cell(p):
    return f(g(p, "client", "tcp", "max_gap_ms"), 0, " ms")


def errs(p):
    e = g(p, "client", "tcp", "errors") or {}
    return ", ".join("%s %d" % kv for kv in sorted(e.items())) or "-"


def sent_cell(p):
    fl = g(p, "flood")
    if not fl:
        return "n/a"
    return "%d in %.2f s (%.0f/s)" % (fl["sent"], fl["elapsed_s"], fl["rate_achieved_pps"])


def mib(kb):
    return None if kb is None else kb / 1024


def natbox_counters(st):
    """The few `natbox status` figures a flood moves; tolerant of fields it does not know."""
    if not isinstance(st, dict):
        return None
    tun = st.get("tun") or {}
    refusals, opened = {}, 0
    for m in st.get("mappings") or []:
        opened += m.get("sessions_opened") or 0
        for k, v in (m.get("refusals") or {}).items():
            if isinstance(v, int) and v:
                refusals[k] = refusals.get(k, 0) + v
    hits = st.get("budget_hits") or {}
    return {
        "tun_in": tun.get("packets_in", "n/a"),
        "tun_dropped": tun.get("dropped_in", "n/a"),
        "opened": opened,
        "refusals": ", ".join("%s %d" % kv for kv in sorted(refusals.items())) or "-",
        "budget_hits": ", ".join("%s %s" % kv for kv in sorted(hits.items())) if isinstance(hits, dict) and hits else "-",
    }


def client_line(path):
    c = load(path)
    if not c:
        return "no result (%s)" % path
    parts = []
    t = c.get("tcp")
    if t:
        parts.append("TCP %d/%d ok, connect p50 %s p99 %s ms, longest gap %s ms, slowest answer %s ms%s" % (
            t["ok"], t["attempts"], f(t["connect_p50_ms"], 1), f(t["connect_p99_ms"], 1),
            f(t["max_gap_ms"]), f(t.get("answer_max_ms"), 1), (", errors: " + errs({"client": c})) if t.get("errors") else ""))
    u = c.get("udp")
    if u:
        parts.append("UDP replies: existing session %d/%d, fresh sessions %d/%d" % (
            u["existing_replies"], u["existing_sent"], u["fresh_replies"], u["fresh_sent"]))
    return "; ".join(parts)


def summary(raw, results):
    data = collect(raw)
    env = read(os.path.join(raw, "env.txt")) or ""
    params = next((l[len("# flood: "):] for l in env.splitlines() if l.startswith("# flood: ")), "")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "results.json"), "w") as fh:
        json.dump({"params": params, "modes": data}, fh, indent=1, sort_keys=True)

    lines = ["# Floods: run %s" % os.path.basename(os.path.normpath(raw)), "", "Parameters: %s" % params, ""]
    lines += [
        "| gateway | baseline: real TCP to B | SYN flood to A: sent | real TCP to B during it | longest gap | "
        "held by A's target after | SYN flood to unmapped: real TCP to B | longest gap | "
        "UDP flood: sent | TCP to B during it | UDP replies, session from before / new |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in data.items():
        u = g(m, "udp", "client", "udp")
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            MODE_NAMES.get(mode, mode), tcp_cell(m.get("baseline")),
            sent_cell(m.get("syn_mapped")), tcp_cell(m.get("syn_mapped")), gap_cell(m.get("syn_mapped")),
            f(g(m, "syn_mapped", "held")),
            tcp_cell(m.get("syn_unmapped")), gap_cell(m.get("syn_unmapped")),
            sent_cell(m.get("udp")), tcp_cell(m.get("udp")),
            "%d/%d / %d/%d" % (u["existing_replies"], u["existing_sent"], u["fresh_replies"], u["fresh_sent"]) if u else "n/a",
        ))
    lines += ["", "Failed real connections by kind (refused = RST, timeout = no answer within the client's timeout), "
              "and the longest any real connection waited for the gateway's first answer, SYN-ACK or RST "
              "(a refusal is answered; a stalled gateway is not):", ""]
    lines += ["| gateway | phase | errors | slowest answer |", "|---|---|---|---|"]
    for mode, m in data.items():
        for ph in ("baseline", "syn_mapped", "syn_unmapped", "udp"):
            if m.get(ph):
                lines.append("| %s | %s | %s | %s |" % (MODE_NAMES.get(mode, mode), ph, errs(m[ph]),
                                                     f(g(m[ph], "client", "tcp", "answer_max_ms"), 1, " ms")))
    lines += ["", "Cost per phase (natbox: its process, sampled every 100 ms from the phase's start to its end, "
              "for the SYN flood to A that includes the wait before counting; host busy cores: the whole machine, "
              "other tenants and the generator included, over the flood; conntrack: the gateway namespace's "
              "entries after the phase):", ""]
    lines += ["| gateway | phase | natbox RSS start -> peak MiB | natbox VmHWM MiB | natbox CPU s / wall s | "
              "watch's longest sampling gap | host busy cores | conntrack entries |", "|---|---|---|---|---|---|---|---|"]
    for mode, m in data.items():
        for ph in ("baseline", "syn_mapped", "syn_unmapped", "udp"):
            p = m.get(ph)
            if not p:
                continue
            w = p.get("watch")
            lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                MODE_NAMES.get(mode, mode), ph,
                "%s -> %s" % (f(mib(w["rss_start_kb"]), 1), f(mib(w["rss_peak_kb"]), 1)) if w else "n/a",
                f(mib(g(w, "vmhwm_kb")), 1),
                "%s / %s" % (f(w["cpu_s"], 2), f(w["wall_s"], 1)) if w else "n/a", f(g(w, "max_sample_gap_ms"), 0, " ms"),
                f(p.get("host_busy_cores"), 2), f(p.get("conntrack")) if isinstance(p.get("conntrack"), int) else "n/a",
            ))
    rows = []
    for mode, m in data.items():
        for ph in ("syn_mapped", "syn_unmapped", "udp"):
            c = natbox_counters(g(m, ph, "natbox_status"))
            if c:
                rows.append("| %s | %s | %s | %s | %s | %s |" % (ph, c["tun_in"], c["tun_dropped"], c["opened"],
                                                               c["refusals"], c["budget_hits"]))
    if rows:
        lines += ["", "natbox's own counters at the end of each phase (`natbox status`; since natbox started, "
                  "so the SYN-to-A row includes the baseline):", ""]
        lines += ["| phase | TUN packets in | dropped before natbox read them | sessions opened | refusals | budget hits |",
                  "|---|---|---|---|---|---|"] + rows
    bgs = ["%s %s" % (MODE_NAMES.get(mo, mo), "/".join(f(v, 2) for v in (m.get("bg_busy_cores") or {}).values()))
           for mo, m in data.items()]
    lines += ["", "Other tenants' load, busy cores of %d over 1 s before each group (%s): %s" % (
        os.cpu_count() or 0, "/".join(next(iter(data.values()), {}).get("bg_busy_cores", {}).keys()), "; ".join(bgs))]
    print("\n".join(lines))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "client":
        print(client_line(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "summary":
        summary(sys.argv[2], sys.argv[3])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
