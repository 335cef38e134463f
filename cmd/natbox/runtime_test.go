package main

import (
	"runtime"
	"strconv"
	"testing"

	"go.uber.org/zap/zaptest"
)

// TestGCPercent: tunnel processes collect at GOGC=30, gateways at 75,
// unless GOGC is set.
func TestGCPercent(t *testing.T) {
	for _, c := range []struct {
		env    string
		tunnel bool
		want   int
	}{
		{"", true, tunnelGCPercent},
		{"", false, gatewayGCPercent},
		{"200", true, 0},
		{"off", true, 0},
	} {
		if got := gcPercent(c.env, c.tunnel); got != c.want {
			t.Errorf("gcPercent(%q, %v) = %d, want %d", c.env, c.tunnel, got, c.want)
		}
	}
}

// TestProcs: a tunnel process gets half the CPUs, at least one; a gateway
// two where there are two, half on a larger host; the config or GOMAXPROCS
// overrides either.
func TestProcs(t *testing.T) {
	for _, c := range []struct {
		env              string
		configured, cpus int
		tunnel           bool
		want             int
	}{
		{"", 0, 1, true, 1},
		{"", 0, 2, true, 1},
		{"", 0, 3, true, 1},
		{"", 0, 8, true, 4},
		{"", 0, 1, false, 1},
		{"", 0, 2, false, 2},
		{"", 0, 3, false, 2},
		{"", 0, 8, false, 4},
		{"", 3, 2, true, 3},
		{"", 1, 2, false, 1},
		{"2", 3, 8, false, 0},
	} {
		if got := procs(c.env, c.configured, c.cpus, c.tunnel); got != c.want {
			t.Errorf("procs(%q, %d, %d, %v) = %d, want %d", c.env, c.configured, c.cpus, c.tunnel, got, c.want)
		}
	}
}

// TestSetProcs: the runtime runs with the procs set, and GOMAXPROCS in the
// environment keeps Go's.
func TestSetProcs(t *testing.T) {
	old := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(old) })
	t.Setenv("GOMAXPROCS", "")
	setProcs(old+1, false, zaptest.NewLogger(t))
	if got := runtime.GOMAXPROCS(0); got != old+1 {
		t.Fatalf("GOMAXPROCS = %d after setProcs(%d)", got, old+1)
	}
	t.Setenv("GOMAXPROCS", strconv.Itoa(old))
	setProcs(old+2, false, zaptest.NewLogger(t))
	if got := runtime.GOMAXPROCS(0); got != old+1 {
		t.Fatalf("GOMAXPROCS = %d with GOMAXPROCS in the environment; want it left at %d", got, old+1)
	}
}
