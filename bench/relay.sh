#!/usr/bin/env bash
# relay.sh - natbox relay mode beside plain loopback, frp (tcpMux on/off) and ssh -R, in one run.
#
# Everything runs in one throwaway network namespace, nb-relay, on its loopback only (so nothing
# can collide with, or reach, ports outside it): the target servers (iperf3 :5201, pmbench echo
# :5301 and crr :5302), the "relay" side and the "appliance" side of each tunnel, and the clients.
# Public ports on the relay: 18080 (iperf3, tcp and udp), 18081 (echo), 18082 (crr), 18083 (UDP echo, :5303).
#   loopback   client -> 127.0.0.1:5201 directly                                      (ceiling)
#   natbox     natbox relay (WireGuard 127.0.0.1:51820, public_bind 127.0.0.1) <- natbox run with
#              only [uplink] (mappings tcp+udp 18080 -> :5201, 18081 -> :5301, 18082 -> :5302)
#   natbox-tcp the same over natbox's TCP transport: WireGuard inside TLS on 127.0.0.1:443
#              (relay tcp_listen, appliance transport = "tcp"), the fallback for networks without UDP
#   natbox-auto the same with the relay's tcp_listen and transport = "auto", the default: UDP, TCP
#              when UDP is blocked or (uplink.loss_fallback) lossy; for lossy lines (LOSS_PCT)
#   frp        frps (bindPort 7000) <- frpc, TCP transport, defaults (tcpMux on, TLS on);
#              tcp proxies 18080/18081/18082 + udp proxy 18080
#   frp-nomux  the same with transport.tcpMux = false on both sides
#   ssh        throwaway sshd on 127.0.0.1:2222 (generated host key, key-only root login, config
#              in $WORK) <- ssh -N -R 18080:127.0.0.1:5201 -R 18081:... -R 18082:...; no UDP
# Tests (REPS interleaved reps): tcp1 tcp4 tcpR (iperf3 -t DUR), crr (pmbench, 64 workers), udp
# (iperf3 -u -b 200M -l 1200: 1200 so that a datagram plus headers fits the 1420-byte tunnel MTU),
# rr (64-byte ping-pong); per side: CPU ticks over each test and peak RSS (pmbench memwatch).
# Then a CPU profile of both natbox sides during a single flow -> $OUT/profiles/.
#
#   sudo bench/relay.sh        # REPS=3 DUR=5 RELAY_MODES="loopback natbox natbox-tcp frp frp-nomux ssh"
# Env: REPS DUR RR_DUR WORK RELAY_MODES NATBOX FRP_VERSION(v0.69.1) FRP_BIN UDP_RATE(200M)
#      UDP_LEN(1200) SKIP_PROFILE=1 RTT_MS RELAY_NETNS(nb-relay). HEAPPROFILE=1: each natbox process
#      writes a heap profile at its peak to relay.heap / natbox.heap in its raw directory
#      (NATBOX_HEAPPROFILE). TUNNEL_MTU: both sides' tunnel mtu, pinned (mtu = max_mtu: no path probe;
#      unset: 1420, raised by the probe to max_mtu, 32000, on this one-host path). RELAY_EXTRA /
#      APP_LIMITS_EXTRA: lines added to the relay's [relay] / the appliance's [limits] (e.g.
#      'buffer_memory = "0"'). PROFILE_TESTS: the tests profiled (tcp1 tcpR; also tcp4 crr rr), PROFILE_MODE the mode (natbox; natbox-tcp); REPS=0 with
#      SKIP_PROFILE unset runs the profile alone.
#      STATUS_DUMP=1: each natbox side's `status --json` and each side's namespace's `nstat -asz` before
#      and after each test, in its raw directory.
#
# RTT_MS=20 puts a WAN round trip between the relay side and the home side (the kernels here have
# no netem): the appliance side (natbox run, frpc, ssh) and the target servers move to a second
# namespace, nb-relay-home (10.99.0.2), joined to nb-relay (10.99.0.1; relay sides and clients stay
# there) by two veths that meet in nb-relay-wan, where bench/wanbridge copies every frame across
# after RTT_MS/2 in each direction. `loopback` then measures the bare line: client -> 10.99.0.2.
# wanbridge is built from bench/wanbridge (or taken from PATH). LOSS_PCT=0.01 (with RTT_MS) also
# drops that per cent of frames at random in each direction, as a real path does. WAN_GRO=1 turns on
# receive GRO on the line's two ends (vr0, vh0), as a server's NIC has it (a veth has it off).
# TCP_CC=cubic sets the kernel's TCP congestion control in the bench's namespaces (they inherit the
# host's at creation: bbr on the machine of BENCHMARKS.md, cubic on a stock Debian or Ubuntu VPS). It
# decides how frp's and ssh's host TCP ride a lossy line, so env.txt records it. natbox's TCP transport
# asks for its own (tcp_congestion, default bbr); NATBOX_TCP_CC sets it on both natbox sides
# ("system": the namespaces' TCP_CC).
set -uo pipefail

