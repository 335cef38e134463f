package tunnel_test

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/tunnel"
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

// TestRelayOpensSocketsOutsideItsLock: while one peer's register is opening
// its public sockets, the relay answers status and serves another peer's
// register; the ports being opened are counted meanwhile, and once the
// register completes they are counted once and carry traffic.
func TestRelayOpensSocketsOutsideItsLock(t *testing.T) {
	t.Parallel()
	portA, portB := freePort(t, false), freePort(t, false)
	specA, specB := fmt.Sprintf("udp/%d", portA), fmt.Sprintf("tcp/%d", portB)
	keyA, keyB := mustKey(t), mustKey(t)
	relay := startRelay(t, relayConfig(mustKey(t), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, specA)},
		conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB, Ports: mustSpecs(t, specB)},
	), testLogger(t))
	entered, release := tunnel.BlockApplies(relay.relay, "a")
	defer release()

	a := startAppliance(t, relay, keyA, applAddrA, udpMapping("game", portA, udpEchoService(t)))
	select {
	case <-entered:
	case <-time.After(20 * time.Second):
		t.Fatal("a's register never reached the socket opening")
	}
	sockets := func() (all, ofA int) {
		st := relay.relay.Status() // takes the relay's lock: a's apply must not hold it
		for _, p := range st.Peers {
			if p.Name == "a" {
				ofA = p.UDPSockets
			}
		}
		return st.UDPSockets, ofA
	}
	if all, ofA := sockets(); all != 1 || ofA != 1 {
		t.Errorf("while opening: %d UDP sockets, %d of a's; want its reserved one counted", all, ofA)
	}
	b := startAppliance(t, relay, keyB, applAddrB, tcpMapping("web", portB, 1))
	waitRegistered(t, b, specB)
	if st := a.uplink.Status(); len(st.Registered) != 0 {
		t.Fatalf("a registered %v before its sockets opened", st.Registered)
	}

	release()
	waitRegistered(t, a, specA)
	if all, ofA := sockets(); all != 1 || ofA != 1 {
		t.Errorf("after: %d UDP sockets, %d of a's; want 1", all, ofA)
	}
	if got := udpRoundTrip(t, udpClient(t), netip.AddrPortFrom(loopback4, portA), []byte("opened")); string(got) != "opened" {
		t.Fatalf("echo %q", got)
	}
}

// TestRelayBindFailureFreesItsReservation: a wanted port some other
// program holds is refused with the bind error, the ports reserved for it
// are given back (not counted, free in the registry), and the rest of the
// register is granted.
func TestRelayBindFailureFreesItsReservation(t *testing.T) {
	t.Parallel()
	taken := udpClient(t) // another program's socket on a's port
	portBusy := uint16(taken.LocalAddr().(*net.UDPAddr).Port)
	portOK := freePort(t, false)
	busy, ok := fmt.Sprintf("udp/%d", portBusy), fmt.Sprintf("udp/%d", portOK)
	key := mustKey(t)
	relay := startRelay(t, onePeerRelayConfig(t, key, busy, ok), testLogger(t))
	svc := udpEchoService(t)
	a := startAppliance(t, relay, key, applAddrA, udpMapping("busy", portBusy, svc)+udpMapping("ok", portOK, svc))
	waitRegistered(t, a, ok)
	want := fmt.Sprintf("cannot bind 127.0.0.1:%d: address already in use", portBusy)
	waitFor(t, 10*time.Second, "the bind refusal", func() bool { return a.uplink.Status().Refused[busy] == want })
	// A register in flight (the appliance retries the refused spec) counts
	// the busy port's reservation until its bind fails again: read the
	// count once it settles.
	var st tunnel.RelayStatus
	waitFor(t, 10*time.Second, "one UDP socket, the granted port's", func() bool {
		st = relay.relay.Status()
		return st.UDPSockets == 1 && len(st.Peers) == 1 && st.Peers[0].UDPSockets == 1
	})
	if !slices.Equal(st.Peers[0].Ports, []string{ok}) {
		t.Fatalf("relay holds %v, want [%s]", st.Peers[0].Ports, ok)
	}
}
