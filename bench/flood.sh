#!/usr/bin/env bash
# flood.sh - spoofed-source SYN and UDP floods against natbox and kernel nftables DNAT, in one run.
#
# Same three-namespace topology and gateway set-ups as bench/run.sh (sourced from it, which reuses
# ../shared/bench), under their own namespace names (NB_NETNS, default nbf: nbf-client, nbf-gw,
# nbf-server) so a run.sh going on at the same time is not torn down. Per mode, each group of
# phases on a fresh topology, servers and gateway:
#   syn       (i) baseline: N_REAL real connections to mapping B (tcp 8081 -> echo :5301), connect +
#             1-byte echo each, spread over SECS s: success, connect p50/p99, longest gap between
#             completions. (ii) spoofed SYN flood, RATE/s x COUNT, to mapping A (tcp 8083 -> echo
#             :5401) while the real client connects to B again. (iii) connections the target of A
#             holds (ss in the server namespace) HOLD_WAIT s after the flood ends.
#   unmapped  (ii') the same flood to unmapped ports 20000-29999 while the real client connects to B.
#   udp       (iv) spoofed-source UDP flood, UDP_RATE/s x UDP_COUNT, to mapping U (udp 8084 -> UDP
#             echo :5402) while N_UDP_TCP real connections go to B and a real UDP client exchanges
#             N_UDP datagrams on a session opened before the flood and N_UDP on fresh sessions.
# natbox runs with [limits] max_sessions = MAX_SESSIONS (1000). (v) natbox's RSS (start, peak,
# VmHWM) and CPU (utime+stime) over each phase are sampled every 100 ms (flood watch); host busy
# cores over each flood come from /proc/stat (the generator's own cost is in it).
#
# Safety: the generator (bench/flood) sends only from inside the client namespace and refuses to
# run anywhere else (it checks /proc/self/ns/net against /run/netns/NAME and PID 1's namespace);
# it forges sources only in 198.18.128.0/17 (RFC 2544 benchmarking block), which the gateway
# namespace routes to a blackhole, so replies to the forged sources die there, as replies to a
# real attack's forged sources die out on the internet; every flood is capped in count and time
# (the generator's hard caps: 200000 packets, 60 s). The namespaces are removed on exit (trap).
#
# Usage (as root, from anywhere):
#   bench/flood.sh [options]
# Options (each also as the environment variable in brackets):
#   --rate R          SYN flood rate per second [RATE, 20000]
#   --count N         SYNs per flood [COUNT, RATE x SECS]
#   --secs T          flood length and the real clients' window, s [SECS, 3]
#   --udp-rate R      UDP flood rate [UDP_FLOOD_RATE, 50000]
#   --udp-count N     datagrams per UDP flood [UDP_FLOOD_COUNT, UDP_RATE x SECS]
#   --real N          real connections to B in the baseline and SYN phases [N_REAL, 40]
#   --max-sessions N  natbox [limits] max_sessions [MAX_SESSIONS, 1000]
#   --modes "M..."    of nftdnat natbox [MODES, "nftdnat natbox"]
#   --phases "P..."   of syn unmapped udp [PHASES, "syn unmapped udp"]
#   --natbox PATH     prebuilt natbox binary [NATBOX; default: build the committed HEAD of this tree]
#   --run NAME        results go to bench/results/NAME [RUN_ID, flood-<UTC time>]
#   -h, --help        this text
# Raw files (per-phase JSON, logs, natbox status) stay in $WORK/runs/NAME (WORK=/tmp/nb-flood);
# bench/results/NAME gets results.json, summary.md and env.txt.
#
# Examples:
#   bench/flood.sh --rate 1000 --count 3000 --run flood-1k       # the issue's own measurement
#   bench/flood.sh --run flood-20k                               # 20k SYN/s and 50k UDP/s, 3 s each
#   NATBOX=/tmp/natbox bench/flood.sh --modes natbox --phases syn
set -uo pipefail

