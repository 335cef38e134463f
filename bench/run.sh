#!/usr/bin/env bash
# run.sh - natbox gateway mode beside the kernel and userspace baselines, in one run.
#
# Topology and baselines are ../shared/bench (netns-topo.sh, run-baselines.sh, pmbench); see lib.sh
# for how they are reused. This adds:
#   natbox  natbox run in pm-gw: creates TUN natbox0 with 198.19.0.1/32 and the kernel route
#           198.19.0.1/32 -> natbox0; the client routes 198.19.0.0/24 via the gw (198.18.0.1).
#           (198.18.0.1 is the gw's own veth address, so natbox gets a public address of its own.)
#           Mappings: tcp+udp 8080 -> 10.77.0.2:5201 (iperf3), tcp 8081 -> :5301 (echo),
#           tcp 8082 -> :5302 (crr), udp 8083 -> :5303 (UDP echo, pmbench server -uecho).
#   churn   after the reps: CHURN_N (100000) connections through the crr mapping, 64 workers,
#           failures counted (pmbench crr -max, bounded to 110 s).
#   idle    after the interleaved reps: RSS per idle TCP session (bench/idle: IDLE_N connections
#           through natbox to the echo server, 1-byte ping each, then held; natbox RSS before/after).
#   udprr   after the reps: a 64-byte UDP ping-pong through natbox (pmbench udprr, RR_DUR s, at most
#           20000 round trips) and natbox's CPU ticks meanwhile (natbox only: the baselines map no echo).
#   profile a single-flow iperf3 through natbox with a CPU profile of natbox (Go pprof when natbox
#           serves it under NATBOX_PPROF, and perf cpu-clock call graphs) -> $OUT/profiles/.
#
# Everything runs inside the three namespaces netns-topo.sh creates; every load is bounded
# (iperf3 -t, pmbench -duration/-count, idle -timeout, plus `timeout`). Run as root:
#   sudo bench/run.sh                         # REPS=3 DUR=5 MODES="direct nftdnat haproxy socat natbox"
#   REPS=5 DUR=10 sudo -E bench/run.sh
# Env (besides run-baselines.sh's REPS DUR RR_DUR TESTS UDP_RATE UDP_LEN MTU): MODES, WORK, NATBOX
# (prebuilt binary; default: build the committed HEAD), IDLE_N (10000), CHURN_N (100000), SKIP_IDLE=1, SKIP_CHURN=1, SKIP_UDPRR=1, SKIP_PROFILE=1,
# PROFILE_TESTS (tcp1 tcpR crr udp rr; also tcp4). REPS=0 runs only the idle and profile steps.
set -uo pipefail

NB_BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export WORK=${WORK:-/tmp/nb-bench}
export REPS=${REPS:-3} DUR=${DUR:-5} RR_DUR=${RR_DUR:-5}
export MODES=${MODES:-"direct nftdnat haproxy socat natbox"}
IDLE_N=${IDLE_N:-10000}
CHURN_N=${CHURN_N:-100000}
NATBOX_PREBUILT=${NATBOX:-}
unset NATBOX
# shellcheck source=bench/lib.sh
source "$NB_BENCH_DIR/lib.sh"

NB_PUB=198.19.0.1
NB_PPROF=127.0.0.1:6060
IDLE=$WORK/bin/nb-idle

# ------------------------------------------------------------------ the natbox mode
natbox_config() { # natbox_config DIR -> DIR/natbox.toml
  cat >"$1/natbox.toml" <<EOF
[log]
level = "warn"

[tun]
name = "natbox0"
mtu = $MTU
addresses = ["$NB_PUB/32"]
routes = ["$NB_PUB/32"]

[limits]
# One load generator is one source: the per-source budgets (flood
# defences) would cap its connection rate and idle connections.
max_tcp_sessions_per_source = 0
max_udp_sessions_per_source = 0
new_sessions_per_source_per_second = 0

[admin]
socket = "$1/natbox.sock"

[[mapping]]
name = "iperf"
protocol = "tcp+udp"
listen = "8080"
target = "$S_IP:5201"

[[mapping]]
name = "echo"
protocol = "tcp"
listen = "8081"
target = "$S_IP:5301"

[[mapping]]
name = "crr"
protocol = "tcp"
listen = "8082"
target = "$S_IP:5302"

[[mapping]]
name = "uecho"
protocol = "udp"
listen = "8083"
target = "$S_IP:5303"
EOF
}

