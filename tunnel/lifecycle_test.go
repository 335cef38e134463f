package tunnel_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/internal/testutil"
	"github.com/natbox/natbox/netstack"
	"github.com/natbox/natbox/tunnel"
)

// mappingTOML is one [[mapping]] from the appliance's public port to a
// loopback target, followed by the extra lines.
func mappingTOML(name, proto string, port, target uint16, extra string) string {
	return fmt.Sprintf(`
[[mapping]]
name = %q
protocol = %q
listen = "%d"
target = "127.0.0.1:%d"
%s`, name, proto, port, target, extra)
}

// tcpMapping sends the client address to the target as PROXY v1.
func tcpMapping(name string, port, target uint16) string {
	return mappingTOML(name, "tcp", port, target, "proxy_protocol = \"v1\"\n")
}

func udpMapping(name string, port, target uint16) string {
	return mappingTOML(name, "udp", port, target, "")
}

// udpClient is a public UDP client socket on 127.0.0.1, closed with the test.
func udpClient(t testing.TB) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback4, 0)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func dialable(addr netip.AddrPort) bool {
	c, err := net.DialTimeout("tcp", addr.String(), time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// TestRelayReload: a reload that takes one port from peer a closes exactly
// that port and tells a why; b's established flow keeps running; widening
// b's allowance grants the port b asked for earlier without b re-registering.
func TestRelayReload(t *testing.T) {
	t.Parallel()
	portA1, portA2, portB, portB2 := freePort(t, false), freePort(t, false), freePort(t, false), freePort(t, false)
	keyA, keyB, relayKey := mustKey(t), mustKey(t), mustKey(t)
	peerA := conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA,
		Ports: mustSpecs(t, fmt.Sprintf("tcp/%d", portA1), fmt.Sprintf("tcp/%d", portA2))}
	peerB := conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB, Ports: mustSpecs(t, fmt.Sprintf("tcp/%d", portB))}
	binds := []netip.Addr{loopback4}
	relay := startRelay(t, relayConfig(relayKey, "127.0.0.1:0", binds, peerA, peerB), testLogger(t))
	svc, _ := proxyEchoService(t)
	a := startAppliance(t, relay, keyA, applAddrA, tcpMapping("a1", portA1, svc)+tcpMapping("a2", portA2, svc))
	b := startAppliance(t, relay, keyB, applAddrB, tcpMapping("b", portB, svc)+tcpMapping("b2", portB2, svc))
	specA1, specA2 := fmt.Sprintf("tcp/%d", portA1), fmt.Sprintf("tcp/%d", portA2)
	specB, specB2 := fmt.Sprintf("tcp/%d", portB), fmt.Sprintf("tcp/%d", portB2)
	waitRegistered(t, a, specA1, specA2)
	waitRegistered(t, b, specB)
	if r := b.uplink.Status().Refused[specB2]; r != "not in this peer's ports" {
		t.Fatalf("b2 refusal %q", r)
	}

	// A long-lived flow of b's, open across the reload.
	flow, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, portB).String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer flow.Close()
	echo := func(msg string) string {
		t.Helper()
		flow.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := flow.Write([]byte(msg)); err != nil {
			t.Fatalf("write on b's flow: %v", err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(flow, buf); err != nil {
			t.Fatalf("read on b's flow: %v", err)
		}
		return string(buf)
	}
	if got := echo("one"); got != "one" {
		t.Fatalf("echo %q", got)
	}

	peerA.Ports = mustSpecs(t, fmt.Sprintf("tcp/%d", portA1))
	peerB.Ports = mustSpecs(t, fmt.Sprintf("tcp/%d", portB), fmt.Sprintf("tcp/%d", portB2))
	if err := relay.relay.Reload(relayConfig(relayKey, "127.0.0.1:0", binds, peerA, peerB)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "a told it lost "+specA2, func() bool {
		return a.uplink.Status().Refused[specA2] == "not in this peer's ports"
	})
	if dialable(netip.AddrPortFrom(loopback4, portA2)) {
		t.Fatalf("%s still open after the reload took it away", specA2)
	}
	if !dialable(netip.AddrPortFrom(loopback4, portA1)) {
		t.Fatalf("%s closed by a reload that kept it", specA1)
	}
	waitRegistered(t, b, specB, specB2)
	if got := echo("two"); got != "two" {
		t.Fatalf("b's flow after reload: %q", got)
	}

	// Settings that need a restart are refused whole.
	bad := relayConfig(relayKey, "127.0.0.1:1", binds, peerB)
	if err := relay.relay.Reload(bad); err == nil {
		t.Fatal("reload accepted a new relay.listen")
	}
	otherCC := relayConfig(relayKey, "127.0.0.1:0", binds, peerB)
	otherCC.Relay.TCPCongestion = "cubic"
	if err := relay.relay.Reload(otherCC); err == nil || !strings.Contains(err.Error(), "relay.tcp_congestion") {
		t.Fatalf("reload with another relay.tcp_congestion: %v", err)
	}
	if !dialable(netip.AddrPortFrom(loopback4, portA1)) {
		t.Fatal("a refused reload changed a's ports")
	}

	// Removing peer a closes its ports and its control session; b's flow runs on.
	if err := relay.relay.Reload(relayConfig(relayKey, "127.0.0.1:0", binds, peerB)); err != nil {
		t.Fatal(err)
	}
	if dialable(netip.AddrPortFrom(loopback4, portA1)) {
		t.Fatalf("%s still open after its peer was removed", specA1)
	}
	waitFor(t, 10*time.Second, "a's uplink noticing", func() bool { return a.uplink.Status().State == tunnel.StateConnecting })
	if st := relay.relay.Status(); len(st.Peers) != 1 || st.Peers[0].Name != "b" {
		t.Fatalf("peers after removing a: %+v", st.Peers)
	}
	if got := echo("three"); got != "three" {
		t.Fatalf("b's flow after a was removed: %q", got)
	}
}

// TestRelayGraceAndHandover: ports survive a short control outage, are
// released when the appliance stays away past the grace, and a peer that was
// refused because another held the port gets it then.
func TestRelayGraceAndHandover(t *testing.T) {
	t.Parallel()
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	keyA, keyB := mustKey(t), mustKey(t)
	relay := startRelay(t, relayConfig(mustKey(t), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, spec)},
		conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB, Ports: mustSpecs(t, spec)},
	), testLogger(t))
	svc, headers := proxyEchoService(t)
	a := startAppliance(t, relay, keyA, applAddrA, tcpMapping("web", port, svc))
	waitRegistered(t, a, spec)
	b := startAppliance(t, relay, keyB, applAddrB, tcpMapping("web", port, svc))
	waitFor(t, 10*time.Second, "b refused", func() bool { return b.uplink.Status().Refused[spec] == `held by peer "a"` })

	a.close() // a goes away for good
	gone := time.Now()
	waitRegistered(t, b, spec)
	if held := time.Since(gone); held < 900*time.Millisecond {
		t.Fatalf("a's port moved to b after %v, inside the 1 s grace", held)
	}
	public := netip.AddrPortFrom(loopback4, port)
	client, got := tcpRoundTrip(t, public, []byte("to b"))
	if string(got) != "to b" {
		t.Fatalf("echo %q", got)
	}
	if h := <-headers; !containsAddr(h, client) {
		t.Fatalf("header %q lacks client %s", h, client)
	}
	for _, p := range relay.relay.Status().Peers {
		if p.Name == "a" && (p.Connected || len(p.Ports) != 0) {
			t.Fatalf("a still listed with ports: %+v", p)
		}
	}
}