help() { sed -n '2,/^set -uo pipefail$/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

RATE=${RATE:-20000} SECS=${SECS:-3} COUNT=${COUNT:-} UDP_FLOOD_RATE=${UDP_FLOOD_RATE:-50000}
UDP_FLOOD_COUNT=${UDP_FLOOD_COUNT:-} N_REAL=${N_REAL:-40} N_UDP_TCP=${N_UDP_TCP:-20} N_UDP=${N_UDP:-5}
MAX_SESSIONS=${MAX_SESSIONS:-1000} HOLD_WAIT=${HOLD_WAIT:-5} PHASES=${PHASES:-"syn unmapped udp"}
FLOOD_MODES=${MODES:-"nftdnat natbox"}
while [ $# -gt 0 ]; do
  case $1 in
    --rate) RATE=$2; shift ;;
    --count) COUNT=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --udp-rate) UDP_FLOOD_RATE=$2; shift ;;
    --udp-count) UDP_FLOOD_COUNT=$2; shift ;;
    --real) N_REAL=$2; shift ;;
    --max-sessions) MAX_SESSIONS=$2; shift ;;
    --modes) FLOOD_MODES=$2; shift ;;
    --phases) PHASES=$2; shift ;;
    --natbox) NATBOX=$2; shift ;;
    --run) RUN_ID=$2; shift ;;
    -h|--help) help; exit 0 ;;
    *) echo "flood.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for v in RATE SECS UDP_FLOOD_RATE N_REAL N_UDP_TCP N_UDP MAX_SESSIONS HOLD_WAIT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "flood.sh: $v=${!v} is not a whole number" >&2; exit 2; }
done
COUNT=${COUNT:-$((RATE * SECS))}
UDP_FLOOD_COUNT=${UDP_FLOOD_COUNT:-$((UDP_FLOOD_RATE * SECS))}
for v in COUNT UDP_FLOOD_COUNT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "flood.sh: $v=${!v} is not a whole number" >&2; exit 2; }
done
for v in $FLOOD_MODES; do
  [[ $v == nftdnat || $v == natbox ]] || { echo "flood.sh: mode $v: want nftdnat and/or natbox" >&2; exit 2; }
done
for v in $PHASES; do
  [[ $v == syn || $v == unmapped || $v == udp ]] || { echo "flood.sh: phase $v: want syn, unmapped, udp" >&2; exit 2; }
done
# The generator refuses more than 200000 packets per flood; say so before any set-up.
if [ "$COUNT" -gt 200000 ] || [ "$UDP_FLOOD_COUNT" -gt 200000 ] || [ "$SECS" -gt 20 ]; then
  echo "flood.sh: at most 200000 packets per flood and 20 s (got $COUNT SYNs, $UDP_FLOOD_COUNT datagrams, $SECS s)" >&2
  exit 2
fi

export WORK=${WORK:-/tmp/nb-flood} RUN_ID=${RUN_ID:-flood-$(date -u +%m%d-%H%M)} REPS=1 MODES=$FLOOD_MODES
export NB_NETNS=${NB_NETNS:-nbf}
NB_BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NATBOX_ARG=${NATBOX:-}
# run.sh's natbox mode and helpers, with the namespaces renamed (lib.sh does the same to the shared
# harness and the topology script)
NS_C=$NB_NETNS-client NS_G=$NB_NETNS-gw NS_S=$NB_NETNS-server
# shellcheck disable=SC1090
source <(sed -e '/^main "\$@"$/d' -e 's/^NB_BENCH_DIR=.*//' \
  -e "s/pm-client/$NS_C/g; s/pm-gw/$NS_G/g; s/pm-server/$NS_S/g" "$NB_BENCH_DIR/run.sh")
# run.sh reads a prebuilt binary from NATBOX before sourcing; it was unset there
NATBOX_PREBUILT=$NATBOX_ARG
RESULTS=$REPO_DIR/bench/results/$RUN_ID
FLOOD=$WORK/bin/flood
SPOOF=198.18.128.0/17 # forged sources; blackholed in the gateway namespace
P_A=8083 P_B=8081 P_U=8084 S_A=5401 S_U=5402 UNMAPPED=20000-29999

# ------------------------------------------------------------------ the gateways
eval "$(declare -f natbox_config | sed '1s/^natbox_config/base_natbox_config/')"
natbox_config() {
  base_natbox_config "$@"
  cat >>"$1/natbox.toml" <<EOF

[[mapping]]
name = "flood-a"
protocol = "tcp"
listen = "$P_A"
target = "$S_IP:$S_A"

[[mapping]]
name = "flood-u"
protocol = "udp"
listen = "$P_U"
target = "$S_IP:$S_U"
EOF
  # The floods meet natbox's default budgets (run.sh lifts the per-source ones for its single
  # load generator), with the session total the issue measured at.
  sed -i -e '/^# One load generator is one source/,/^new_sessions_per_source_per_second = 0$/d' \
    -e "/^\[limits\]\$/a max_sessions = $MAX_SESSIONS" "$1/natbox.toml"
}