eval "$(declare -f setup_mode | sed '1s/^setup_mode/base_setup_mode/')"
setup_mode() {
  local mode=$1 d=$2
  if [ "$mode" != natbox ]; then base_setup_mode "$@"; return; fi
  GW_PIDS=()
  natbox_config "$d"
  C ip route add 198.19.0.0/24 via "$GW_PUB"
  # NATBOX_PPROF only matters when PROFILE=1 (natbox ignores it if it has no such switch)
  if [ "${PROFILE:-0}" = 1 ]; then
    NATBOX_PPROF=$NB_PPROF start_bg "$d/natbox.log" ip netns exec pm-gw "$NATBOX" run -c "$d/natbox.toml"
  else
    start_bg "$d/natbox.log" ip netns exec pm-gw "$NATBOX" run -c "$d/natbox.toml"
  fi
  GW_PIDS+=("$LAST_PID")
  local i
  for i in $(seq 50); do G ip route get "$NB_PUB" 2>/dev/null | grep -q natbox0 && break; sleep 0.1; done
  if ! kill -0 "$LAST_PID" 2>/dev/null; then
    log "natbox exited: $(tail -c 400 "$d/natbox.log")"; return 1
  fi
  T_HOST=$NB_PUB; P_IPERF=8080; P_ECHO=8081; P_CRR=8082
}

eval "$(declare -f record_links | sed '1s/^record_links/base_record_links/')"
record_links() {
  base_record_links "$@"
  if G ip link show natbox0 >/dev/null 2>&1; then
    { echo "## pm-gw natbox0"; G ip -d link show natbox0; G ethtool -k natbox0 | grep -vE 'fixed\]$'
      echo "## pm-gw routes"; G ip route; } >>"$OUT/links-$1.txt" 2>&1
  fi
}

# ------------------------------------------------------------------ extra natbox-only runs
natbox_up() { # natbox_up DIR: fresh topology, servers, natbox; 0 when ready
  "$TOPO" up >>"$OUT/run.log" 2>&1 || { log "topo up failed"; return 1; }
  start_servers "$1"
  setup_mode natbox "$1" && wait_ready
}
natbox_down() { stop_all; "$TOPO" down >>"$OUT/run.log" 2>&1; }

run_idle() {
  local d=$OUT/raw-extra/idle
  mkdir -p "$d"
  log "idle sessions: $IDLE_N through natbox"
  if natbox_up "$d"; then
    C timeout 200 "$IDLE" -addr "$NB_PUB:8081" -n "$IDLE_N" -pid "${GW_PIDS[0]}" -timeout 150s >"$d/idle.json" 2>"$d/idle.err" \
      || log "idle rc=$? $(head -c 300 "$d/idle.err")"
    { echo "## pm-gw ss -s"; G ss -s; } >"$d/state.txt" 2>&1
  else
    log "idle: natbox not ready"
  fi
  natbox_down
}

run_churn() { # issue 2: zero failed connections over CHURN_N connections through one mapping
  local d=$OUT/raw-extra/churn
  mkdir -p "$d"
  log "churn: $CHURN_N connections through natbox (64 workers, <= 110 s)"
  if natbox_up "$d"; then
    C timeout 130 "$PMBENCH" crr -addr "$NB_PUB:8082" -workers "$CRR_WORKERS" -max "$CHURN_N" -duration 110s \
      >"$d/churn.json" 2>"$d/churn.err" || log "churn rc=$? $(head -c 300 "$d/churn.err")"
  else
    log "churn: natbox not ready"
  fi
  natbox_down
}

