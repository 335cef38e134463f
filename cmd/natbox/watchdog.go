package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"time"
)

// shutdownSlack is how long a stop may take beyond the configured drain grace.
const shutdownSlack = 10 * time.Second

// runWithShutdownWatchdog runs run; once ctx is done (SIGINT/SIGTERM), run
// must return within grace + shutdownSlack. If it does not, every
// goroutine's stack goes to w, so the hang can be diagnosed, and exit ends the
// process with code 1: a supervisor asked natbox to stop, and a stop that
// hangs is worse than one that fails loudly.
func runWithShutdownWatchdog(ctx context.Context, grace time.Duration, w io.Writer, exit func(int), run func() error) error {
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-done:
			return
		case <-ctx.Done():
		}
		t := time.NewTimer(grace + shutdownSlack)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
			fmt.Fprintf(w, "natbox: shutdown did not finish within %v; goroutines follow (please report this)\n", grace+shutdownSlack)
			pprof.Lookup("goroutine").WriteTo(w, 2)
			exit(exitRuntime)
		}
	}()
	return run()
}

var osExit = os.Exit