flood_up() { # flood_up MODE DIR: fresh topology, servers, gateway; 0 when ready
  local mode=$1 d=$2
  mkdir -p "$d"
  "$TOPO" up >>"$OUT/run.log" 2>&1 || { log "topology up failed"; return 1; }
  start_servers "$d"
  start_bg "$d/pmbench-server-a.log" ip netns exec "$NS_S" "$PMBENCH" server -echo ":$S_A" -uecho ":$S_U" -lifetime 1h
  G ip route add blackhole "$SPOOF"
  setup_mode "$mode" "$d" || { log "$mode: set-up failed"; return 1; }
  if [ "$mode" = nftdnat ]; then
    G nft add rule ip pm_nat prerouting ip daddr "$GW_PUB" tcp dport "$P_A" dnat to "$S_IP:$S_A"
    G nft add rule ip pm_nat prerouting ip daddr "$GW_PUB" udp dport "$P_U" dnat to "$S_IP:$S_U"
  fi
  wait_ready || { log "$mode: not ready"; return 1; }
}

flood_down() { stop_all; "$TOPO" down >>"$OUT/run.log" 2>&1; }

# the shared cleanup (trap on EXIT) stops every server and gateway by PID and removes the
# namespaces; the watcher and the client are ours to stop first
eval "$(declare -f cleanup | sed '1s/^cleanup/base_cleanup/')"
cleanup() {
  local p
  for p in ${WATCH_PID:-} ${CLIENT_PID:-}; do kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null; done
  base_cleanup
}

# ------------------------------------------------------------------ one phase
WATCH_PID=""
watch_start() { # natbox's RSS/CPU for the phase; kernel modes have no process
  WATCH_PID=""
  [ ${#GW_PIDS[@]} -gt 0 ] || return 0
  "$FLOOD" watch -pid "${GW_PIDS[0]}" -interval 100ms -max 5m >"$1/watch.json" 2>"$1/watch.err" &
  WATCH_PID=$!
}
watch_stop() {
  [ -n "$WATCH_PID" ] || return 0
  kill -TERM "$WATCH_PID" 2>/dev/null
  wait "$WATCH_PID" 2>/dev/null
  WATCH_PID=""
}

client() { # client DIR ARGS...: the measuring client, in the background -> CLIENT_PID; returns
  # once its window has started (a UDP session from before the flood is open by then)
  local d=$1 i; shift
  rm -f "$d/client.ready"
  ip netns exec "$NS_C" timeout $((SECS + 30)) "$FLOOD" client -netns "$NS_C" -window "${SECS}s" \
    -ready "$d/client.ready" "$@" >"$d/client.json" 2>"$d/client.err" &
  CLIENT_PID=$!
  for i in $(seq 100); do [ -e "$d/client.ready" ] && return 0; kill -0 "$CLIENT_PID" 2>/dev/null || break; sleep 0.05; done
  log "  the real client did not start its window: $(head -c 300 "$d/client.err")"
}

flood() { # flood DIR syn|udp PORTS RATE COUNT
  local d=$1 kind=$2 ports=$3 rate=$4 count=$5
  head -1 /proc/stat >"$d/hostcpu.txt"
  C timeout $((SECS * 2 + 30)) "$FLOOD" "$kind" -netns "$NS_C" -dst "$T_HOST" -dport "$ports" -src "$SPOOF" \
    -rate "$rate" -count "$count" >"$d/flood.json" 2>"$d/flood.err" || log "  flood rc=$? $(head -c 300 "$d/flood.err")"
  head -1 /proc/stat >>"$d/hostcpu.txt"
  log "  $(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print("sent %d of %s %s in %.2f s (%.0f/s), stopped by %s" % (j["sent"], sys.argv[2], j["kind"], j["elapsed_s"], j["rate_achieved_pps"], j["stopped_by"]))' "$d/flood.json" "$count" 2>/dev/null || echo "no flood result")"
}

phase_end() { # phase_end MODE DIR: gateway state after a phase
  local mode=$1 d=$2
  G cat /proc/sys/net/netfilter/nf_conntrack_count >"$d/conntrack.txt" 2>/dev/null
  if [ "$mode" = natbox ]; then
    timeout 10 "$NATBOX" status --socket "$NB_SOCK" --json >"$d/status.json" 2>"$d/status.err" || true
  fi
}

client_wait() { wait "$CLIENT_PID"; log "  real client: $(python3 "$NB_BENCH_DIR/flood_summary.py" client "$1/client.json")"; }

held() { # connections the target of A holds
  S ss -Htn state established "( sport = :$S_A )" | wc -l
}

run_group() { # run_group MODE GROUP
  local mode=$1 g=$2 d=$OUT/raw/$1/$2
  mkdir -p "$d"
  bg_probe >"$d/bg.txt" # other tenants' load, before anything of ours runs
  log "$mode: $g: set-up (other tenants keep $(cat "$d/bg.txt") cores busy)"
  if ! flood_up "$mode" "$d"; then
    flood_down; return 1
  fi
  NB_SOCK=$d/natbox.sock # natbox_config puts the admin socket in the group's directory
  case $g in
    syn)
      mkdir -p "$d/baseline" "$d/flood"
      log "$mode: baseline: $N_REAL connections to B over $SECS s"
      watch_start "$d/baseline"
      client "$d/baseline" -tcp "$T_HOST:$P_B" -n "$N_REAL"
      client_wait "$d/baseline"
      watch_stop
      log "$mode: SYN flood $RATE/s x $COUNT to A ($T_HOST:$P_A) while $N_REAL connect to B"
      watch_start "$d/flood"
      client "$d/flood" -tcp "$T_HOST:$P_B" -n "$N_REAL"
      flood "$d/flood" syn "$P_A" "$RATE" "$COUNT"
      local t_end=$SECONDS
      client_wait "$d/flood"
      sleep $((HOLD_WAIT - (SECONDS - t_end) > 0 ? HOLD_WAIT - (SECONDS - t_end) : 0))
      held >"$d/flood/held.txt"
      log "  target of A holds $(cat "$d/flood/held.txt") connections $HOLD_WAIT s after the flood"
      watch_stop
      phase_end "$mode" "$d/flood"
      ;;
    unmapped)
      log "$mode: SYN flood $RATE/s x $COUNT to unmapped ports $UNMAPPED while $N_REAL connect to B"
      watch_start "$d"
      client "$d" -tcp "$T_HOST:$P_B" -n "$N_REAL"
      flood "$d" syn "$UNMAPPED" "$RATE" "$COUNT"
      client_wait "$d"
      watch_stop
      phase_end "$mode" "$d"
      ;;
    udp)
      log "$mode: UDP flood $UDP_FLOOD_RATE/s x $UDP_FLOOD_COUNT to U ($T_HOST:$P_U) while $N_UDP_TCP connect to B and a UDP client exchanges"
      watch_start "$d"
      client "$d" -tcp "$T_HOST:$P_B" -n "$N_UDP_TCP" -udp "$T_HOST:$P_U" -udp-n "$N_UDP"
      flood "$d" udp "$P_U" "$UDP_FLOOD_RATE" "$UDP_FLOOD_COUNT"
      client_wait "$d"
      watch_stop
      phase_end "$mode" "$d"
      ;;
  esac
  { echo "## gw ss -s"; G ss -s; echo "## server ss -s"; S ss -s; } >"$d/state.txt" 2>&1
  flood_down
}

