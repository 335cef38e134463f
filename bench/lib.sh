# lib.sh - sourced by run.sh and relay.sh; not run on its own.
#
# Reuses the shared baseline harness instead of copying it: ../shared/bench/run-baselines.sh is
# sourced without its final `main "$@"` line, so its process bookkeeping (start_bg, stop_pid,
# stop_all: PIDs only, never names), per-test accounting (run_test, cpu_snap, bg_probe), readiness
# probe (wait_ready), the baseline modes (setup_mode: direct nftdnat socat haproxy) and the per-mode
# loop (run_mode) are the very code that produced shared/bench/BASELINES.md. Our scripts override
# only what natbox adds (a mode, tests, a summary) by redefining functions after the source.
#
# Expects NB_BENCH_DIR (this directory) to be set by the caller.

REPO_DIR=$(cd "$NB_BENCH_DIR/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$REPO_DIR/../shared/bench" 2>/dev/null && pwd)}
if [ -z "$SHARED_BENCH" ] || [ ! -f "$SHARED_BENCH/run-baselines.sh" ]; then
  echo "shared harness not found: expected ../shared/bench beside the repository (or set SHARED_BENCH)" >&2
  exit 1
fi

# NB_NETNS=PREFIX names the namespaces PREFIX-client, PREFIX-gw, PREFIX-server instead of pm-*, so
# one harness (bench/flood.sh) cannot tear down the namespaces of another running at the same time.
NS_C=pm-client NS_G=pm-gw NS_S=pm-server
if [ -n "${NB_NETNS:-}" ]; then NS_C=$NB_NETNS-client NS_G=$NB_NETNS-gw NS_S=$NB_NETNS-server; fi
ns_rename() { sed -e "s/pm-client/$NS_C/g; s/pm-gw/$NS_G/g; s/pm-server/$NS_S/g"; }

# shellcheck disable=SC1090
source <(sed '/^main "\$@"$/d' "$SHARED_BENCH/run-baselines.sh" | ns_rename)
# BASH_SOURCE inside a process substitution is /dev/fd/N: point the paths back at shared/bench.
BENCH_DIR=$SHARED_BENCH
TOPO=$SHARED_BENCH/netns-topo.sh
if [ "$NS_G" != pm-gw ]; then
  mkdir -p "$WORK" && TOPO=$WORK/netns-topo.sh
  ns_rename <"$SHARED_BENCH/netns-topo.sh" >"$TOPO" && chmod +x "$TOPO"
fi

NATBOX=${NATBOX:-$WORK/bin/natbox}

# Packages the benchmarks need; installed here, never by CI (CI does not run benchmarks).
install_deps() { # install_deps CMD:PKG ...
  local need=() p
  for p in "$@"; do command -v "${p%%:*}" >/dev/null || need+=("${p#*:}"); done
  [ ${#need[@]} -eq 0 ] && return 0
  echo "installing ${need[*]}" >&2
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
}

# Builds the committed HEAD (git archive), not the working tree: other people edit it while a
# run goes on, and a figure must name the code it measured. NATBOX=/path/to/binary skips the build.
build_natbox() {
  if [ -n "${NATBOX_PREBUILT:-}" ]; then NATBOX=$NATBOX_PREBUILT; return 0; fi
  local src=$WORK/src
  rm -rf "$src" && mkdir -p "$src" "$WORK/bin" || return 1
  git -C "$REPO_DIR" archive HEAD | tar -x -C "$src" || return 1
  NATBOX_COMMIT=$(git -C "$REPO_DIR" log -1 --format='%h %cd' --date=iso-strict)
  (cd "$src" && go build -trimpath -ldflags "-X main.version=bench-${NATBOX_COMMIT%% *}" -o "$NATBOX" ./cmd/natbox)
}

natbox_version() {
  echo "natbox $("$NATBOX" --version 2>/dev/null | head -1) (commit ${NATBOX_COMMIT:-prebuilt binary $NATBOX})"
}

# cpu profile of PID for SECS seconds into OUTDIR/NAME.*: Go pprof when the process serves it
# (natbox with NATBOX_PPROF=ADDR set when it was started), and perf (cpu-clock, call graphs) when
# it works on this kernel. Run in the background around a load; bounded by SECS.
profile_pid() { # profile_pid NETNS PID SECS OUTDIR NAME PPROF_ADDR
  local ns=$1 pid=$2 secs=$3 dir=$4 name=$5 addr=${6:-} waitfor=()
  mkdir -p "$dir"
  if [ -n "$addr" ]; then
    ip netns exec "$ns" timeout $((secs + 10)) curl -s -o "$dir/$name.pprof" \
      "http://$addr/debug/pprof/profile?seconds=$secs" &
    waitfor+=($!)
  fi
  if command -v perf >/dev/null; then
    timeout $((secs + 10)) perf record -q -e cpu-clock -F 499 -g -p "$pid" -o "$dir/$name.perf.data" -- sleep "$secs" \
      >"$dir/$name.perf.log" 2>&1 &
    waitfor+=($!)
  fi
  [ ${#waitfor[@]} -gt 0 ] && wait "${waitfor[@]}" # only our own jobs: the servers run in the background too
  if [ -s "$dir/$name.pprof" ] && go tool pprof -top -nodecount=40 "$NATBOX" "$dir/$name.pprof" >"$dir/$name.pprof.top.txt" 2>/dev/null; then
    :
  else
    rm -f "$dir/$name.pprof"
  fi
  if [ -s "$dir/$name.perf.data" ]; then
    perf report -i "$dir/$name.perf.data" --stdio --no-children --sort dso,symbol 2>/dev/null \
      | grep -E "^ +[0-9.]+%" | sed -E "s/[ -]+$//" | head -60 >"$dir/$name.perf.top.txt"
    # inclusive (with callees) view: which Go/kernel paths the self time above belongs to
    perf report -i "$dir/$name.perf.data" --stdio --children --sort symbol -g none 2>/dev/null \
      | grep -E "^ +[0-9.]+%" | sed -E "s/[ -]+$//" | head -200 >"$dir/$name.perf.children.txt"
    [ "${KEEP_PERF:-0}" = 1 ] || rm -f "$dir/$name.perf.data"
  fi
}
