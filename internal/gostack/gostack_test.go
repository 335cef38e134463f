package gostack_test

import (
	"runtime/debug"
	"testing"

	"github.com/natbox/natbox/internal/gostack"
	"github.com/natbox/natbox/internal/testutil"
)

func TestGrow(t *testing.T) {
	// A GC between Grow and the deep call may shrink the stack back: none
	// while this runs.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	moved := make(chan bool)
	go func() { moved <- testutil.StackMoves(func() {}) }()
	if !<-moved {
		t.Skip("a new goroutine's stack already holds 6 KiB (adaptive start size); nothing to measure")
	}
	go func() { moved <- testutil.StackMoves(gostack.Grow) }()
	if <-moved {
		t.Fatal("the stack was copied again after Grow")
	}
}
