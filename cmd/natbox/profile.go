package main

import (
	"fmt"
	"os"
	"runtime/metrics"
	"runtime/pprof"
	"time"
)

// cpuProfileEnv names a file "natbox run" or "natbox relay" writes a CPU profile to, from
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

// heapProfileEnv names a file natbox writes a heap profile to each time its
// heap reaches a new peak (10 % above the last one written): where the
// memory was at the worst moment of a benchmark. For benchmarks, not for
// operators.
const heapProfileEnv = "NATBOX_HEAPPROFILE"

// startHeapProfile samples the heap every interval and rewrites path at
// each new peak until stop is called. An empty path does nothing.
func startHeapProfile(path string, interval time.Duration) (stop func(), err error) {
	if path == "" {
		return func() {}, nil
	}
	if err := writeHeapProfile(path); err != nil {
		return nil, fmt.Errorf("%s: %w", heapProfileEnv, err)
	}
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		var written uint64
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			metrics.Read(s)
			if v := s[0].Value.Uint64(); v > written+written/10 {
				if writeHeapProfile(path) == nil {
					written = v
				}
			}
			select {
			case <-quit:
				return
			case <-t.C:
			}
		}
	}()
	return func() { close(quit); <-done }, nil
}

func writeHeapProfile(path string) error {
	f, err := os.Create(path + ".tmp")
	if err != nil {
		return err
	}
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(path+".tmp", path)
}
