package admin

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/testutil"
)

// TestServerLifecycle: NewServer only opens its listeners (no goroutine),
// Close is idempotent before Run and concurrently, Run after Close fails at
// once, and Run returns only after its goroutines (servers, sampler) stopped.
func TestServerLifecycle(t *testing.T) {
	build := func(t *testing.T) *Server {
		s, err := NewServer(conf.Admin{Socket: socketPath(t), Listen: "127.0.0.1:0"},
			&fakeSource{status: sampleStatus()}, Options{}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	t.Run("new starts nothing", func(t *testing.T) { testutil.CheckNewStartsNothing(t, build) })
	t.Run("close before run", func(t *testing.T) {
		testutil.CheckCloseBeforeRun(t, build, func(err error) bool { return errors.Is(err, ErrClosed) })
	})
	t.Run("run returns after its goroutines", func(t *testing.T) {
		before := testutil.Goroutines()
		s := build(t)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		// Served: /healthz answers (Run started its servers and sampler).
		deadline := time.Now().Add(10 * time.Second)
		for {
			resp, err := http.Get("http://" + s.Addr().String() + "/healthz")
			if err == nil {
				resp.Body.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("healthz: %v", err)
			}
			time.Sleep(5 * time.Millisecond)
		}
		if len(testutil.Goroutines().Started(before)) == 0 {
			t.Fatal("Run serves with no goroutine of its own: the check below proves nothing")
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("Run: %v", err)
		}
		testutil.WaitGoroutines(t, before, 0)
		if err := s.Close(); err != nil {
			t.Fatalf("Close after Run: %v", err)
		}
	})
}