# ------------------------------------------------------------------ main
main() {
  [ "$(id -u)" = 0 ] || { echo "flood.sh: must run as root (namespaces, raw sockets)" >&2; exit 1; }
  mkdir -p "$OUT" "$RESULTS"
  log "flood run $RUN_ID: modes [$MODES] phases [$PHASES]; SYN $RATE/s x $COUNT, UDP $UDP_FLOOD_RATE/s x $UDP_FLOOD_COUNT, window $SECS s; raw files in $OUT"
  install_deps nft:nftables ping:iputils-ping ss:iproute2 python3:python3
  build_tools
  (cd "$REPO_DIR" && go build -o "$FLOOD" ./bench/flood) || { echo "flood.sh: bench/flood build failed" >&2; exit 1; }
  if [[ " $MODES " == *" natbox "* ]]; then
    log "natbox: ${NATBOX_PREBUILT:-building the committed HEAD of $REPO_DIR}"
    build_natbox || { echo "flood.sh: natbox build failed" >&2; exit 1; }
  fi
  record_env
  natbox_version >>"$OUT/env.txt" 2>&1
  echo "# flood: RATE=$RATE COUNT=$COUNT SECS=$SECS UDP_FLOOD_RATE=$UDP_FLOOD_RATE UDP_FLOOD_COUNT=$UDP_FLOOD_COUNT N_REAL=$N_REAL N_UDP_TCP=$N_UDP_TCP N_UDP=$N_UDP MAX_SESSIONS=$MAX_SESSIONS HOLD_WAIT=$HOLD_WAIT" >>"$OUT/env.txt"
  local mode g
  for mode in $MODES; do
    for g in $PHASES; do
      run_group "$mode" "$g"
    done
  done
  python3 "$NB_BENCH_DIR/flood_summary.py" summary "$OUT" "$RESULTS" | tee "$RESULTS/summary.md"
  cp "$OUT/env.txt" "$RESULTS/env.txt"
  log "done: $RESULTS"
}

main "$@"
