package forwarder

import (
	"context"
	"errors"
	"strings"
	"sync"
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
	t.Run("new starts nothing", func(t *testing.T) {
		before := testutil.Goroutines()
		e := build(t)
		defer e.Close()
		if extra := testutil.Goroutines().Started(before); len(extra) > 0 {
			t.Fatalf("New started goroutines:\n%s", strings.Join(extra, "\n\n"))
		}
	})
	t.Run("close before run", func(t *testing.T) {
		e := build(t)
		var wg sync.WaitGroup
		for range 3 {
			wg.Go(func() { e.Close() })
		}
		wg.Wait()
		if err := e.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.Run(ctx); !errors.Is(err, ErrStopped) {
			t.Fatalf("Run after Close = %v; want ErrStopped", err)
		}
		if ctx.Err() != nil {
			t.Fatal("Run after Close waited for its context")
		}
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
