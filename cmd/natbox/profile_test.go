package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestStartCPUProfileWritesAProfile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpu.pprof")
	stop, err := startCPUProfile(path)
	if err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(50 * time.Millisecond); time.Now().Before(end); {
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 2 || b[0] != 0x1f || b[1] != 0x8b { // pprof profiles are gzipped protobufs
		t.Fatalf("profile of %d bytes does not start with gzip magic", len(b))
	}
	if _, err := startCPUProfile(filepath.Join(t.TempDir(), "no", "such", "dir")); err == nil {
		t.Fatal("a profile path that cannot be created was accepted")
	}
}

func TestStartHeapProfileWritesPeaks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "heap.pprof")
	stop, err := startHeapProfile(path, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	first, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	// Grow the heap well past the first profile's peak: a new one follows.
	var hold [][]byte
	deadline := time.Now().Add(10 * time.Second)
	for {
		if len(hold) < 256 {
			hold = append(hold, make([]byte, 1<<20))
		}
		if fi, err := os.Stat(path); err == nil && !fi.ModTime().Equal(first.ModTime()) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new profile while the heap grew by %d MiB", len(hold))
		}
		time.Sleep(2 * time.Millisecond)
	}
	stop()
	b, err := os.ReadFile(path)
	if err != nil || len(b) < 2 || b[0] != 0x1f || b[1] != 0x8b {
		t.Fatalf("heap profile unreadable or not gzip (%d bytes, %v)", len(b), err)
	}
	if _, err := startHeapProfile(filepath.Join(t.TempDir(), "no", "such", "dir"), time.Millisecond); err == nil {
		t.Fatal("a profile path that cannot be created was accepted")
	}
}
