#!/usr/bin/env python3
"""Summarize a bench/run.sh (gateway) or bench/relay.sh (relay) run: medians over repetitions,
same-run ratios, and the issues' targets marked met / not met.

usage: summarize.py gateway|relay RUN_DIR   (prints markdown; writes RUN_DIR/summary.json)

Parsing of the per-test files (iperf3 / pmbench JSON, .meta CPU snapshots) is the shared
harness's (../shared/bench/summarize.py), imported rather than copied.
"""
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("SHARED_BENCH") or os.path.join(HERE, "..", "..", "shared", "bench")
_spec = importlib.util.spec_from_file_location("shared_summarize", os.path.join(SHARED, "summarize.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)
load, metric, med = base.load, base.metric, base.med

TESTS = ("tcp1", "tcp4", "tcpR", "udp", "crr", "rr")


def reps_of(run, mode):
    d = os.path.join(run, "raw", mode)
    return [os.path.join(d, r) for r in sorted(os.listdir(d))] if os.path.isdir(d) else []


def sub(v, key):
    return v.get(key) if isinstance(v, dict) else None


def fmt(v, nd=0):
    return "n/a" if v is None else ("%.*f" % (nd, v))


def ratio(v, b):
    return " [%.2f]" % (v / b) if v is not None and b else ""


def bg_line(run, modes):
    """Other tenants' load: busy cores in the 1 s before each test (shared harness probe)."""
    parts = []
    for m in modes:
        vals = []
        for d in reps_of(run, m):
            for t in TESTS:
                meta = load(os.path.join(d, t + ".meta"))
                if meta and meta.get("bg_busy_cores") is not None:
                    vals.append(meta["bg_busy_cores"])
        if vals:
            parts.append("%s %.2f/%.2f" % (m, med(vals), max(vals)))
    return "Other tenants' load, busy cores (of %d) in the 1 s before each test, median/max: %s" % (
        os.cpu_count() or 0, ", ".join(parts) or "n/a")


def line_drops_line(run, modes):
    """Frames the WAN line (bench/wanbridge) lost without being asked to, per repetition: the
    kernel's drops at its sockets, its full queue and failed writes. Random loss (-loss) is not
    counted: it is the line's setting. None when the run had no line."""
    parts = []
    for m in modes:
        vals = []
        for d in reps_of(run, m):
            try:
                with open(os.path.join(d, "wanbridge.log")) as f:
                    last = [ln for ln in f.read().splitlines() if ln.startswith("{")][-1]
                c = json.loads(last)
            except (OSError, IndexError, ValueError):
                continue
            vals.append(sum(v.get(k, 0) for v in c.values() if isinstance(v, dict)
                            for k in ("rx_dropped", "queue_full", "write_errors")))
        if vals:
            parts.append("%s %s" % (m, " / ".join(str(v) for v in vals)))
    if not parts:
        return None
    return "Frames the WAN line lost unasked (kernel drops at the bridge, full queue, write errors; should be 0), per repetition: " + ", ".join(parts)


def iperf_bytes(j):
    try:
        return j["end"]["sum_received"]["bytes"]
    except (KeyError, TypeError):
        return None


def udp_cpu_per_datagram(d):
    """The gateway process's CPU (us) per datagram the UDP test's client sent through it."""
    meta, j = load(os.path.join(d, "udp.meta")), load(os.path.join(d, "udp.json"))
    try:
        sent = j["end"]["sum"]["packets"]
        ticks = float(meta["after"].split()[-2]) - float(meta["before"].split()[-2])
        return ticks / meta.get("clk_tck", 100) * 1e6 / sent if sent else None
    except (KeyError, TypeError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------ gateway
GW_MODES = ["direct", "nftdnat", "haproxy", "socat", "natbox"]
# The figures both harnesses report, in this order, before each one's own columns:
# (name, getter, decimals, ratio to the baseline mode?).
def common_figs(udp_label, udp_ratio):
    return [
        ("TCP 1 flow Gbit/s", lambda r: r["tcp1"], 2, True),
        ("TCP -P4 Gbit/s", lambda r: r["tcp4"], 2, True),
        ("TCP -R Gbit/s", lambda r: r["tcpR"], 2, True),
        ("conn/s (64 wkr)", lambda r: sub(r["crr"], "cps"), 0, True),
        ("crr errors", lambda r: r["crr_errors"], 0, False),
        (udp_label, lambda r: sub(r["udp"], "rx_mbps"), 0, udp_ratio),
        ("UDP loss %", lambda r: sub(r["udp"], "loss_pct"), 1, False),
        ("RTT p50 us", lambda r: sub(r["rr"], "p50"), 0, True),
        ("RTT p99 us", lambda r: sub(r["rr"], "p99"), 0, True),
    ]


def summarize_figs(rows, figs):
    """Median and per-repetition values of every figure, per mode."""
    return {m: {n: {"median": med([g(r) for r in reps]), "reps": [g(r) for r in reps]}
                for n, g, _, _ in figs} for m, reps in rows.items()}


def medians_table(rows, figs, summary, labels, base, no_ratio):
    """The medians table; ratio figures get [x] against mode base, except for no_ratio modes."""
    out = ["| mode | " + " | ".join(f[0] for f in figs) + " |", "|---" * (len(figs) + 1) + "|"]
    b = summary.get(base, {})
    for m in rows:
        cells = [labels.get(m, m)]
        for n, _, nd, rt in figs:
            v = summary[m][n]["median"]
            cells.append(fmt(v, nd) + (ratio(v, b.get(n, {}).get("median")) if rt and m not in no_ratio else ""))
        out.append("| " + " | ".join(cells) + " |")
    return out


def per_rep_table(rows, figs, summary):
    out = ["\nPer-repetition values:\n", "| mode | figure | values |", "|---|---|---|"]
    for m in rows:
        for n, _, nd, _ in figs:
            out.append("| %s | %s | %s |" % (m, n, ", ".join(fmt(v, nd) for v in summary[m][n]["reps"])))
    return out


GW_LABEL = {"direct": "direct routing", "nftdnat": "nftables DNAT", "haproxy": "haproxy tcp",
            "socat": "socat", "natbox": "**natbox**"}


def gateway(run):
    rows = {}
    for m in GW_MODES:
        reps = []
        for d in reps_of(run, m):
            r = {t: metric(t, load(os.path.join(d, t + ".json"))) for t in TESTS}
            crr = load(os.path.join(d, "crr.json")) or {}
            r["crr_conns"], r["crr_errors"] = crr.get("conns"), crr.get("errors")
            for t in ("tcp1", "crr"):
                gw, _, _ = base.cpu_from_meta(load(os.path.join(d, t + ".meta")))
                r[t + "_cpu"] = None if m in ("direct", "nftdnat") else gw
            mem = load(os.path.join(d, "mem.json"))
            r["mem"] = None
            if mem and m not in ("direct", "nftdnat"):
                r["mem"] = (mem["peak_tree_pss_kb"] if m == "socat" else mem["sum_root_vmhwm_kb"]) / 1024
            r["eff"] = r["tcp1"] / (r["tcp1_cpu"] / 100) if r["tcp1"] and r["tcp1_cpu"] else None
            r["udp_us"] = None if m in ("direct", "nftdnat") else udp_cpu_per_datagram(d)
            reps.append(r)
        if reps:
            rows[m] = reps

    figs = common_figs("UDP rx Mbit/s @1G", True) + [
        ("gw CPU % (1 flow)", lambda r: r["tcp1_cpu"], 0, False),
        ("gw CPU % (conn/s)", lambda r: r["crr_cpu"], 0, False),
        ("gw peak RSS MiB", lambda r: r["mem"], 0, False),
        ("Gbit/s per gw core", lambda r: r["eff"], 2, False),
        ("gw CPU us per datagram (UDP)", lambda r: r["udp_us"], 1, False),
    ]
    summary = summarize_figs(rows, figs)
    nreps = max((len(v) for v in rows.values()), default=0)
    out = ["Medians of %d repetitions; [ratio] to nftables DNAT measured in the same run.\n" % nreps]
    out += medians_table(rows, figs, summary, GW_LABEL, "nftdnat", ("nftdnat",))
    dn = summary.get("nftdnat", {})

    idle = load(os.path.join(run, "raw-extra", "idle", "idle.json"))
    out.append("")
    out.append(bg_line(run, rows))
    out.append("")
    if idle:
        out.append("Idle TCP sessions through natbox: %d/%d open (%d errors) in %.1f s; natbox RSS %.1f MiB before, "
                   "%.1f MiB held, %.1f MiB after closing -> **%.1f KiB per session**." % (
                       idle["open"], idle["requested"], idle["errors"], idle["open_s"], idle["rss_before_kb"] / 1024,
                       idle["rss_held_kb"] / 1024, idle["rss_after_close_kb"] / 1024, idle["kib_per_session"]))
    else:
        out.append("Idle TCP sessions: not measured (no raw-extra/idle/idle.json).")
    udprr = load(os.path.join(run, "raw-extra", "udprr", "udprr.json"))
    if udprr and udprr.get("samples"):
        cpu = load(os.path.join(run, "raw-extra", "udprr", "cpu.json")) or {}
        per = ""
        if cpu.get("clk_tck"):
            per = "; natbox CPU %.1f us per round trip" % (cpu["natbox_cpu_ticks"] * 1e6 / cpu["clk_tck"] / udprr["samples"])
        out.append("")
        out.append("UDP round trip through natbox (64 bytes, %d round trips, %d lost): p50 %.0f us, p99 %.0f us%s." % (
            udprr["samples"], udprr.get("errors", 0), udprr["p50_us"], udprr["p99_us"], per))

    out += per_rep_table(rows, figs, summary)

    # targets (issue 2), natbox vs nftables DNAT in this run
    t = []
    nb = summary.get("natbox")
    if nb and dn:
        def m_(n, s=summary["natbox"]):
            return s[n]["median"]

        def d_(n):
            return dn[n]["median"]

        def check(name, ok, fig):
            t.append("| %s | %s | %s |" % (name, fig, "n/a" if ok is None else ("met" if ok else "**not met**")))

        def safe(f):
            try:
                return f()
            except TypeError:
                return None
        v, b = m_("TCP 1 flow Gbit/s"), d_("TCP 1 flow Gbit/s")
        check("single-flow TCP >= 0.5x DNAT", safe(lambda: v >= 0.5 * b), "%s vs %s Gbit/s = %s" % (fmt(v, 2), fmt(b, 2), safe(lambda: "%.2fx" % (v / b))))
        v, b = m_("conn/s (64 wkr)"), d_("conn/s (64 wkr)")
        conns = sum(r["crr_conns"] or 0 for r in rows["natbox"])
        errs = sum(r["crr_errors"] or 0 for r in rows["natbox"])
        check("conn/s >= 0.5x DNAT", safe(lambda: v >= 0.5 * b), "%s vs %s = %s" % (fmt(v), fmt(b), safe(lambda: "%.2fx" % (v / b))))
        churn = load(os.path.join(run, "raw-extra", "churn", "churn.json"))
        if churn:
            conns, errs = churn["conns"], churn["errors"]
            where = "in the churn step (%.0f conn/s, %.0f s)" % (churn["cps"], churn["duration_s"])
        else:
            where = "over all reps"
        check("zero failed connections (100k)", errs == 0 if conns >= 100000 else (False if errs else None),
              "%d errors in %d connections %s%s" % (errs, conns, where, "" if conns >= 100000 else " (< 100k: not the full check)"))
        v, b = m_("UDP rx Mbit/s @1G"), d_("UDP rx Mbit/s @1G")
        check("UDP delivered >= 0.8x DNAT @1G", safe(lambda: v >= 0.8 * b), "%s vs %s Mbit/s = %s" % (fmt(v), fmt(b), safe(lambda: "%.2fx" % (v / b))))
        v, b = m_("RTT p50 us"), d_("RTT p50 us")
        check("p50 latency <= DNAT + 100 us", safe(lambda: v <= b + 100), "%s vs %s us (+%s)" % (fmt(v), fmt(b), safe(lambda: "%.0f" % (v - b))))
        k = idle["kib_per_session"] if idle else None
        check("<= 64 KiB per idle TCP session", None if k is None else k <= 64, "%s KiB at %s sessions" % (fmt(k, 1), idle["open"] if idle else "n/a"))
    out.append("\nTargets (issue 2), natbox vs nftables DNAT in this run:\n")
    out.append("| target | figure | status |")
    out.append("|---|---|---|")
    out.extend(t or ["| all | natbox not measured | n/a |"])
    print("\n".join(out))
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump({"modes": summary, "idle": idle}, f, indent=1)


# ------------------------------------------------------------------ relay
RL_MODES = ["loopback", "natbox", "natbox-tcp", "natbox-auto", "frp", "frp-nomux", "ssh"]
RL_LABEL = {"loopback": "plain loopback", "natbox": "**natbox relay**", "natbox-tcp": "natbox relay, TCP/443 (TLS)",
            "natbox-auto": "natbox relay, transport auto",
            "frp": "frp (tcpMux, TLS)",
            "frp-nomux": "frp, tcpMux = false", "ssh": "ssh -R"}


def side_cpu(meta):
    """-> (relay_cpu_s, app_cpu_s, wall_s) from a relay.sh .meta (procstat, relay, app, time)."""
    if not meta:
        return None, None, None
    b = [float(x) for x in meta["before"].split()]
    a = [float(x) for x in meta["after"].split()]
    clk = meta.get("clk_tck", 100)
    return (a[-3] - b[-3]) / clk, (a[-2] - b[-2]) / clk, a[-1] - b[-1]


def host_idle_pct(meta):
    """-> the share of the host's CPU time left idle during a test (%), from a .meta's /proc/stat
    line (user nice system idle ...): where it is near 0 the test was bound by the host's CPUs, so
    its throughput is set by CPU per byte, not by a window or a wait."""
    if not meta:
        return None
    b = [float(x) for x in meta["before"].split()]
    a = [float(x) for x in meta["after"].split()]
    d = [a[i] - b[i] for i in range(8)]  # user nice system idle iowait irq softirq steal
    return 100 * d[3] / sum(d) if sum(d) > 0 else None


def cores_per_gbit(d, test, gbit):
    """-> both sides' cores per Gbit/s during an iperf3 test, None without sides or throughput."""
    rc, ac, wall = side_cpu(load(os.path.join(d, test + ".meta")))
    if rc is None or ac is None or not wall or not gbit:
        return None
    return ((rc + ac) / wall) / gbit


def cpu_us_per_op(d, test, count_key):
    """-> both sides' CPU microseconds per operation of test (crr: per connection, rr: per round
    trip) from its .meta and pmbench JSON; None where either is missing (loopback has no sides)."""
    rc, ac, _ = side_cpu(load(os.path.join(d, test + ".meta")))
    n = (load(os.path.join(d, test + ".json")) or {}).get(count_key)
    if rc is None or ac is None or not n or rc + ac == 0:
        return None
    return (rc + ac) * 1e6 / n


def tunnel_packets_per_conn(d):
    """-> packets the relay's and the appliance's tunnel stacks sent per crr connection, from the
    status dumps around the test (STATUS_DUMP=1); None without them."""
    n = (load(os.path.join(d, "crr.json")) or {}).get("conns")
    out = []
    for side, stack in (("relay", "relay"), ("app", "uplink")):
        a = load(os.path.join(d, "crr.before.%s-status.json" % side)) or {}
        b = load(os.path.join(d, "crr.after.%s-status.json" % side)) or {}
        try:
            out.append((b["netstack"][stack]["counters"]["packets_out"] - a["netstack"][stack]["counters"]["packets_out"]) / n)
        except (KeyError, TypeError, ZeroDivisionError):
            return None
    return out


def peak_mib(mem):
    if not mem:
        return None
    return max(mem.get("sum_root_vmhwm_kb", 0), mem.get("peak_tree_rss_kb", 0)) / 1024


def relay(run):
    rows = {}
    for m in RL_MODES:
        reps = []
        for d in reps_of(run, m):
            r = {t: metric(t, load(os.path.join(d, t + ".json"))) for t in TESTS}
            r["udprr"] = metric("rr", load(os.path.join(d, "udprr.json")))  # pmbench writes both alike
            crr = load(os.path.join(d, "crr.json")) or {}
            r["crr_errors"] = crr.get("errors")
            rc, ac, wall = side_cpu(load(os.path.join(d, "tcp1.meta")))
            gib = (iperf_bytes(load(os.path.join(d, "tcp1.json"))) or 0) / 2 ** 30
            has = m != "loopback"
            r["relay_s_gib"] = rc / gib if has and gib and rc is not None else None
            r["app_s_gib"] = ac / gib if has and gib and ac is not None else None
            r["cores_per_gbit"] = cores_per_gbit(d, "tcp1", r["tcp1"]) if has else None
            r["cores_per_gbit4"] = cores_per_gbit(d, "tcp4", r["tcp4"]) if has else None
            r["idle4"] = host_idle_pct(load(os.path.join(d, "tcp4.meta")))
            r["crr_cpu_us"] = cpu_us_per_op(d, "crr", "conns") if has else None
            r["rr_cpu_us"] = cpu_us_per_op(d, "rr", "samples") if has else None
            pk = tunnel_packets_per_conn(d) if has else None
            r["relay_pkts"], r["app_pkts"] = pk or (None, None)
            r["relay_mib"] = peak_mib(load(os.path.join(d, "mem-relay.json")))
            r["app_mib"] = peak_mib(load(os.path.join(d, "mem-app.json")))
            reps.append(r)
        if reps:
            rows[m] = reps
    figs = common_figs("UDP rx Mbit/s @200M", False) + [
        ("relay CPU s/GiB", lambda r: r["relay_s_gib"], 2, False),
        ("appliance CPU s/GiB", lambda r: r["app_s_gib"], 2, False),
        ("cores per Gbit/s (both sides, 1 flow)", lambda r: r["cores_per_gbit"], 2, False),
        ("cores per Gbit/s (both sides, -P4)", lambda r: r["cores_per_gbit4"], 2, False),
        ("host CPU idle % during -P4", lambda r: r["idle4"], 0, False),
        ("CPU us per connection (both sides)", lambda r: r["crr_cpu_us"], 0, True),
        ("CPU us per round trip (both sides)", lambda r: r["rr_cpu_us"], 0, True),
        ("tunnel packets per connection, relay", lambda r: r["relay_pkts"], 2, False),
        ("tunnel packets per connection, appliance", lambda r: r["app_pkts"], 2, False),
        ("relay peak RSS MiB", lambda r: r["relay_mib"], 0, False),
        ("appliance peak RSS MiB", lambda r: r["app_mib"], 0, False),
        ("UDP RTT p50 us", lambda r: sub(r["udprr"], "p50"), 0, True),
        ("UDP RTT p99 us", lambda r: sub(r["udprr"], "p99"), 0, True),
    ]
    summary = summarize_figs(rows, figs)
    nreps = max((len(v) for v in rows.values()), default=0)
    out = ["Medians of %d repetitions; [ratio] to frp (default: tcpMux, TLS) measured in the same run.\n" % nreps]
    out += medians_table(rows, figs, summary, RL_LABEL, "frp", ("frp", "loopback"))
    out.append("")
    out.append(bg_line(run, rows))
    drops = line_drops_line(run, rows)
    if drops:
        out.append("\n" + drops)
    lb = summary.get("loopback")
    if lb:
        out.append("\nShare of plain loopback (single flow): " + ", ".join(
            "%s %s" % (m, "n/a" if summary[m]["TCP 1 flow Gbit/s"]["median"] is None or not lb["TCP 1 flow Gbit/s"]["median"]
                       else "%.2fx" % (summary[m]["TCP 1 flow Gbit/s"]["median"] / lb["TCP 1 flow Gbit/s"]["median"]))
            for m in rows if m != "loopback"))
    out += per_rep_table(rows, figs, summary)

    t = []
    nb = summary.get("natbox")

    def check(name, ok, fig):
        t.append("| %s | %s | %s |" % (name, fig, "n/a" if ok is None else ("met" if ok else "**not met**")))
    if nb:
        g = lambda m, n: summary.get(m, {}).get(n, {}).get("median")  # noqa: E731
        v, f = g("natbox", "TCP 1 flow Gbit/s"), g("frp", "TCP 1 flow Gbit/s")
        check("single flow >= frp default", None if v is None or f is None else v >= f, "%s vs %s Gbit/s" % (fmt(v, 2), fmt(f, 2)))
        check("single flow >= 4x naive wireguard-go+netstack (0.5 Gbit/s, issue figure, not re-run)",
              None if v is None else v >= 2.0, "%s Gbit/s vs 2.0" % fmt(v, 2))
        c = g("natbox", "cores per Gbit/s (both sides, 1 flow)")
        check("<= 1 core per Gbit/s (relay + appliance)", None if c is None else c <= 1.0, "%s" % fmt(c, 2))
        v = g("natbox", "conn/s (64 wkr)")
        best = max([x for x in (g("frp", "conn/s (64 wkr)"), g("frp-nomux", "conn/s (64 wkr)")) if x is not None], default=None)
        check("conn/s >= frp's best", None if v is None or best is None else v >= best, "%s vs %s" % (fmt(v), fmt(best)))
        v = g("natbox", "UDP loss %")
        check("UDP loss <= 2 % at 200 Mbit/s", None if v is None else v <= 2.0, "%s %%" % fmt(v, 1))
        a, b = g("natbox", "relay peak RSS MiB"), g("natbox", "appliance peak RSS MiB")
        check("< 64 MiB peak RSS per side", None if a is None or b is None else a < 64 and b < 64, "relay %s, appliance %s MiB" % (fmt(a), fmt(b)))
    out.append("\nTargets (issue 3), natbox relay in this run:\n")
    out.append("| target | figure | status |")
    out.append("|---|---|---|")
    out.extend(t or ["| all | natbox not measured | n/a |"])
    print("\n".join(out))
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("gateway", "relay"):
        sys.exit(__doc__)
    {"gateway": gateway, "relay": relay}[sys.argv[1]](sys.argv[2])