// containsAddr reports whether a PROXY v1 header names ap as its source.
func containsAddr(header string, ap netip.AddrPort) bool {
	f := strings.Fields(header)
	return len(f) == 6 && f[2] == ap.Addr().String() && f[4] == fmt.Sprint(ap.Port())
}

// TestRelayUDPIdleExpiry: the relay forgets a public UDP client after the
// mapping's idle timeout and serves it again as a new session.
func TestRelayUDPIdleExpiry(t *testing.T) {
	t.Parallel()
	port := freePort(t, false)
	spec := fmt.Sprintf("udp/%d", port)
	key := mustKey(t)
	cfg := onePeerRelayConfig(t, key, spec)
	relay := startRelay(t, cfg, testLogger(t))
	svc := udpEchoService(t)
	// The relay's session follows the mapping's idle timeout.
	a := startAppliance(t, relay, key, applAddrA, mappingTOML("dns", "udp", port, svc, "idle_timeout = \"300ms\"\n"))
	waitRegistered(t, a, spec)
	c := udpClient(t)
	public := netip.AddrPortFrom(loopback4, port)
	if got := udpRoundTrip(t, c, public, []byte("q1")); string(got) != "q1" {
		t.Fatalf("echo %q", got)
	}
	if n := relay.relay.Status().UDPSessions; n != 1 {
		t.Fatalf("udp sessions = %d, want 1", n)
	}
	waitFor(t, 3*time.Second, "udp session expiry", func() bool { return relay.relay.Status().UDPSessions == 0 })
	if got := udpRoundTrip(t, c, public, []byte("q2")); string(got) != "q2" {
		t.Fatalf("echo after expiry %q", got)
	}
}

