package forwarder

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

// probationEngine has a UDP pool of two held by spoofed sources that never
// had a reply, so a new source can only get a session by evicting one.
func probationEngine(t *testing.T) (*Engine, *fakeClock, *fakeIngress, netip.AddrPort) {
	t.Helper()
	sink, _ := udpSink(t)
	echo := udpEcho(t)
	cfg := config(
		mapping("flood", conf.UDP, "6000", "127.0.0.1:"+itoa(sink)),
		mapping("game", conf.UDP, "6001", "127.0.0.1:"+itoa(echo)),
	)
	cfg.Limits.MaxUDPSessions = 2
	clk := newFakeClock()
	e := newEngine(t, cfg, Options{Clock: clk})
	tun := newIngress(conf.IngressTUN)
	for i := range 2 {
		e.HandleUDP(tun, floodSource(i), netip.MustParseAddrPort("198.51.100.1:6000"), []byte("spoof"))
	}
	if st := e.Snapshot(); st.UDPSessions != 2 {
		t.Fatalf("UDP pool holds %d, want 2 (filling needs no eviction, so no probation)", st.UDPSessions)
	}
	return e, clk, tun, netip.MustParseAddrPort("198.51.100.1:6001")
}

func hasSession(e *Engine, src netip.AddrPort) bool {
	for _, s := range e.Sessions() {
		if s.Client == src {
			return true
		}
	}
	return false
}

// TestUDPProbationAdmitsTheSecondDatagram: a new source that needs an
// eviction loses its first datagram (counted, nothing evicted) and gets its
// session, by eviction, on the second, whose reply reaches it.
func TestUDPProbationAdmitsTheSecondDatagram(t *testing.T) {
	e, clk, tun, game := probationEngine(t)
	client := netip.MustParseAddrPort("203.0.113.5:4000")
	e.HandleUDP(tun, client, game, []byte("one"))
	ms := mappingStatus(t, e, "game")
	if ms.Refusals["udp_probation"] != 1 || mappingStatus(t, e, "flood").UDPEvicted != 0 || hasSession(e, client) {
		t.Fatalf("after one datagram: udp_probation %d, evicted %d, session %v; want 1, 0, none",
			ms.Refusals["udp_probation"], mappingStatus(t, e, "flood").UDPEvicted, hasSession(e, client))
	}
	clk.Advance(time.Second) // a client's retransmission
	e.HandleUDP(tun, client, game, []byte("two"))
	if r := tun.next(t); r.dst != client || !strings.HasSuffix(r.payload, "|two") {
		t.Fatalf("reply %q to %v, want \"two\" to %v", r.payload, r.dst, client)
	}
	if n := mappingStatus(t, e, "flood").UDPEvicted; n != 1 {
		t.Fatalf("flood evicted %d, want 1 for the admitted client", n)
	}
	if n := mappingStatus(t, e, "game").Refusals["udp_probation"]; n != 1 {
		t.Fatalf("udp_probation %d after the second datagram, want still 1", n)
	}
}

// TestUDPProbationForgetsAfterTheWindow: a second datagram later than
// probationWindow counts as a first one again.
func TestUDPProbationForgetsAfterTheWindow(t *testing.T) {
	e, clk, tun, game := probationEngine(t)
	client := netip.MustParseAddrPort("203.0.113.5:4000")
	e.HandleUDP(tun, client, game, []byte("one"))
	clk.Advance(probationWindow + probationTick)
	e.HandleUDP(tun, client, game, []byte("late"))
	if n := mappingStatus(t, e, "game").Refusals["udp_probation"]; n != 2 || hasSession(e, client) {
		t.Fatalf("udp_probation %d, session %v; want 2 and none", n, hasSession(e, client))
	}
	clk.Advance(probationWindow) // at the window's edge: still admitted
	e.HandleUDP(tun, client, game, []byte("three"))
	if r := tun.next(t); r.dst != client || !strings.HasSuffix(r.payload, "|three") {
		t.Fatalf("reply %q to %v, want \"three\" to %v", r.payload, r.dst, client)
	}
}

// TestUDPFloodUnderProbationEvictsNothing: spoofed sources that send once
// never open a session once the pool is full, so they evict nobody, while
// a real client that retransmits gets in.
func TestUDPFloodUnderProbationEvictsNothing(t *testing.T) {
	e, _, tun, game := probationEngine(t)
	const flood = 3000
	for i := 2; i < flood; i++ {
		e.HandleUDP(tun, floodSource(i), netip.MustParseAddrPort("198.51.100.1:6000"), []byte("spoof"))
	}
	ms := mappingStatus(t, e, "flood")
	if ms.UDPEvicted != 0 || ms.Refusals["udp_probation"] != flood-2 || ms.SessionsOpened != 2 {
		t.Fatalf("flood: evicted %d, udp_probation %d, opened %d; want 0, %d, 2", ms.UDPEvicted, ms.Refusals["udp_probation"], ms.SessionsOpened, flood-2)
	}
	client := netip.MustParseAddrPort("203.0.113.5:4000")
	e.HandleUDP(tun, client, game, []byte("one"))
	e.HandleUDP(tun, client, game, []byte("two"))
	if r := tun.next(t); r.dst != client || !strings.HasSuffix(r.payload, "|two") {
		t.Fatalf("reply %q to %v, want \"two\" to %v", r.payload, r.dst, client)
	}
}

// TestProbationRefusalDoesNotAllocate: a spoofed datagram on probation
// costs no allocation.
func TestProbationRefusalDoesNotAllocate(t *testing.T) {
	sink, _ := udpSink(t)
	cfg := config(mapping("flood", conf.UDP, "6000", "127.0.0.1:"+itoa(sink)))
	cfg.Limits.MaxUDPSessions = 2
	cfg.Limits.MaxTrackedSources = 16
	e, err := New(cfg, Options{}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	tun := newIngress(conf.IngressTUN)
	dst := netip.MustParseAddrPort("198.51.100.1:6000")
	i := 0
	flood := func() {
		e.HandleUDP(tun, floodSource(i), dst, []byte("spoof"))
		i++
	}
	for range 1000 { // fill the pool and the rate table
		flood()
	}
	if n := testing.AllocsPerRun(1000, flood); n != 0 {
		t.Fatalf("%v allocations per datagram on probation, want 0", n)
	}
	if n := mappingStatus(t, e, "flood").Refusals["udp_probation"]; n != uint64(i-2) {
		t.Fatalf("udp_probation %d, want every flood datagram past the pool on probation", n)
	}
}
