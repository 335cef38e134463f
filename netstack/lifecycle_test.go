package netstack

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/internal/testutil"
)

// runStack runs s until the test ends; the cleanup closes it and waits for
// Run to return. A test that closes s itself may do so before Run starts,
// which then returns ErrClosed.
func runStack(t testing.TB, s *Stack) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil && !errors.Is(err, ErrClosed) {
			t.Errorf("stack Run: %v", err)
		}
	})
}

func newLifecycleStack(t *testing.T) *Stack {
	t.Helper()
	a, _ := Pipe(1500)
	s, err := New(a, Config{Addresses: []netip.Prefix{serverPrefix4}}, funcHandler{}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestStackLifecycle: New starts none of our goroutines (gVisor's own are
// allowed: stack.New starts them), Close is idempotent before Run and
// concurrently, Run after Close fails at once, and Run returns only after
// every goroutine it started has stopped.
func TestStackLifecycle(t *testing.T) {
	t.Run("new starts nothing", func(t *testing.T) { testutil.CheckNewStartsNothing(t, newLifecycleStack) })
	t.Run("close before run", func(t *testing.T) {
		testutil.CheckCloseBeforeRun(t, newLifecycleStack, func(err error) bool { return errors.Is(err, ErrClosed) })
	})
	t.Run("run returns after its goroutines", func(t *testing.T) {
		before := testutil.Goroutines()
		s := newLifecycleStack(t)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		testutil.WaitGoroutines(t, before, 3) // both pumps and the cookie sweep
		if err := s.Run(ctx); !errors.Is(err, ErrRunning) {
			t.Fatalf("second Run = %v; want ErrRunning", err)
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
	t.Run("close ends run", func(t *testing.T) {
		before := testutil.Goroutines()
		s := newLifecycleStack(t)
		done := make(chan error, 1)
		go func() { done <- s.Run(context.Background()) }()
		testutil.WaitGoroutines(t, before, 3)
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() { s.Close() })
		}
		wg.Wait()
		if err := <-done; err != nil {
			t.Fatalf("Run ended by Close: %v", err)
		}
		testutil.WaitGoroutines(t, before, 0)
	})
}