// TestRelayMaxSessions: past relay.max_sessions a public connection is
// reset at once and counted; the admitted one keeps working.
func TestRelayMaxSessions(t *testing.T) {
	t.Parallel()
	relay, _, _, _, publicAddr := tcpEchoThroughRelay(t, func(c *conf.RelayConfig) { c.Relay.MaxSessions = 1 })
	public := publicAddr.String()

	first, err := net.DialTimeout("tcp", public, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	first.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := first.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := io.ReadFull(first, buf); err != nil || buf[0] != 'x' {
		t.Fatalf("first flow: %q, %v", buf, err)
	}
	// Over the cap the client is reset, not closed: an empty answer would
	// read as the service's.
	expectReset(t, netip.MustParseAddrPort(public))
	if st := relay.relay.Status(); st.OverLimit != 1 || st.TCPSessions != 1 {
		t.Fatalf("over_limit %d, tcp sessions %d; want 1 and 1", st.OverLimit, st.TCPSessions)
	}
	if _, err := first.Write([]byte("y")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(first, buf); err != nil || buf[0] != 'y' {
		t.Fatalf("first flow after the refusal: %q, %v", buf, err)
	}
}

// TestUplinkSetPorts: SetPorts at runtime (a reload on the appliance)
// registers new ports and releases dropped ones on the relay.
func TestUplinkSetPorts(t *testing.T) {
	t.Parallel()
	p1, p2 := freePort(t, false), freePort(t, false)
	s1, s2 := fmt.Sprintf("tcp/%d", p1), fmt.Sprintf("tcp/%d", p2)
	key := mustKey(t)
	relay := startRelay(t, onePeerRelayConfig(t, key, s1, s2), testLogger(t))
	svc, _ := proxyEchoService(t)
	a := startAppliance(t, relay, key, applAddrA, tcpMapping("one", p1, svc))
	waitRegistered(t, a, s1)

	a.uplink.SetPorts(mustSpecs(t, s2))
	waitRegistered(t, a, s2)
	waitFor(t, 5*time.Second, s1+" released", func() bool {
		ports := relay.relay.Status().Peers[0].Ports
		return len(ports) == 1 && ports[0] == s2
	})
	if dialable(netip.AddrPortFrom(loopback4, p1)) {
		t.Fatalf("%s still open after the appliance dropped it", s1)
	}
	if st := a.uplink.Status(); len(st.Registered) != 1 || st.Registered[0] != s2 {
		t.Fatalf("uplink registered %v, want [%s]", st.Registered, s2)
	}
}

// TestUplinkResolvesRelayName: uplink.relay may be a name; it is resolved
// (here through /etc/hosts) and WireGuard pointed at the address.
func TestUplinkResolvesRelayName(t *testing.T) {
	t.Parallel()
	if _, err := net.DefaultResolver.LookupNetIP(context.Background(), "ip", "localhost"); err != nil {
		t.Skipf("localhost does not resolve here: %v", err)
	}
	relay, key, port, spec := startOnePeerRelay(t, "tcp")
	svc, _ := proxyEchoService(t)
	a := startApplianceVia(t, "localhost", relay, key, applAddrA, tcpMapping("web", port, svc))
	waitRegistered(t, a, spec)
	if ep, err := netip.ParseAddrPort(a.uplink.Status().Endpoint); err != nil || !ep.Addr().IsLoopback() || ep.Port() != relay.port {
		t.Fatalf("endpoint %q (%v), want a loopback address and port %d", a.uplink.Status().Endpoint, err, relay.port)
	}
}

// TestRelayPeerSessionCounts: a peer's status counts its TCP flows and UDP
// client sessions while they are open, and every one it ever opened.
func TestRelayPeerSessionCounts(t *testing.T) {
	t.Parallel()
	tcpPort, udpPort := freePort(t, false), freePort(t, false)
	tcpSpec, udpSpec := fmt.Sprintf("tcp/%d", tcpPort), fmt.Sprintf("udp/%d", udpPort)
	key := mustKey(t)
	cfg := onePeerRelayConfig(t, key, tcpSpec, udpSpec)
	relay := startRelay(t, cfg, testLogger(t))
	tcpSvc, _ := proxyEchoService(t)
	udpSvc := udpEchoService(t)
	a := startAppliance(t, relay, key, applAddrA, tcpMapping("web", tcpPort, tcpSvc)+
		mappingTOML("dns", "udp", udpPort, udpSvc, "idle_timeout = \"300ms\"\n"))
	waitRegistered(t, a, tcpSpec, udpSpec)
	counts := func() (int64, uint64) {
		st := relay.relay.Status()
		if len(st.Peers) != 1 {
			t.Fatalf("peers %+v, want one", st.Peers)
		}
		return st.Peers[0].SessionsActive, st.Peers[0].SessionsOpened
	}
	if active, opened := counts(); active != 0 || opened != 0 {
		t.Fatalf("before any flow: active %d, opened %d; want 0 and 0", active, opened)
	}

	c, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, tcpPort).String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1)
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("tcp echo: %v", err)
	}
	if active, opened := counts(); active != 1 || opened != 1 {
		t.Fatalf("one tcp flow open: active %d, opened %d; want 1 and 1", active, opened)
	}

	u := udpClient(t)
	if got := udpRoundTrip(t, u, netip.AddrPortFrom(loopback4, udpPort), []byte("q")); string(got) != "q" {
		t.Fatalf("udp echo %q", got)
	}
	if active, opened := counts(); active != 2 || opened != 2 {
		t.Fatalf("tcp flow and udp session open: active %d, opened %d; want 2 and 2", active, opened)
	}

	c.Close()
	waitFor(t, 5*time.Second, "both sessions to end", func() bool { active, _ := counts(); return active == 0 })
	if _, opened := counts(); opened != 2 {
		t.Fatalf("after both ended: opened %d, want 2", opened)
	}
}