run_udprr() { # a UDP round trip (a game's, a call's) through natbox, and natbox's CPU per round trip
  local d=$OUT/raw-extra/udprr
  mkdir -p "$d"
  log "udprr: UDP ping-pong through natbox (${RR_DUR}s, <= 20000 round trips)"
  if natbox_up "$d"; then
    start_bg "$d/uecho.log" ip netns exec pm-server "$PMBENCH" server -uecho ":5303" -lifetime 10m
    sleep 0.3
    local pid=${GW_PIDS[0]} t0 t1
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    C timeout $((RR_DUR + 20)) "$PMBENCH" udprr -addr "$NB_PUB:8083" -duration "${RR_DUR}s" -count 20000 -size 64 \
      >"$d/udprr.json" 2>"$d/udprr.err" || log "udprr rc=$? $(head -c 300 "$d/udprr.err")"
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    echo "{\"natbox_cpu_ticks\": $((t1 - t0)), \"clk_tck\": $(getconf CLK_TCK)}" >"$d/cpu.json"
  else
    log "udprr: natbox not ready"
  fi
  natbox_down
}

run_profile() { # one profile per PROFILE_TESTS test (default: all that natbox misses targets on)
  local d=$OUT/raw-extra/profile
  mkdir -p "$d"
  log "profile: natbox during ${PROFILE_TESTS:=tcp1 tcpR crr udp rr}"
  if PROFILE=1 natbox_up "$d"; then
    local t cmd secs=$((DUR > 2 ? DUR - 1 : DUR))
    for t in $PROFILE_TESTS; do
      case $t in
        tcp1) cmd=(iperf3 -c "$NB_PUB" -p 8080 -t "$DUR" --connect-timeout 3000 -J) ;;
        tcpR) cmd=(iperf3 -c "$NB_PUB" -p 8080 -t "$DUR" -R --connect-timeout 3000 -J) ;;
        tcp4) cmd=(iperf3 -c "$NB_PUB" -p 8080 -t "$DUR" -P 4 --connect-timeout 3000 -J) ;;
        udp) cmd=(iperf3 -c "$NB_PUB" -p 8080 -t "$DUR" -u -b "$UDP_RATE" -l "$UDP_LEN" --connect-timeout 3000 -J) ;;
        crr) cmd=("$PMBENCH" crr -addr "$NB_PUB:8082" -workers "$CRR_WORKERS" -duration "${DUR}s") ;;
        rr) cmd=("$PMBENCH" rr -addr "$NB_PUB:8081" -duration "${DUR}s" -count 1000000 -size 64) ;;
        *) continue ;;
      esac
      profile_pid pm-gw "${GW_PIDS[0]}" "$secs" "$OUT/profiles" "natbox-gw-$t" "$NB_PPROF" &
      local pp=$!
      sleep 0.5
      C timeout $((DUR + 20)) "${cmd[@]}" >"$d/$t.json" 2>"$d/$t.err"
      wait "$pp"
      sleep 1
    done
  else
    log "profile: natbox not ready"
  fi
  natbox_down
}

# ------------------------------------------------------------------ main
main() {
  mkdir -p "$OUT"
  [ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }
  install_deps iperf3:iperf3 socat:socat haproxy:haproxy nft:nftables ethtool:ethtool ping:iputils-ping perf:linux-perf curl:curl
  build_tools
  (cd "$REPO_DIR" && go build -o "$IDLE" ./bench/idle) || { echo "idle loader build failed" >&2; exit 1; }
  if [[ " $MODES " == *" natbox "* ]] && ! build_natbox; then
    log "natbox: build failed; dropping the mode"; MODES=${MODES//natbox/}
  fi
  record_env
  { natbox_version; echo "kernel TCP congestion control (the namespaces inherit it): $(sysctl -n net.ipv4.tcp_congestion_control)"; } >>"$OUT/env.txt" 2>&1
  log "run $RUN_ID -> $OUT (REPS=$REPS DUR=$DUR modes: $MODES)"
  local rep mode
  for rep in $(seq "$REPS"); do
    for mode in $MODES; do
      log "rep $rep mode $mode"
      run_mode "$mode" "$rep"
    done
  done
  if [[ " $MODES " == *" natbox "* ]]; then
    [ "${SKIP_IDLE:-0}" = 1 ] || run_idle
    [ "${SKIP_CHURN:-0}" = 1 ] || run_churn
    [ "${SKIP_UDPRR:-0}" = 1 ] || run_udprr
    [ "${SKIP_PROFILE:-0}" = 1 ] || run_profile
  fi
  python3 "$NB_BENCH_DIR/summarize.py" gateway "$OUT" | tee "$OUT/summary.md"
  log "done: $OUT"
}

main "$@"
