package main

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestShutdownWatchdog(t *testing.T) {
	// A run that stops in time is left alone.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	exited := make(chan int, 1)
	err := runWithShutdownWatchdog(ctx, 0, &bytes.Buffer{}, func(code int) { exited <- code }, func() error { return nil })
	if err != nil || len(exited) != 0 {
		t.Fatalf("prompt stop: err %v, exit called %d times", err, len(exited))
	}

	// A run that hangs past grace + slack gets a goroutine dump and exit 1.
	var mu sync.Mutex
	var out bytes.Buffer
	w := writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return out.Write(p) })
	release := make(chan struct{})
	go runWithShutdownWatchdog(ctx, -shutdownSlack+50*time.Millisecond, w, func(code int) { exited <- code; close(release) },
		func() error { <-release; return nil })
	select {
	case code := <-exited:
		if code != exitRuntime {
			t.Fatalf("exit code %d, want %d", code, exitRuntime)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watchdog did not fire on a hung shutdown")
	}
	mu.Lock()
	defer mu.Unlock()
	if s := out.String(); !strings.Contains(s, "shutdown did not finish") || !strings.Contains(s, "goroutine ") {
		t.Fatalf("watchdog output lacks the message or the stacks:\n%.300s", s)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