// TestRelayUDPLargerThanMTU: a public datagram too big for the tunnel is
// dropped whole (never forwarded truncated), and the client's next
// datagrams still cross.
func TestRelayUDPLargerThanMTU(t *testing.T) {
	t.Parallel()
	relay, key, port, spec := startOnePeerRelay(t, "udp")
	svc := udpEchoService(t)
	a := startAppliance(t, relay, key, applAddrA, udpMapping("echo", port, svc))
	waitRegistered(t, a, spec)
	c := udpClient(t)
	public := netip.AddrPortFrom(loopback4, port)
	if got := udpRoundTrip(t, c, public, []byte("first")); string(got) != "first" {
		t.Fatalf("echo %q", got)
	}
	big := bytes.Repeat([]byte{'b'}, testMTU+100)
	if _, err := c.WriteToUDPAddrPort(big, public); err != nil {
		t.Fatal(err)
	}
	// The small datagram follows the big one on the same socket; the first
	// echo to come back must be its own.
	if got := udpRoundTrip(t, c, public, []byte("after")); string(got) != "after" {
		t.Fatalf("echo after the oversized datagram: %d bytes %.16q, want %q", len(got), got, "after")
	}
}

// TestRelaySessionsShowClients: the relay's session list names each public
// client by its own address and port, with the peer's mapping, the public
// port and the peer's tunnel address as target.
func TestRelaySessionsShowClients(t *testing.T) {
	t.Parallel()
	tcpPort, udpPort := freePort(t, false), freePort(t, false)
	tcpSpec, udpSpec := fmt.Sprintf("tcp/%d", tcpPort), fmt.Sprintf("udp/%d", udpPort)
	key := mustKey(t)
	relay := startRelay(t, onePeerRelayConfig(t, key, tcpSpec, udpSpec), testLogger(t))
	tcpSvc, _ := proxyEchoService(t)
	a := startAppliance(t, relay, key, applAddrA, tcpMapping("web", tcpPort, tcpSvc)+udpMapping("dns", udpPort, udpEchoService(t)))
	waitRegistered(t, a, tcpSpec, udpSpec)

	c, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, tcpPort).String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1)
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("tcp echo: %v", err)
	}
	u := udpClient(t)
	if got := udpRoundTrip(t, u, netip.AddrPortFrom(loopback4, udpPort), []byte("q")); string(got) != "q" {
		t.Fatalf("udp echo %q", got)
	}

	want := map[string]netip.AddrPort{
		"a/" + tcpSpec: netip.MustParseAddrPort(c.LocalAddr().String()),
		"a/" + udpSpec: netip.MustParseAddrPort(u.LocalAddr().String()),
	}
	// Bytes are counted once written, which may be just after the client read them.
	var got []forwarder.SessionInfo
	waitFor(t, 5*time.Second, "both sessions with bytes both ways", func() bool {
		got = relay.relay.Sessions()
		n := 0
		for _, s := range got {
			if s.BytesIn > 0 && s.BytesOut > 0 {
				n++
			}
		}
		return len(got) == 2 && n == 2
	})
	for _, s := range got {
		client, ok := want[s.Mapping]
		if !ok {
			t.Fatalf("session of mapping %q, want one of %v", s.Mapping, want)
		}
		port := tcpPort
		if s.Protocol == "udp" {
			port = udpPort
		}
		if s.Client != client || s.Public.Port() != port || s.Target != netip.AddrPortFrom(applAddrA, port).String() {
			t.Fatalf("session %s: client %v public %v target %s; want client %v, port %d, target %v:%d",
				s.Mapping, s.Client, s.Public, s.Target, client, port, applAddrA, port)
		}
	}
}