NB_BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export WORK=${WORK:-/tmp/nb-bench}
export REPS=${REPS:-3} DUR=${DUR:-5} RR_DUR=${RR_DUR:-5}
export UDP_RATE=${UDP_RATE:-200M} UDP_LEN=${UDP_LEN:-1200}
RELAY_MODES=${RELAY_MODES:-"loopback natbox natbox-tcp frp frp-nomux ssh"}
export MODES=$RELAY_MODES
FRP_VERSION=${FRP_VERSION:-v0.69.1}
FRP_BIN=${FRP_BIN:-/tmp/frp-bin}
NATBOX_PREBUILT=${NATBOX:-}
unset NATBOX
# shellcheck source=bench/lib.sh
source "$NB_BENCH_DIR/lib.sh"

NS=${RELAY_NETNS:-nb-relay} # another name lets two runs (with their own WORK) coexist
LO=127.0.0.1
NB_PPROF_RELAY=127.0.0.1:6061
NB_PPROF_APP=127.0.0.1:6062
RTT_MS=${RTT_MS:-0}
LOSS_PCT=${LOSS_PCT:-0}
TCP_CC=${TCP_CC:-}
NATBOX_TCP_CC=${NATBOX_TCP_CC:-}
PROFILE_MODE=${PROFILE_MODE:-natbox} # the natbox mode profiled: natbox, natbox-tcp or natbox-auto
WAN_GRO=${WAN_GRO:-0}
NS_HOME=$NS # the appliance side and the targets; their own namespace with RTT_MS
NS_WAN=
RELAY_HOST=$LO # where the appliance side reaches the relay side
if [ "$RTT_MS" != 0 ]; then
  NS_HOME=$NS-home NS_WAN=$NS-wan RELAY_HOST=10.99.0.1
fi
WANBRIDGE=${WANBRIDGE:-$(command -v wanbridge || echo "$WORK/bin/wanbridge")}
RELAY_PIDS=() # the relay side's root processes of the current mode (CPU and memory per side)
APP_PIDS=()   # the appliance side's
C() { ip netns exec "$NS" "$@"; } # the clients (run_test, wait_ready) run in the same namespace

wait_listen() { # wait_listen tcp|udp PORT: until the relay side listens (bounded, 10 s)
  local i flag=-ltn
  [ "$1" = udp ] && flag=-lun
  for i in $(seq 100); do C ss -H $flag "sport = :$2" 2>/dev/null | grep -q . && return 0; sleep 0.1; done
  return 1
}

