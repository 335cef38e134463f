package app_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/testutil"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/internal/app"
)

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
	// 6k under -race keeps CI near 20 s; every source port is still reused.
	total := testutil.ChurnCount(t, "NATBOX_CHURN_CONNS", 100_000, 6_000, raceEnabled)
	// The target answers one byte and closes first.
	target := serveTCP(t, func(c *net.TCPConn) {
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err == nil {
			c.Write(b)
		}
	})
	// One client opens thousands of connections a second, and on a loaded
	// machine natbox's side of them may close later than the client's: the
	// per-source budgets (flood defences) are not what this test is about.
	h := newHarness(t, spec{
		Limits:   "new_sessions_per_source_per_second = 0\nmax_tcp_sessions_per_source = 0",
		Mappings: mapping("churn", "tcp", "8200", target.String()),
	}, app.Options{})
	dst := ap(public4, 8200)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Second)
	defer cancel()
	res := testutil.Churn(ctx, total, workers, ports, firstPort, func(ctx context.Context, port uint16) error {
		return churnOnce(ctx, h, ap(client4, port), dst)
	})
	t.Logf("%d connections through one mapping from %d source ports in %v: %.0f conn/s",
		res.Started, ports, res.Elapsed.Round(time.Millisecond), res.Rate())
	if res.Failures != 0 {
		t.Fatalf("%d of %d connections failed; first: %v; refusals %v", res.Failures, res.Started, res.FirstErr, h.mappingStatus("churn").Refusals)
	}
	if ctx.Err() != nil {
		t.Fatalf("churn did not finish in time: %d of %d started", res.Started, total)
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
	return testutil.OneByteExchange(c)
}

// TestTimeWaitBoundsClosedEndpoints churns 2000 connections through the
// appliance, whose side closes first (the target does), so each one leaves
// a closed endpoint in natbox's stack: they are gone about a second
// (stackTimeWait) after the churn, not gVisor's 60 s later, so connection
// churn cannot pile up memory.
func TestTimeWaitBoundsClosedEndpoints(t *testing.T) {
	const total, workers, ports, firstPort = 2000, 32, 2000, 24000
	target := serveTCP(t, func(c *net.TCPConn) {
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err == nil {
			c.Write(b)
		}
	})
	h := newHarness(t, spec{
		Limits:   "new_sessions_per_source_per_second = 0\nmax_tcp_sessions_per_source = 0",
		Mappings: mapping("churn", "tcp", "8201", target.String()),
	}, app.Options{})
	h.run()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res := testutil.Churn(ctx, total, workers, ports, firstPort, func(ctx context.Context, port uint16) error {
		return churnOnce(ctx, h, ap(client4, port), ap(public4, 8201))
	})
	if res.Failures != 0 {
		t.Fatalf("%d of %d connections failed; first: %v", res.Failures, res.Started, res.FirstErr)
	}
	cl, err := admin.Dial(h.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	gauge := func(name string) int64 {
		st, err := cl.Status(ctx)
		if err != nil {
			t.Fatalf("status: %v", err)
		}
		return st.Netstack["tun"].Gauges[name]
	}
	peak := gauge("tcp_closing")
	end := time.Now()
	waitFor(t, 15*time.Second, "natbox's closed endpoints to leave TIME_WAIT", func() bool { return gauge("tcp_closing") == 0 })
	// And the buffer budget counts none of them any more.
	waitFor(t, 5*time.Second, "the buffer budget to count no connection", func() bool { return gauge("tcp_conns") == 0 })
	t.Logf("%d connections at %.0f conn/s; %d endpoints closing after the churn, none %v later",
		res.Started, res.Rate(), peak, time.Since(end).Round(100*time.Millisecond))
	if peak == 0 {
		t.Error("no closed endpoint right after the churn: the test did not see TIME_WAIT at all")
	}
}
