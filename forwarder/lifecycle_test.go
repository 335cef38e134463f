package forwarder

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/testutil"
)

// TestEngineLifecycle: New starts no goroutine, Close is idempotent before
// Run and concurrently, Run after Close fails at once, and Run returns only
// after the engine's goroutines (a live session's splice included) stopped.
func TestEngineLifecycle(t *testing.T) {
	echo := tcpEcho(t)
	cfg := config(mapping("web", conf.TCP, "80", "127.0.0.1:"+itoa(echo)))
	build := func(t *testing.T) *Engine {
		e, err := New(cfg, Options{SweepInterval: time.Millisecond}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	t.Run("new starts nothing", func(t *testing.T) { testutil.CheckNewStartsNothing(t, build) })
	t.Run("close before run", func(t *testing.T) {
		testutil.CheckCloseBeforeRun(t, build, func(err error) bool { return errors.Is(err, ErrStopped) })
	})
	t.Run("run returns after its goroutines", func(t *testing.T) {
		before := testutil.Goroutines()
		e := build(t)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- e.Run(ctx) }()
		f := startTCP(t, e, newIngress(conf.IngressTUN), "203.0.113.1:1", "198.51.100.1:80")
		if f.wait(t) != "accepted" {
			t.Fatal("flow rejected")
		}
		expectEcho(t, f.client, "live session")
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("Run: %v", err)
		}
		<-f.done // HandleTCP returned: Run closed the engine
		testutil.WaitGoroutines(t, before, 0)
		if err := e.Run(context.Background()); !errors.Is(err, ErrStopped) {
			t.Fatalf("Run after Run = %v; want ErrStopped", err)
		}
	})
}