ns_up() { # $1: where the WAN line's counters go (wanbridge.log)
  ns_down
  local ns
  for ns in $NS ${NS_WAN:+$NS_HOME $NS_WAN}; do
    ip netns add "$ns" && ip netns exec "$ns" ip link set lo up \
      && ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.core.somaxconn=4096 \
           net.ipv4.tcp_max_syn_backlog=4096 || return 1
    [ -z "$TCP_CC" ] || ip netns exec "$ns" sysctl -qw net.ipv4.tcp_congestion_control="$TCP_CC" || {
      echo "TCP_CC=$TCP_CC: a namespace may only take a congestion control the host allows" \
        "(net.ipv4.tcp_allowed_congestion_control: $(sysctl -n net.ipv4.tcp_allowed_congestion_control));" \
        "add it there as root, e.g. sysctl -w net.ipv4.tcp_allowed_congestion_control=\"reno bbr $TCP_CC\"" >&2
      return 1
    }
  done
  [ -z "$NS_WAN" ] || wan_up "$1"
}
wan_up() { # two veths into $NS_WAN, bridged there with RTT_MS/2 of delay each way (bounded run)
  ip link add vr0 netns "$NS" type veth peer name m0 netns "$NS_WAN" \
    && ip link add vh0 netns "$NS_HOME" type veth peer name m1 netns "$NS_WAN" || return 1
  local ns ifc ns_ifc
  # wanbridge copies whole frames: no offloads (oversized or checksum-less frames would be lost)
  for ns_ifc in "$NS:vr0" "$NS_HOME:vh0" "$NS_WAN:m0" "$NS_WAN:m1"; do
    ns=${ns_ifc%%:*} ifc=${ns_ifc#*:}
    ip netns exec "$ns" ethtool -K "$ifc" gro off gso off tso off tx off rx off >/dev/null 2>&1
    ip netns exec "$ns" ip link set "$ifc" up || return 1
  done
  if [ "$WAN_GRO" = 1 ]; then # receive-side GRO at both ends, as a server's NIC does (turning it on gives a veth NAPI)
    ip netns exec "$NS" ethtool -K vr0 gro on >/dev/null && ip netns exec "$NS_HOME" ethtool -K vh0 gro on >/dev/null || return 1
  fi
  ip netns exec "$NS" ip addr add 10.99.0.1/24 dev vr0 && ip netns exec "$NS_HOME" ip addr add 10.99.0.2/24 dev vh0 \
    || return 1
  start_bg "$1/wanbridge.log" ip netns exec "$NS_WAN" "$WANBRIDGE" -a m0 -b m1 \
    -delay "$((RTT_MS * 500))us" -loss "$(awk -v p="$LOSS_PCT" 'BEGIN { print p / 100 }')" -duration 1h
  local i
  for i in $(seq 50); do C ping -c1 -W1 10.99.0.2 >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "wan bridge: 10.99.0.2 unreachable from $NS" >&2
  return 1
}
ns_down() {
  local ns pids
  for ns in $NS $NS-home $NS-wan; do
    ip netns list | awk '{print $1}' | grep -qx "$ns" || continue
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] && echo "warning: namespace $ns still has pids: $pids (not killed)" >&2
    ip netns del "$ns"
  done
}
build_wanbridge() {
  [ "$RTT_MS" = 0 ] && return 0
  # one given by WANBRIDGE or on PATH is used as it is; ours is rebuilt (cached) to match bench/wanbridge
  [ "$WANBRIDGE" != "$WORK/bin/wanbridge" ] && [ -x "$WANBRIDGE" ] && return 0
  install_deps ethtool:ethtool ping:iputils-ping
  mkdir -p "$WORK/bin" && (cd "$REPO_DIR" && go build -o "$WANBRIDGE" ./bench/wanbridge) || {
    echo "wanbridge: build of bench/wanbridge failed; put a wanbridge binary on PATH or set WANBRIDGE" >&2
    return 1
  }
}
cleanup() { stop_all; ns_down; }

