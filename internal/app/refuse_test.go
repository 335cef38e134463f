package app_test

import (
	"context"
	"errors"
	"io"
	"maps"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/app"
)

// refusedQuickly is the bound on an RST answer: a dropped SYN would only
// be retried by the client after its 1 s retransmission timeout, so an
// answer within it is the RST, with slack for a loaded -race run.
const refusedQuickly = 900 * time.Millisecond

func (h *harness) expectRefused(src, dst netip.AddrPort) {
	h.t.Helper()
	start := time.Now()
	c, err := h.dial(src, dst)
	if err == nil {
		c.Close()
		h.t.Fatalf("%s -> %s connected, want connection refused", src, dst)
	}
	if !errors.Is(err, errRefused) {
		h.t.Fatalf("%s -> %s: %v, want connection refused (RST)", src, dst, err)
	}
	if el := time.Since(start); el > refusedQuickly {
		h.t.Fatalf("%s -> %s refused after %v, want an RST at once", src, dst, el)
	}
}

// expectEcho checks that c carries bytes both ways (c stays open).
func expectEcho(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	b := make([]byte, len(msg))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != msg {
		t.Fatalf("echo = %q, %v; want %q", b, err, msg)
	}
}

// wantRefusals checks a refusal map: the reasons in want with their
// counts, every other reason zero.
func wantRefusals(t *testing.T, what string, got map[string]uint64, want map[string]uint64) {
	t.Helper()
	for reason, n := range got {
		if n != want[reason] {
			t.Errorf("%s: refusals[%q] = %d, want %d (all: %v)", what, reason, n, want[reason], got)
		}
	}
	for reason, n := range want {
		if got[reason] != n {
			t.Errorf("%s: refusals[%q] = %d, want %d (all: %v)", what, reason, got[reason], n, got)
		}
	}
}

func TestTCPRefusalsAndLimits(t *testing.T) {
	t.Parallel()
	target := serveTCP(t, echo)
	h := newHarness(t, spec{Mappings: mapping("guarded", "tcp", "8001", target.String(), `deny = ["203.0.113.66/32"]`) +
		mapping("office", "tcp", "8004", target.String(), `allow = ["203.0.113.0/28"]`) +
		mapping("closed", "tcp", "8002", closedPort(t).String()) +
		mapping("capped", "tcp", "8003", target.String(), "max_sessions = 2")}, app.Options{})
	denied := netip.MustParseAddr("203.0.113.66")

	// deny: RST for the denied address, service for the others.
	h.expectRefused(ap(denied, 0), ap(public4, 8001))
	expectEcho(t, h.mustDial(ap(client4, 0), ap(public4, 8001)), "guarded")
	// allow: only the office range.
	h.expectRefused(ap(denied, 0), ap(public4, 8004))
	expectEcho(t, h.mustDial(ap(client4, 0), ap(public4, 8004)), "office")
	// No mapping for the port at all.
	h.expectRefused(ap(client4, 0), ap(public4, 9999))
	// The target refuses: natbox dials first, so the client gets the RST.
	h.expectRefused(ap(client4, 0), ap(public4, 8002))

	// max_sessions = 2: the third is refused while two are open ...
	first := h.mustDial(ap(client4, 0), ap(public4, 8003))
	second := h.mustDial(ap(client4, 0), ap(public4, 8003))
	expectEcho(t, first, "one")
	expectEcho(t, second, "two")
	h.expectRefused(ap(client4, 0), ap(public4, 8003))
	// ... and admitted again once one of them closes.
	first.Close()
	waitFor(t, 5*time.Second, "the closed session to leave", func() bool { return h.mappingStatus("capped").SessionsActive == 1 })
	expectEcho(t, h.mustDial(ap(client4, 0), ap(public4, 8003)), "three")
	expectEcho(t, second, "two still open")

	// The counters say exactly what happened above.
	snap := h.engine().Snapshot()
	wantRefusals(t, "unmatched", snap.Unmatched, map[string]uint64{"no_match": 1})
	want := map[string]struct {
		hits, opened uint64
		refusals     map[string]uint64
	}{
		"guarded": {2, 1, map[string]uint64{"denied": 1}},
		"office":  {2, 1, map[string]uint64{"not_allowed": 1}},
		"closed":  {1, 0, map[string]uint64{"dial_failed": 1}},
		"capped":  {4, 3, map[string]uint64{"over_limit_mapping_sessions": 1}},
	}
	for _, m := range snap.Mappings {
		w, ok := want[m.Name]
		if !ok {
			t.Fatalf("unexpected mapping %q", m.Name)
		}
		if m.Hits != w.hits || m.SessionsOpened != w.opened {
			t.Errorf("%s: hits %d, opened %d; want %d, %d", m.Name, m.Hits, m.SessionsOpened, w.hits, w.opened)
		}
		wantRefusals(t, m.Name, m.Refusals, w.refusals)
	}
}

