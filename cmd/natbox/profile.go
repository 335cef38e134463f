package main

import (
	"fmt"
	"os"
	"runtime/pprof"
)

// cpuProfileEnv names a file "natbox run" writes a CPU profile to, from
// start until exit: for benchmarks (bench/flood.sh), not for operators.
const cpuProfileEnv = "NATBOX_CPUPROFILE"

// startCPUProfile starts CPU profiling to path when it is not empty; the
// returned stop writes and closes the profile.
func startCPUProfile(path string) (stop func() error, err error) {
	if path == "" {
		return func() error { return nil }, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", cpuProfileEnv, err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", cpuProfileEnv, err)
	}
	return func() error {
		pprof.StopCPUProfile()
		return f.Close()
	}, nil
}