# ------------------------------------------------------------------ third-party tools
# frp's module zip lacks the prebuilt web UI (web/*/dist, embedded with go:embed), so `go install`
# cannot build it; build from a copy of the module source with an empty UI, outside the repository.
install_frp() {
  [ -x "$FRP_BIN/frps" ] && [ -x "$FRP_BIN/frpc" ] && return 0
  local src=/tmp/frp-src-$FRP_VERSION mod
  (cd /tmp && go mod download github.com/fatedier/frp@"$FRP_VERSION") || return 1
  mod=$(go env GOMODCACHE)/github.com/fatedier/frp@$FRP_VERSION
  rm -rf "$src" && cp -r "$mod" "$src" && chmod -R u+w "$src" || return 1
  local w
  for w in frps frpc; do mkdir -p "$src/web/$w/dist" && echo '<html></html>' >"$src/web/$w/dist/index.html"; done
  mkdir -p "$FRP_BIN"
  (cd "$src" && go build -trimpath -o "$FRP_BIN/frps" ./cmd/frps && go build -trimpath -o "$FRP_BIN/frpc" ./cmd/frpc)
}

ssh_keys() { # host key, client key, authorized_keys: generated per run, under $OUT/ssh
  local k=$OUT/ssh
  [ -f "$k/id" ] && return 0
  mkdir -p "$k" && chmod 700 "$k"
  ssh-keygen -q -t ed25519 -N '' -f "$k/host" && ssh-keygen -q -t ed25519 -N '' -f "$k/id" \
    && cp "$k/id.pub" "$k/authorized_keys"
  mkdir -p /run/sshd # sshd's privilege-separation directory
  cat >"$k/sshd_config" <<EOF
Port 2222
ListenAddress $RELAY_HOST
HostKey $k/host
PidFile none
AuthorizedKeysFile $k/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding remote
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
EOF
}

natbox_keys() {
  local k=$OUT/keys
  [ -f "$k/relay.pub" ] && return 0
  mkdir -p "$k" && chmod 700 "$k"
  "$NATBOX" genkey >"$k/relay.key" && "$NATBOX" pubkey <"$k/relay.key" >"$k/relay.pub" \
    && "$NATBOX" genkey >"$k/app.key" && "$NATBOX" pubkey <"$k/app.key" >"$k/app.pub"
}

# ------------------------------------------------------------------ modes
start_servers() { # on the home side; with RTT_MS also on its line address, for `loopback`
  local d=$1 b=$LO
  [ -n "$NS_WAN" ] && b=0.0.0.0
  start_bg "$d/iperf3-server.log" ip netns exec "$NS_HOME" iperf3 -s -B $b -p 5201
  start_bg "$d/pmbench-server.log" ip netns exec "$NS_HOME" "$PMBENCH" server -echo $b:5301 -crr $b:5302 -uecho $b:5303 -lifetime 1h
}

frp_configs() { # frp_configs DIR MUX(true|false)
  cat >"$1/frps.toml" <<EOF
bindAddr = "$RELAY_HOST"
bindPort = 7000
proxyBindAddr = "$LO"
transport.tcpMux = $2
log.level = "warn"
EOF
  cat >"$1/frpc.toml" <<EOF
serverAddr = "$RELAY_HOST"
serverPort = 7000
transport.tcpMux = $2
log.level = "warn"

[[proxies]]
name = "iperf"
type = "tcp"
localIP = "$LO"
localPort = 5201
remotePort = 18080

[[proxies]]
name = "iperf-udp"
type = "udp"
localIP = "$LO"
localPort = 5201
remotePort = 18080

[[proxies]]
name = "echo"
type = "tcp"
localIP = "$LO"
localPort = 5301
remotePort = 18081

[[proxies]]
name = "crr"
type = "tcp"
localIP = "$LO"
localPort = 5302
remotePort = 18082

[[proxies]]
name = "uecho"
type = "udp"
localIP = "$LO"
localPort = 5303
remotePort = 18083
EOF
}

