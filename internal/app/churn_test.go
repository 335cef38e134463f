package app_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/app"
)

// churnConns is how many connections TestConnectionChurn makes:
// NATBOX_CHURN_CONNS if set, else 100k, or 6k under -race or -short (-race
// is about ten times slower through two gVisor stacks and the forwarder, so
// 6k keeps CI's -race run near 20 s; every source port is still reused).
func churnConns(t *testing.T) int {
	if s := os.Getenv("NATBOX_CHURN_CONNS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("NATBOX_CHURN_CONNS=%q: want a positive integer", s)
		}
		return n
	}
	if raceEnabled || testing.Short() {
		return 6_000
	}
	return 100_000
}

// TestConnectionChurn is the TIME_WAIT trap of ARCHITECTURE.md through the
// whole appliance: the target closes first, so natbox's side of each client
// connection closes first and sits in TIME_WAIT, while clients keep reusing
// a few thousand source ports. Every connection must succeed.
func TestConnectionChurn(t *testing.T) {
	const (
		workers   = 48 // under max_inflight_per_source (64): no refusal is expected
		ports     = 2000
		firstPort = 20000
	)
	total := churnConns(t)
	// The target answers one byte and closes first.
	target := serveTCP(t, func(c *net.TCPConn) {
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err == nil {
			c.Write(b)
		}
	})
	h := newHarness(t, spec{Mappings: mapping("churn", "tcp", "8200", target.String())}, app.Options{})
	dst := ap(public4, 8200)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Second)
	defer cancel()
	var next, failures atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := next.Add(1) - 1
				if i >= int64(total) {
					return
				}
				src := ap(client4, uint16(firstPort+i%ports)) // round-robin over the ports
				if err := churnOnce(ctx, h, src, dst); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Errorf("connection %d from %s: %w", i, src, err))
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	started := min(next.Load(), int64(total))
	t.Logf("%d connections through one mapping from %d source ports in %v: %.0f conn/s",
		started, ports, el.Round(time.Millisecond), float64(started)/el.Seconds())
	if n := failures.Load(); n != 0 {
		t.Fatalf("%d of %d connections failed; first: %v", n, started, firstErr.Load())
	}
	if ctx.Err() != nil {
		t.Fatalf("churn did not finish in time: %d of %d started", started, total)
	}
	waitFor(t, 10*time.Second, "every churn session to close", func() bool { return h.mappingStatus("churn").SessionsActive == 0 })
	m := h.mappingStatus("churn")
	if m.SessionsOpened != uint64(total) || m.BytesIn != uint64(total) || m.BytesOut != uint64(total) || anyRefusal(m.Refusals) {
		t.Fatalf("opened %d, bytes in %d, out %d, refusals %v; want %d, %d, %d, none",
			m.SessionsOpened, m.BytesIn, m.BytesOut, m.Refusals, total, total, total)
	}
}

func churnOnce(ctx context.Context, h *harness, src, dst netip.AddrPort) error {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := h.client.DialTCP(dctx, src, dst)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{'x'}); err != nil {
		return err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if string(b) != "x" {
		return fmt.Errorf("reply %q, want x", b)
	}
	return nil
}
