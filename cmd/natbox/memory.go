package main

import (
	"os"
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

// tunnelGCPercent is the collector's GOGC for a process that carries a
// relay tunnel (the relay, an appliance with an uplink): its heap is
// mostly short-lived packet buffers, and 50 instead of Go's 100 lowered
// the peak RSS of the relay benchmarks by 10-20 % at no measurable CPU
// cost (tunnel/BENCH.md).
const tunnelGCPercent = 50

// gcPercent is the GOGC to set, or 0 to leave Go's: GOGC in the
// environment wins, and only tunnel processes change it.
func gcPercent(env string, tunnel bool) int {
	if env != "" || !tunnel {
		return 0
	}
	return tunnelGCPercent
}

// setTunnelGC applies gcPercent to the runtime.
func setTunnelGC(tunnel bool, log *zap.Logger) {
	if p := gcPercent(os.Getenv("GOGC"), tunnel); p > 0 {
		debug.SetGCPercent(p)
		log.Debug("gc percent set for the tunnel", zap.Int("gogc", p))
	}
}