natbox_configs() { # natbox_configs DIR [TRANSPORT(udp|tcp|auto)]
  local k=$OUT/keys transport=${2:-udp}
  cat >"$1/relay.toml" <<EOF
[log]
level = "${NATBOX_LOG_LEVEL:-warn}"

[relay]
listen = "$RELAY_HOST:51820"
$([ "$transport" != udp ] && echo "tcp_listen = \"$RELAY_HOST:443\"")
private_key = "$(cat "$k/relay.key")"
address = "100.96.0.1"
$([ -n "${TUNNEL_MTU:-}" ] && echo "mtu = $TUNNEL_MTU
max_mtu = $TUNNEL_MTU")
public_bind = ["$LO"]
$([ -n "$NATBOX_TCP_CC" ] && echo "tcp_congestion = \"$NATBOX_TCP_CC\"")
${RELAY_EXTRA:-}
# One load generator is one source and the bench's one peer: the per-source
# budgets and per-peer quotas (flood defences) would cap it.
max_sessions_per_source = 0
new_sessions_per_source_per_second = 0
peer_max_sessions = 0
peer_max_udp_sessions = 0
peer_max_inflight = 0
peer_new_sessions_per_second = 0

[admin]
socket = "$1/relay.sock"

[[peer]]
name = "bench"
public_key = "$(cat "$k/app.pub")"
address = "100.96.0.2"
ports = ["tcp+udp/18080", "tcp/18081-18082", "udp/18083"]
EOF
  cat >"$1/natbox.toml" <<EOF
[log]
level = "${NATBOX_LOG_LEVEL:-warn}"

[uplink]
relay = "$RELAY_HOST:51820"
relay_public_key = "$(cat "$k/relay.pub")"
private_key = "$(cat "$k/app.key")"
address = "100.96.0.2"
relay_address = "100.96.0.1"
$([ -n "${TUNNEL_MTU:-}" ] && echo "mtu = $TUNNEL_MTU
max_mtu = $TUNNEL_MTU")
keepalive = "25s"
transport = "$transport"
relay_tcp = "$RELAY_HOST:443"
$([ -n "$NATBOX_TCP_CC" ] && echo "tcp_congestion = \"$NATBOX_TCP_CC\"")

[limits]
${APP_LIMITS_EXTRA:-}
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
listen = "18080"
target = "$LO:5201"

[[mapping]]
name = "echo"
protocol = "tcp"
listen = "18081"
target = "$LO:5301"

[[mapping]]
name = "crr"
protocol = "tcp"
listen = "18082"
target = "$LO:5302"

[[mapping]]
name = "uecho"
protocol = "udp"
listen = "18083"
target = "$LO:5303"
EOF
}

setup_relay_mode() { # sets T_HOST P_IPERF P_ECHO P_CRR P_UECHO RELAY_PIDS APP_PIDS
  local mode=$1 d=$2
  RELAY_PIDS=(); APP_PIDS=()
  T_HOST=$LO; P_IPERF=18080; P_ECHO=18081; P_CRR=18082; P_UECHO=18083
  case $mode in
    loopback)
      [ -n "$NS_WAN" ] && T_HOST=10.99.0.2 # the bare line
      P_IPERF=5201; P_ECHO=5301; P_CRR=5302; P_UECHO=5303 ;;
    natbox|natbox-tcp|natbox-auto)
      natbox_configs "$d" "$(case $mode in natbox-tcp) echo tcp ;; natbox-auto) echo auto ;; *) echo udp ;; esac)"
      if [ "${PROFILE:-0}" = 1 ]; then
        NATBOX_PPROF=$NB_PPROF_RELAY start_bg "$d/relay.log" ip netns exec "$NS" "$NATBOX" relay -c "$d/relay.toml"
      else
        NATBOX_HEAPPROFILE=${HEAPPROFILE:+$d/relay.heap} start_bg "$d/relay.log" ip netns exec "$NS" "$NATBOX" relay -c "$d/relay.toml"
      fi
      RELAY_PIDS+=("$LAST_PID")
      wait_listen udp 51820
      if [ "${PROFILE:-0}" = 1 ]; then
        NATBOX_PPROF=$NB_PPROF_APP start_bg "$d/natbox.log" ip netns exec "$NS_HOME" "$NATBOX" run -c "$d/natbox.toml"
      else
        NATBOX_HEAPPROFILE=${HEAPPROFILE:+$d/natbox.heap} start_bg "$d/natbox.log" ip netns exec "$NS_HOME" "$NATBOX" run -c "$d/natbox.toml"
      fi
      APP_PIDS+=("$LAST_PID") ;;
    frp|frp-nomux)
      local mux=true
      [ "$mode" = frp-nomux ] && mux=false
      frp_configs "$d" $mux
      start_bg "$d/frps.log" ip netns exec "$NS" "$FRP_BIN/frps" -c "$d/frps.toml"
      RELAY_PIDS+=("$LAST_PID")
      wait_listen tcp 7000 # frpc gives up at once if frps is not there yet (loginFailExit)
      start_bg "$d/frpc.log" ip netns exec "$NS_HOME" "$FRP_BIN/frpc" -c "$d/frpc.toml"
      APP_PIDS+=("$LAST_PID") ;;
    ssh)
      local k=$OUT/ssh
      start_bg "$d/sshd.log" ip netns exec "$NS" /usr/sbin/sshd -D -e -f "$k/sshd_config"
      RELAY_PIDS+=("$LAST_PID")
      wait_listen tcp 2222
      start_bg "$d/ssh.log" ip netns exec "$NS_HOME" ssh -N -F /dev/null -i "$k/id" -p 2222 \
        -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ExitOnForwardFailure=yes \
        -o ServerAliveInterval=30 \
        -R "$LO:18080:$LO:5201" -R "$LO:18081:$LO:5301" -R "$LO:18082:$LO:5302" root@$RELAY_HOST
      APP_PIDS+=("$LAST_PID") ;;
    *) echo "unknown relay mode $mode" >&2; return 1 ;;
  esac
}

