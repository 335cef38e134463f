package app_test

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/app"
)

// TestUDPFloodFromSpoofedSources is the flood of issue 7 through the whole
// appliance: 3000 datagrams from as many spoofed sources to one UDP mapping
// whose target never answers. Once the pool is full, a flood source could
// only get a session by evicting one, so it is on probation: its single
// datagram is dropped and counted, and nothing is evicted. A real UDP client
// (its target answers) keeps its session and every ping, a new real client
// that retransmits gets a session by evicting a flood session, and TCP to
// another mapping is never refused.
func TestUDPFloodFromSpoofedSources(t *testing.T) {
	t.Parallel()
	const (
		flood = 3000
		pool  = 64
	)
	sink := serveUDP(t, func(netip.AddrPort, []byte) []byte { return nil })
	game := serveUDP(t, udpEcho)
	web := serveTCP(t, echo)
	h := newHarness(t, spec{
		Limits: "max_sessions = 100\nmax_udp_sessions = 64", // TCP keeps 36 slots no UDP flood can take
		Mappings: mapping("flood", "udp", "8400", sink.String()) +
			mapping("game", "udp", "8401", game.String()) +
			mapping("web", "tcp", "8402", web.String()),
	}, app.Options{})
	player := ap(client4, 40000)
	ping := func(what string) {
		t.Helper()
		h.sendUDP(player, ap(public4, 8401), []byte(what))
		if d := h.mustRecvUDP(player); string(d.payload) != what {
			t.Fatalf("ping %q answered %q", what, d.payload)
		}
	}
	// Two exchanges make the player's session a conversation (assured), as
	// any real client's is after its second datagram.
	ping("before")
	ping("before again")

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range flood {
			src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), uint16(1024+i))
			if err := h.client.WriteUDP(src, ap(public4, 8400), []byte("spoof")); err != nil {
				t.Errorf("flood datagram %d: %v", i, err)
				return
			}
		}
	}()
	// During the flood: TCP to another mapping and the real client's pings.
	for i := range 20 {
		c := h.mustDial(ap(client4, 0), ap(public4, 8402))
		expectEcho(t, c, "web")
		c.Close()
		if i%4 == 0 {
			ping("during")
		}
	}
	wg.Wait()
	waitFor(t, 30*time.Second, "every flood datagram admitted", func() bool { return h.mappingStatus("flood").Hits == flood })
	for range 5 {
		ping("after")
	}

	f := h.mappingStatus("flood")
	// The pool holds the player and pool-1 flood sessions; every later flood
	// datagram was on probation and evicted nothing.
	if f.UDPEvicted != 0 || f.SessionsOpened != pool-1 {
		t.Errorf("flood: udp_evicted %d, %d sessions opened; want 0, %d", f.UDPEvicted, f.SessionsOpened, pool-1)
	}
	wantRefusals(t, "flood", f.Refusals, map[string]uint64{"udp_probation": flood - (pool - 1)})

	// A new real client: its first datagram is on probation, its
	// retransmission gets a session by evicting the oldest flood session.
	fresh := ap(client4, 40001)
	h.sendUDP(fresh, ap(public4, 8401), []byte("first"))
	waitFor(t, 10*time.Second, "the fresh client's first datagram on probation", func() bool {
		return h.mappingStatus("game").Refusals["udp_probation"] == 1
	})
	h.sendUDP(fresh, ap(public4, 8401), []byte("retransmit"))
	if d := h.mustRecvUDP(fresh); string(d.payload) != "retransmit" {
		t.Fatalf("fresh client answered %q, want \"retransmit\"", d.payload)
	}
	if n := h.mappingStatus("flood").UDPEvicted; n != 1 {
		t.Errorf("flood: udp_evicted %d after the fresh client, want 1", n)
	}
	g := h.mappingStatus("game")
	if g.SessionsOpened != 2 || g.UDPEvicted != 0 {
		t.Errorf("game: %d sessions opened, %d evicted; want the player's kept and the fresh one's", g.SessionsOpened, g.UDPEvicted)
	}
	wantRefusals(t, "game", g.Refusals, map[string]uint64{"udp_probation": 1})
	w := h.mappingStatus("web")
	if w.SessionsOpened != 20 {
		t.Errorf("web: %d sessions opened, want 20", w.SessionsOpened)
	}
	wantRefusals(t, "web", w.Refusals, nil)
}

// TestPerSourceCapThroughTheStack: the sessions of one source (an IPv6
// /64 here) on a mapping are capped; the next gets a reset and is counted,
// while another source is served. (The new-session rate is tested with a
// fake clock in forwarder.)
func TestPerSourceCapThroughTheStack(t *testing.T) {
	t.Parallel()
	web := serveTCP(t, echo)
	h := newHarness(t, spec{Mappings: mapping("capped", "tcp", "8410", web.String(), "max_tcp_sessions_per_source = 2")}, app.Options{})
	for _, src := range []string{"2001:db8:1::7", "2001:db8:1::99"} {
		expectEcho(t, h.mustDial(ap(netip.MustParseAddr(src), 0), ap(public6, 8410)), "held open")
	}
	h.expectRefused(ap(netip.MustParseAddr("2001:db8:1::5"), 0), ap(public6, 8410))
	wantRefusals(t, "capped", h.mappingStatus("capped").Refusals, map[string]uint64{"over_limit_sessions_per_source": 1})
	expectEcho(t, h.mustDial(ap(client4, 0), ap(public4, 8410)), "another source")
}