// newLifecycleUplink builds an Uplink towards relay port on 127.0.0.1 (with
// nothing behind it) on a stack that is not running.
func newLifecycleUplink(t *testing.T, port uint16) *tunnel.Uplink {
	t.Helper()
	cfg, _, err := conf.Parse("appliance.toml", []byte(fmt.Sprintf(`
[uplink]
relay = "127.0.0.1:%d"
relay_public_key = %q
private_key = %q
address = %q
relay_address = %q
mtu = %d
`, port, mustKey(t).Public(), mustKey(t), applAddrA, relayTunnelAddr, testMTU)))
	if err != nil {
		t.Fatal(err)
	}
	up := &cfg.Uplinks[0]
	stackSide, outer := tunnelPair(up.MaxMTU)
	st, err := netstack.New(stackSide, netstack.Config{MTU: up.MaxMTU, PathMTU: up.MTU, Addresses: tunnel.TunnelPrefixes(applAddrA)}, nopHandler{}, testLogger(t))
	if err != nil {
		outer.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	u, err := tunnel.NewUplink(&cfg.Uplinks[0], outer, st, testLogger(t), testOpts...)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// newLifecycleRelay builds a one-peer Relay on a stack that is not running.
func newLifecycleRelay(t *testing.T) *tunnel.Relay {
	t.Helper()
	stackSide, outer := tunnelPair(testMTU)
	h := &relayHandler{}
	st, err := netstack.New(stackSide, netstack.Config{Addresses: tunnel.TunnelPrefixes(relayTunnelAddr)}, h, testLogger(t))
	if err != nil {
		outer.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	r, err := tunnel.NewRelay(onePeerRelayConfig(t, mustKey(t), "tcp/1"), outer, st, testLogger(t), testOpts...)
	if err != nil {
		t.Fatal(err)
	}
	h.r = r
	return r
}

type nopHandler struct{}

func (nopHandler) HandleTCP(r *netstack.TCPRequest)        { r.Reject() }
func (nopHandler) HandleUDP(_, _ netip.AddrPort, _ []byte) {}

// component is an Uplink or a Relay under TestLifecycle.
type component struct {
	run   func(context.Context) error
	close func() error
}

func (c component) Run(ctx context.Context) error { return c.run(ctx) }
func (c component) Close() error                  { return c.close() }

// TestLifecycle holds the Uplink and the Relay to the contract every
// component keeps: New starts none of natbox's goroutines (wireguard-go's
// own are allowed: device.NewDevice starts them), Close is idempotent
// before Run and concurrently, Run after Close fails at once, and Run
// returns only after what it started has stopped. Not parallel: it counts
// goroutines.
func TestLifecycle(t *testing.T) {
	builds := map[string]func(t *testing.T) component{
		"uplink": func(t *testing.T) component {
			u := newLifecycleUplink(t, freePort(t, false))
			return component{u.Run, u.Close}
		},
		"relay": func(t *testing.T) component {
			r := newLifecycleRelay(t)
			return component{r.Run, r.Close}
		},
	}
	for name, build := range builds {
		t.Run(name+"/new starts nothing", func(t *testing.T) { testutil.CheckNewStartsNothing(t, build) })
		t.Run(name+"/close before run", func(t *testing.T) {
			testutil.CheckCloseBeforeRun(t, build, func(err error) bool { return errors.Is(err, tunnel.ErrClosed) })
		})
		t.Run(name+"/close ends run", func(t *testing.T) {
			before := testutil.Goroutines()
			c := build(t)
			done := make(chan error, 1)
			go func() { done <- c.run(context.Background()) }()
			// Running: the uplink's monitor, transport ladder, path probe
			// and close watcher; the relay's engine.
			testutil.WaitGoroutines(t, before, map[string]int{"uplink": 4, "relay": 1}[name])
			var wg sync.WaitGroup
			for range 2 {
				wg.Go(func() { c.close() })
			}
			wg.Wait()
			if err := <-done; err != nil {
				t.Fatalf("Run ended by Close: %v", err)
			}
			testutil.WaitGoroutines(t, before, 0)
		})
	}
	// Through a registered port with a flow on it, every goroutine the
	// relay, the uplink, their stacks and engines started ends with their
	// Runs.
	t.Run("relay and uplink with a flow", func(t *testing.T) {
		before := testutil.Goroutines()
		port := freePort(t, false)
		spec := fmt.Sprintf("tcp/%d", port)
		key := mustKey(t)
		relay := startRelay(t, onePeerRelayConfig(t, key, spec), testLogger(t))
		svc, _ := proxyEchoService(t)
		a := startAppliance(t, relay, key, applAddrA, tcpMapping("web", port, svc))
		waitRegistered(t, a, spec)
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, port).String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("ping\n")); err != nil {
			t.Fatal(err)
		}
		if line, err := bufio.NewReader(c).ReadString('\n'); line != "ping\n" {
			t.Fatalf("echo %q, %v", line, err)
		}
		if len(testutil.Goroutines().Started(before)) == 0 {
			t.Fatal("nothing running: the check below proves nothing")
		}
		a.close()
		relay.close() // waits for the relay's and its stack's Run
		testutil.WaitGoroutines(t, before, 0)
	})
}