tree_ticks() { # CPU ticks of the given roots and all their current descendants (sshd forks)
  [ $# -eq 0 ] && { echo 0; return; }
  local all=() p
  for p in "$@"; do all+=("$p"); all+=($(children_of "$p")); done
  "$PMBENCH" cpu -pids "$(IFS=,; echo "${all[*]}")"
}
cpu_snap() { # overrides the shared one: host /proc/stat, relay ticks, appliance ticks, time
  echo "$(head -1 /proc/stat | cut -d' ' -f2-) $(tree_ticks "${RELAY_PIDS[@]}") $(tree_ticks "${APP_PIDS[@]}") $(date +%s.%N)"
}

status_dump() { # status_dump MODE DIR NAME: with STATUS_DUMP=1, the kernel's counters of both sides'
  # namespaces (nstat: where a datagram was lost) and both natbox sides' status as JSON
  [ "${STATUS_DUMP:-0}" = 1 ] || return 0
  ip netns exec "$NS" nstat -asz >"$2/$3.nstat-relay.txt" 2>&1
  [ "$NS_HOME" = "$NS" ] || ip netns exec "$NS_HOME" nstat -asz >"$2/$3.nstat-home.txt" 2>&1
  [[ $1 == natbox* ]] || return 0
  "$NATBOX" status --json --socket "$2/relay.sock" >"$2/$3.relay-status.json" 2>&1
  "$NATBOX" status --json --socket "$2/natbox.sock" >"$2/$3.app-status.json" 2>&1
}

run_relay_mode() {
  local mode=$1 rep=$2
  local d=$OUT/raw/$mode/r$rep
  mkdir -p "$d"
  ns_up "$d" || { log "netns up failed"; return 1; }
  start_servers "$d"
  if ! setup_relay_mode "$mode" "$d" || ! wait_ready; then
    log "$mode r$rep: not ready, skipping: $(tail -c 300 "$d"/*.log 2>/dev/null | tr '\n' ' ')"
    cleanup; return 1
  fi
  local side pids
  for side in relay app; do
    if [ $side = relay ]; then pids=("${RELAY_PIDS[@]}"); else pids=("${APP_PIDS[@]}"); fi
    [ ${#pids[@]} -gt 0 ] || continue
    start_bg "$d/memwatch-$side.log" "$PMBENCH" memwatch -pids "$(IFS=,; echo "${pids[*]}")" -interval 500ms \
      -out "$d/mem-$side.json" -max-duration 30m
  done
  local t
  for t in $TESTS; do
    status_dump "$mode" "$d" "$t.before"
    case $t in
      tcp1) run_test "$d" tcp1 iperf3 -c "$T_HOST" -p "$P_IPERF" -t "$DUR" --connect-timeout 3000 -J ;;
      tcp4) run_test "$d" tcp4 iperf3 -c "$T_HOST" -p "$P_IPERF" -t "$DUR" -P 4 --connect-timeout 3000 -J ;;
      tcpR) run_test "$d" tcpR iperf3 -c "$T_HOST" -p "$P_IPERF" -t "$DUR" -R --connect-timeout 3000 -J ;;
      udp)
        if [ "$mode" = ssh ]; then echo '{"skipped": "ssh -R forwards TCP only"}' >"$d/udp.json"; continue; fi
        run_test "$d" udp iperf3 -c "$T_HOST" -p "$P_IPERF" -t "$DUR" -u -b "$UDP_RATE" -l "$UDP_LEN" --connect-timeout 3000 -J ;;
      crr) run_test "$d" crr "$PMBENCH" crr -addr "$T_HOST:$P_CRR" -workers "$CRR_WORKERS" -duration "${DUR}s" ;;
      rr) # over a WAN line pmbench's 200 warm-up round trips would take the whole test (10 s at 50 ms)
        run_test "$d" rr "$PMBENCH" rr -addr "$T_HOST:$P_ECHO" -duration "${RR_DUR}s" -count 20000 -size 64 \
          -warmup "$([ "$RTT_MS" -gt 0 ] && echo 10 || echo 200)" ;;
      udprr) # a game's or a call's UDP: 64-byte ping-pong (opt-in: TESTS="... udprr")
        if [ "$mode" = ssh ]; then echo '{"skipped": "ssh -R forwards TCP only"}' >"$d/udprr.json"; continue; fi
        run_test "$d" udprr "$PMBENCH" udprr -addr "$T_HOST:$P_UECHO" -duration "${RR_DUR}s" -count 20000 -size 64 ;;
    esac
    status_dump "$mode" "$d" "$t.after"
  done
  { echo "## ss -s"; C ss -s; } >"$d/state.txt" 2>&1
  cleanup
}

