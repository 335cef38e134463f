#!/usr/bin/env bash
# udp-stages.sh - where natbox's gateway loses UDP: counts every stage of the bench's UDP test.
#
# Same topology and natbox config as run.sh (sourced from it), natbox only, 2 x DUR s of iperf3 -u at
# UDP_RATE/UDP_LEN, then prints: datagrams the kernel routed into the TUN and dropped before natbox
# read them (natbox0 tx/tx_dropped), what natbox sent on (pm-gw Udp OutDatagrams), what the
# server's socket dropped (pm-server RcvbufErrors), natbox's and the server's CPU, natbox status.
# Traffic stays inside the namespaces netns-topo.sh creates; they are removed at the end. As root:
#   bench/udp-stages.sh                    # NATBOX=/path/to/natbox to skip the build of HEAD
set -uo pipefail

export WORK=${WORK:-/tmp/nb-bench} REPS=1 MODES=natbox RUN_ID=${RUN_ID:-udp-stages}
NB_BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC1090
source <(sed -e '/^main "\$@"$/d' -e 's/^NB_BENCH_DIR=.*//' "$NB_BENCH_DIR/run.sh")
UDP_RATE=${UDP_RATE:-1G} UDP_LEN=${UDP_LEN:-1400}

mkdir -p "$OUT"
build_tools >/dev/null 2>&1 && build_natbox || { echo "build failed" >&2; exit 1; }
d=$OUT/udp-stages
mkdir -p "$d"
natbox_up "$d" || { echo "natbox did not come up: $(tail -c 400 "$d/natbox.log")" >&2; natbox_down; exit 1; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
udp_snmp() { "$1" awk '/^Udp:/ { if (h) { for (i = 2; i <= NF; i++) v[n[i]] = $i; print v["InDatagrams"], v["OutDatagrams"], v["RcvbufErrors"]; exit } h = 1; for (i = 2; i <= NF; i++) n[i] = $i }' /proc/net/snmp; }
tun_tx() { G cat /sys/class/net/natbox0/statistics/tx_packets /sys/class/net/natbox0/statistics/tx_dropped | tr '\n' ' '; }
server_pid=$(pgrep -f "iperf3 -s -p 5201" | head -1)
read -r tx0 drop0 <<<"$(tun_tx)"; read -r _ gwout0 _ <<<"$(udp_snmp G)"; read -r srvin0 _ srvbuf0 <<<"$(udp_snmp S)"
nb0=$(cpu_ticks "${GW_PIDS[0]}"); srv0=$(cpu_ticks "$server_pid"); t0=$(date +%s.%N)
for i in 1 2; do
  C timeout $((DUR + 10)) iperf3 -c "$T_HOST" -p "$P_IPERF" -t "$DUR" -u -b "$UDP_RATE" -l "$UDP_LEN" -J >"$d/udp$i.json" 2>"$d/udp$i.err"
done
t1=$(date +%s.%N); nb1=$(cpu_ticks "${GW_PIDS[0]}"); srv1=$(cpu_ticks "$server_pid")
read -r tx1 drop1 <<<"$(tun_tx)"; read -r _ gwout1 _ <<<"$(udp_snmp G)"; read -r srvin1 _ srvbuf1 <<<"$(udp_snmp S)"
{
  echo "routed into the TUN:               $((tx1 - tx0 + drop1 - drop0))"
  echo "dropped before natbox read them:   $((drop1 - drop0))"
  echo "sent on by natbox (gw OutDatagrams): $((gwout1 - gwout0))"
  echo "dropped at the server's socket:    $((srvbuf1 - srvbuf0))"
  echo "received by the server:            $((srvin1 - srvin0))"
  awk -v a="$nb0" -v b="$nb1" -v c="$srv0" -v e="$srv1" -v s="$t0" -v t="$t1" \
    'BEGIN { printf "cores used: natbox %.2f, iperf3 server %.2f\n", (b-a)/100/(t-s), (e-c)/100/(t-s) }'
  "$NATBOX" status --socket "$d/natbox.sock"
} | tee "$d/stages.txt"
natbox_down
