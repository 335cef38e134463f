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