run_relay_profile() {
  local d=$OUT/raw-extra/profile
  mkdir -p "$d"
  log "profile: natbox relay + appliance ($PROFILE_MODE) during ${PROFILE_TESTS:-tcp1 tcpR}"
  ns_up "$d" && start_servers "$d"
  if PROFILE=1 setup_relay_mode "$PROFILE_MODE" "$d" && wait_ready; then
    local t
    for t in ${PROFILE_TESTS:-tcp1 tcpR}; do
      local rflag=() secs=$((DUR > 2 ? DUR - 1 : DUR))
      [ $t = tcpR ] && rflag=(-R)
      [ $t = tcp4 ] && rflag=(-P 4)
      profile_pid "$NS" "${RELAY_PIDS[0]}" "$secs" "$OUT/profiles" "natbox-relay-$t" "$NB_PPROF_RELAY" &
      local p1=$!
      profile_pid "$NS_HOME" "${APP_PIDS[0]}" "$secs" "$OUT/profiles" "natbox-app-$t" "$NB_PPROF_APP" &
      local p2=$!
      local cmd=(iperf3 -c $LO -p 18080 -t "$DUR" "${rflag[@]}" --connect-timeout 3000 -J)
      case $t in
        crr) cmd=("$PMBENCH" crr -addr "$LO:18082" -workers "$CRR_WORKERS" -duration "${DUR}s") ;;
        rr) cmd=("$PMBENCH" rr -addr "$LO:18081" -duration "${DUR}s" -count 1000000 -size 64) ;;
      esac
      sleep 0.5
      C timeout $((DUR + 20)) "${cmd[@]}" >"$d/$t.json" 2>"$d/$t.err"
      wait "$p1" "$p2"
    done
  else
    log "profile: natbox relay not ready"
  fi
  cleanup
}