// hangDialer blocks dials to one address until their context ends, as a
// target that never answers a SYN does; others go to the host network.
type hangDialer struct {
	dead    string
	pending atomic.Int64
	net.Dialer
}

func (d *hangDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if addr != d.dead {
		return d.Dialer.DialContext(ctx, network, addr)
	}
	d.pending.Add(1)
	defer d.pending.Add(-1)
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestDeadTargetDoesNotStallOtherMappings(t *testing.T) {
	t.Parallel()
	live := serveTCP(t, echo)
	dead := "127.0.0.1:9" // never dialed: the hang dialer holds it
	dialer := &hangDialer{dead: dead}
	h := newHarness(t, spec{
		// Between the client's SYN retransmissions at 3 s and 7 s, and long
		// enough for the live phase below on a loaded machine (the client's
		// own dial gives up at 10 s).
		Limits: `dial_timeout = "5s"`,
		Mappings: mapping("dead", "tcp", "8101", dead) +
			mapping("live", "tcp", "8102", live.String()),
	}, app.Options{Dialer: dialer})

	const stuck = 16
	t0 := time.Now()
	deadSrc := netip.MustParseAddr("203.0.113.8")
	var wg sync.WaitGroup
	deadErrs := make(chan error, stuck)
	for i := 0; i < stuck; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := h.dial(ap(deadSrc, 0), ap(public4, 8101))
			if err == nil {
				c.Close()
			}
			deadErrs <- err
		}()
	}
	waitFor(t, 5*time.Second, "the dead target's dials to be pending", func() bool { return dialer.pending.Load() == stuck })

	// While they hang, the live mapping answers promptly, every time. The
	// phase ends well inside dial_timeout so the dead dials are still there.
	liveConns := 0
	for ; liveConns < 20 && time.Since(t0) < 3500*time.Millisecond; liveConns++ {
		i, start := liveConns, time.Now()
		c := h.mustDial(ap(client4, 0), ap(public4, 8102))
		expectEcho(t, c, "alive")
		c.Close()
		if el := time.Since(start); el > time.Second {
			t.Fatalf("live connection %d took %v while the dead target's dials were pending", i, el)
		}
	}
	if n := dialer.pending.Load(); n != stuck || liveConns < 3 {
		t.Fatalf("%d dead dials pending after %d live connections, want %d still pending after at least 3 (the test ran too slowly to show anything)", n, liveConns, stuck)
	}
	if got := h.engine().Snapshot().InflightDials; got != stuck {
		t.Fatalf("in-flight dials = %d, want %d", got, stuck)
	}

	// The dead dials end at dial_timeout with an RST to their clients.
	wg.Wait()
	t.Logf("dead dials ended after %v", time.Since(t0))
	close(deadErrs)
	for err := range deadErrs {
		if !errors.Is(err, errRefused) {
			t.Fatalf("dead target dial: %v, want connection refused after dial_timeout", err)
		}
	}
	m := h.mappingStatus("dead")
	wantRefusals(t, "dead", m.Refusals, map[string]uint64{"dial_failed": stuck})
	if l := h.mappingStatus("live"); l.SessionsOpened != uint64(liveConns) || anyRefusal(l.Refusals) {
		t.Fatalf("live: opened %d, refusals %v; want %d and none", l.SessionsOpened, l.Refusals, liveConns)
	}
}

func anyRefusal(m map[string]uint64) bool {
	for v := range maps.Values(m) {
		if v != 0 {
			return true
		}
	}
	return false
}

func TestGlobalSessionLimit(t *testing.T) {
	t.Parallel()
	target := serveTCP(t, echo)
	h := newHarness(t, spec{
		Limits:   "max_sessions = 1",
		Mappings: mapping("a", "tcp", "8011", target.String()) + mapping("b", "tcp", "8012", target.String()),
	}, app.Options{})
	held := h.mustDial(ap(client4, 0), ap(public4, 8011))
	expectEcho(t, held, "holds the only slot")
	// The limit is shared: another mapping is refused too.
	h.expectRefused(ap(client4, 0), ap(public4, 8012))
	held.Close()
	waitFor(t, 5*time.Second, "the slot to free", func() bool { return h.engine().Snapshot().ActiveSessions == 0 })
	expectEcho(t, h.mustDial(ap(client4, 0), ap(public4, 8012)), "the slot is free again")
	wantRefusals(t, "b", h.mappingStatus("b").Refusals, map[string]uint64{"over_limit_sessions": 1})
	wantRefusals(t, "a", h.mappingStatus("a").Refusals, nil)
}
