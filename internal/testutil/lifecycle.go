package testutil

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"
)

// Lifecycle is a component under the contract every natbox component keeps
// (ARCHITECTURE.md, "Lifecycle and close order"): New only builds, Run
// starts and returns once what it started has stopped, Close is idempotent.
type Lifecycle interface {
	Run(context.Context) error
	Close() error
}

// CheckNewStartsNothing fails t if build starts any of natbox's own
// goroutines (third-party ones are allowed; see GoroutineSet).
func CheckNewStartsNothing[C Lifecycle](t *testing.T, build func(*testing.T) C) {
	t.Helper()
	before := Goroutines()
	c := build(t)
	defer c.Close()
	if extra := Goroutines().Started(before); len(extra) > 0 {
		t.Fatalf("New started goroutines:\n%s", strings.Join(extra, "\n\n"))
	}
}

// CheckCloseBeforeRun closes a fresh component three times at once and once
// more, then checks that Run fails at once with an error closed accepts.
func CheckCloseBeforeRun[C Lifecycle](t *testing.T, build func(*testing.T) C, closed func(error) bool) {
	t.Helper()
	c := build(t)
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() { c.Close() })
	}
	wg.Wait()
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.Run(ctx); !closed(err) {
		t.Fatalf("Run after Close = %v; want the closed error", err)
	}
	if ctx.Err() != nil {
		t.Fatal("Run after Close waited for its context")
	}
}