record_relay_env() {
  record_env
  {
    natbox_version
    echo "relay <-> home round trip added: ${RTT_MS} ms; frames lost at random: ${LOSS_PCT} % each way"
    echo "receive GRO on the two ends of the line: $([ "$WAN_GRO" = 1 ] && echo on || echo off)"
    local host_cc natbox_cc
    host_cc="$(sysctl -n net.ipv4.tcp_congestion_control) (inherited from the host)"
    natbox_cc="natbox default ($(cd "$REPO_DIR" && awk -F'"' '/DefaultTCPCongestion *= /{print $2}' conf/validate.go))"
    echo "kernel TCP congestion control in the namespaces: ${TCP_CC:-$host_cc}; natbox tcp_congestion: ${NATBOX_TCP_CC:-$natbox_cc}"
    echo "frp $("$FRP_BIN/frps" --version 2>&1) ($FRP_VERSION, built from the module source, UI stubbed)"
    ssh -V 2>&1
    echo "ssh cipher: $(ssh -F /dev/null -G $LO 2>/dev/null | awk '/^ciphers /{print $2}' | cut -d, -f1) (default; first offered)"
  } >>"$OUT/env.txt" 2>&1
}

main() {
  mkdir -p "$OUT"
  [ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }
  install_deps iperf3:iperf3 sshd:openssh-server ssh:openssh-client perf:linux-perf curl:curl
  [ -x /usr/sbin/sshd ] || install_deps /usr/sbin/sshd:openssh-server
  build_tools
  build_wanbridge || exit 1
  if [[ " $MODES " == *" natbox"* ]] && ! { build_natbox && natbox_keys; }; then
    log "natbox: build or key generation failed; dropping its modes"; MODES=${MODES//natbox-tcp/}; MODES=${MODES//natbox-auto/}; MODES=${MODES//natbox/}
  fi
  if [[ " $MODES " == *" frp"* ]] && ! install_frp; then
    log "frp: build failed; dropping its modes"; MODES=${MODES//frp-nomux/}; MODES=${MODES//frp/}
  fi
  if [[ " $MODES " == *" ssh "* ]] && ! ssh_keys; then
    log "ssh: key generation failed; dropping the mode"; MODES=${MODES//ssh/}
  fi
  record_relay_env
  log "relay run $RUN_ID -> $OUT (REPS=$REPS DUR=$DUR RTT_MS=$RTT_MS modes: $MODES)"
  local rep mode
  for rep in $(seq "$REPS"); do
    for mode in $MODES; do
      log "rep $rep mode $mode"
      run_relay_mode "$mode" "$rep"
    done
  done
  if [[ " $MODES " == *" $PROFILE_MODE "* ]] && [ "${SKIP_PROFILE:-0}" != 1 ]; then run_relay_profile; fi
  python3 "$NB_BENCH_DIR/summarize.py" relay "$OUT" | tee "$OUT/summary.md"
  log "done: $OUT"
}

main "$@"
