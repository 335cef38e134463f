package main

import (
	"os"
	"runtime"
	"runtime/debug"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

// setMemoryLimit applies the config's soft memory limit (limits.memory_limit,
// relay.memory_limit) to the Go runtime: near it the garbage collector runs
// more often instead of letting the heap grow to twice the live data. It is
// a guard, not the bound: buffer_memory bounds the buffers, and a limit
// below the live heap would only make the collector run without pause.
// GOMEMLIMIT in the environment wins.
func setMemoryLimit(limit conf.Size, log *zap.Logger) {
	if os.Getenv("GOMEMLIMIT") != "" {
		log.Info("memory limit from GOMEMLIMIT", zap.Int64("bytes", debug.SetMemoryLimit(-1)))
		return
	}
	if limit <= 0 {
		return
	}
	debug.SetMemoryLimit(int64(limit))
	log.Info("memory limit set", zap.Int64("bytes", int64(limit)))
}

// The collector's GOGC (Go's default is 100). A process that carries a
// relay tunnel (the relay, an appliance with an uplink) runs at 30: its
// heap is mostly short-lived, pointer-free packet buffers, cheap to mark;
// 50 lowered the peak RSS of the relay benchmarks by 10-20 % against 100,
// and 30 by another 10-15 % once bulk connections got larger windows, at
// CPU per byte within noise (tunnel/BENCH.md, changes 6 and 8). A gateway runs at 75: its heap under connection churn
// is mostly per-connection state, and in bench/run.sh 75 took the peak RSS
// from 58-76 to 52-57 MiB (the 64 MiB target) for a few percent of
// conn/s, where 50 cost about 10 % (netstack/BENCH.md, "GOGC").
const (
	tunnelGCPercent  = 30
	gatewayGCPercent = 75
)

// gcPercent is the GOGC to set, or 0 to leave Go's: GOGC in the
// environment wins.
func gcPercent(env string, tunnel bool) int {
	switch {
	case env != "":
		return 0
	case tunnel:
		return tunnelGCPercent
	default:
		return gatewayGCPercent
	}
}

// setGC applies gcPercent to the runtime.
func setGC(tunnel bool, log *zap.Logger) {
	if p := gcPercent(os.Getenv("GOGC"), tunnel); p > 0 {
		debug.SetGCPercent(p)
		log.Debug("gc percent set", zap.Int("gogc", p), zap.Bool("tunnel", tunnel))
	}
}

// procs is the GOMAXPROCS to set, or 0 to leave Go's: GOMAXPROCS in the
// environment wins, then the config's procs. By default a process that
// carries a relay tunnel (tunnel: the relay, an appliance with an uplink)
// gets half of cpus (Go's own default: the CPUs the process may use), at
// least one; a gateway gets two where there are two, and half of cpus on
// a larger host.
//
// A relayed packet wakes goroutines in turn (the input pump, gVisor's TCP
// processor, the splice); while a P is idle, Go hands each to another
// thread, a cross-CPU wakeup per hand-off. One P instead of two took the
// relay's round trip from 473-536 to 243-284 us on the AMD bench host at
// the same throughput, and a second P still buys the relay nothing on the
// Intel one (netstack/BENCH.md, "One P"). A gateway's download is different:
// its socket reads and TUN writes are raw system calls that keep their P
// (internal/rawsock, netstack/tun_linux.go), so with one P the flow's ACKs
// and the next read wait behind each write; two Ps took the gateway's -R
// from 14.2-15.5 to 19.5-21.6 Gbit/s at the same round trip and conn/s, for
// a fifth of a single upload on a host whose two vCPUs also ran the client
// and the target (netstack/BENCH.md, "Two Ps for the gateway").
func procs(env string, configured, cpus int, tunnel bool) int {
	switch {
	case env != "":
		return 0
	case configured > 0:
		return configured
	case tunnel:
		return max(1, cpus/2)
	default:
		return min(cpus, max(2, cpus/2))
	}
}

// setProcs applies procs to the runtime.
func setProcs(configured int, tunnel bool, log *zap.Logger) {
	cpus := runtime.GOMAXPROCS(0)
	if n := procs(os.Getenv("GOMAXPROCS"), configured, cpus, tunnel); n > 0 {
		runtime.GOMAXPROCS(n)
		log.Info("procs set", zap.Int("procs", n), zap.Int("cpus", cpus))
	}
}
