package tunnel_test

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
)

// TestRelayUDPSocketCaps: a registration that would pass the peer's or the
// relay's public UDP socket cap is refused for those specs, with a reason
// the appliance shows and a count per reason; the specs within the caps are
// granted and their sockets counted.
func TestRelayUDPSocketCaps(t *testing.T) {
	t.Parallel()
	free := func(n int) []string {
		var specs []string
		for range n {
			specs = append(specs, fmt.Sprintf("udp/%d", freePort(t, false)))
		}
		sort.Strings(specs) // the order the uplink registers them in
		return specs
	}
	specsA, specsB := free(3), free(2)
	keyA, keyB := mustKey(t), mustKey(t)
	cfg := relayConfig(mustKey(t), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, specsA...), MaxUDPSockets: 2},
		conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB, Ports: mustSpecs(t, specsB...)},
	)
	cfg.Relay.MaxUDPSockets = 3
	relay := startRelay(t, cfg, testLogger(t))
	svc := udpEchoService(t)
	mappings := func(specs []string) string {
		var b strings.Builder
		for i, s := range specs {
			var port uint16
			fmt.Sscanf(s, "udp/%d", &port)
			b.WriteString(udpMapping(fmt.Sprintf("m%d", i), port, svc))
		}
		return b.String()
	}

	a := startAppliance(t, relay, keyA, applAddrA, mappings(specsA))
	waitRegistered(t, a, specsA[:2]...)
	wantA := "needs 1 public UDP sockets (1 ports on 1 bind addresses); the peer holds 2 of its max_udp_sockets 2"
	waitFor(t, 10*time.Second, "a's refusal", func() bool { return a.uplink.Status().Refused[specsA[2]] == wantA })

	b := startAppliance(t, relay, keyB, applAddrB, mappings(specsB))
	waitRegistered(t, b, specsB[0])
	wantB := "needs 1 public UDP sockets (1 ports on 1 bind addresses); the relay has 3 of its max_udp_sockets 3 open"
	waitFor(t, 10*time.Second, "b's refusal", func() bool { return b.uplink.Status().Refused[specsB[1]] == wantB })

	st := relay.relay.Status()
	if st.UDPSockets != 3 {
		t.Errorf("relay: %d UDP sockets open, want 3", st.UDPSockets)
	}
	for _, p := range st.Peers {
		want := map[string]struct {
			sockets int
			reason  string
		}{"a": {2, "udp_sockets_peer"}, "b": {1, "udp_sockets_relay"}}[p.Name]
		if p.UDPSockets != want.sockets || p.PortRefusals[want.reason] == 0 || len(p.PortRefusals) != 1 {
			t.Errorf("peer %s: %d UDP sockets, refusals %v; want %d and %s counted", p.Name, p.UDPSockets, p.PortRefusals, want.sockets, want.reason)
		}
		if p.Refused[map[string]string{"a": specsA[2], "b": specsB[1]}[p.Name]] == "" {
			t.Errorf("peer %s: relay status refused %v", p.Name, p.Refused)
		}
	}
	// Within the caps the ports work: a datagram crosses a's first port.
	var port uint16
	fmt.Sscanf(specsA[0], "udp/%d", &port)
	if got := udpRoundTrip(t, udpClient(t), netip.AddrPortFrom(loopback4, port), []byte("in cap")); string(got) != "in cap" {
		t.Fatalf("echo %q", got)
	}
}
