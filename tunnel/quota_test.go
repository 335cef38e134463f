package tunnel_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/tunnel"
)

func peerStatus(t *testing.T, relay *relaySide, name string) tunnel.RelayPeerStatus {
	t.Helper()
	for _, p := range relay.relay.Status().Peers {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("no peer %q in the relay status", name)
	return tunnel.RelayPeerStatus{}
}

// TestRelayPeerQuotaIsolatesASprayer: a public client spraying peer a's UDP
// port from 500 source ports fills a's UDP quota, not the relay: the excess
// is refused and counted for a alone, and peer b's TCP keeps working. The
// relay's max_sessions (300) is below the spray, so without the per-peer
// quota b's connection would be refused.
func TestRelayPeerQuotaIsolatesASprayer(t *testing.T) {
	t.Parallel()
	const spray, quota = 500, 50
	portA, portB := freePort(t, false), freePort(t, false)
	specA, specB := fmt.Sprintf("udp/%d", portA), fmt.Sprintf("tcp/%d", portB)
	keyA, keyB := mustKey(t), mustKey(t)
	cfg := relayConfig(mustKey(t), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, specA)},
		conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB, Ports: mustSpecs(t, specB)},
	)
	cfg.Relay.MaxSessions = 300
	cfg.Relay.PeerMaxUDPSessions = quota
	relay := startRelay(t, cfg, testLogger(t))
	// a's own forwarder takes the whole spray (one source, 500 ports), so
	// every sprayed session gets its replies and, once answered, cannot be
	// evicted for b's connection or another sprayed port.
	a := startAppliance(t, relay, keyA, applAddrA, mappingTOML("game", "udp", portA, udpEchoService(t),
		"max_udp_sessions_per_source = 1000\nnew_sessions_per_source_per_second = 10000\n"))
	svc, _ := proxyEchoService(t)
	b := startAppliance(t, relay, keyB, applAddrB, tcpMapping("web", portB, svc))
	waitRegistered(t, a, specA)
	waitRegistered(t, b, specB)

	// The first sprayed ports converse (two exchanges each: assured sessions
	// are never evicted for new ones); the rest find a's quota full.
	public := netip.AddrPortFrom(loopback4, portA)
	for range quota {
		c := udpClient(t)
		for range 2 {
			if got := udpRoundTrip(t, c, public, []byte("spray")); string(got) != "spray" {
				t.Fatalf("echo %q", got)
			}
		}
	}
	for range spray - quota {
		if _, err := udpClient(t).WriteToUDPAddrPort([]byte("spray"), public); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "every sprayed datagram admitted or refused", func() bool {
		p := peerStatus(t, relay, "a")
		return p.UDPSessions == quota && p.SessionsOpened == quota && p.Refusals["over_limit_peer_udp_sessions"] == spray-quota
	})
	if p := peerStatus(t, relay, "a"); p.PublicBytesOut != 2*quota*uint64(len("spray")) || p.UDPEvicted != 0 {
		t.Fatalf("peer a: public bytes out %d, udp evicted %d; want two replies per admitted session, none evicted", p.PublicBytesOut, p.UDPEvicted)
	}

	if _, got := tcpRoundTrip(t, netip.AddrPortFrom(loopback4, portB), []byte("still here")); string(got) != "still here" {
		t.Fatalf("peer b's tcp echo %q", got)
	}
	if pb := peerStatus(t, relay, "b"); len(pb.Refusals) != 0 || pb.SessionsOpened != 1 {
		t.Fatalf("peer b: refusals %v, sessions opened %d; want none and 1", pb.Refusals, pb.SessionsOpened)
	}
	if st := relay.relay.Status(); st.OverLimit != 0 {
		t.Fatalf("relay over_limit %d, want 0: the sprayer must hit its own quota first", st.OverLimit)
	}
}

// TestRelayUDPFollowsTheMappingIdleTimeout: the relay keeps a public UDP
// session for the idle timeout the appliance registered with its port, not
// its own default: a reply the target sends after a quiet spell longer than
// the relay's default (here 500 ms, standing in for the old fixed 2 min)
// but shorter than the mapping's idle_timeout (3 s, standing in for 5 min)
// still reaches the client, on the same session.
func TestRelayUDPFollowsTheMappingIdleTimeout(t *testing.T) {
	t.Parallel()
	const relayDefault, quiet = 500 * time.Millisecond, 1500 * time.Millisecond
	port := freePort(t, false)
	spec := fmt.Sprintf("udp/%d", port)
	key := mustKey(t)
	relay := startRelay(t, onePeerRelayConfig(t, key, spec), testLogger(t), tunnel.WithUDPIdleTimeout(relayDefault))

	// The target answers at once, and again when told to (after the quiet spell).
	svc, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback4, 0)))
	if err != nil {
		t.Fatal(err)
	}
	push := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		n, from, err := svc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		svc.WriteToUDPAddrPort(buf[:n], from)
		select {
		case <-push:
			svc.WriteToUDPAddrPort([]byte("late"), from)
		case <-t.Context().Done():
		}
	}()
	t.Cleanup(func() { svc.Close(); <-done })
	svcPort := uint16(svc.LocalAddr().(*net.UDPAddr).Port)

	a := startAppliance(t, relay, key, applAddrA, mappingTOML("game", "udp", port, svcPort, "idle_timeout = \"3s\"\n"))
	waitRegistered(t, a, spec)
	c := udpClient(t)
	public := netip.AddrPortFrom(loopback4, port)
	if _, err := c.WriteToUDPAddrPort([]byte("hi"), public); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, _, err := c.ReadFromUDPAddrPort(buf); err != nil || string(buf[:n]) != "hi" {
		t.Fatalf("echo %q, %v", buf[:n], err)
	}

	time.Sleep(quiet) // the scenario: nobody sends for longer than the relay's default
	close(push)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "late" || from.Port() != port {
		t.Fatalf("late reply %q from %v, %v; want \"late\" from port %d", buf[:n], from, err, port)
	}
	if p := peerStatus(t, relay, "a"); p.SessionsOpened != 1 || p.UDPSessions != 1 {
		t.Fatalf("peer a: sessions opened %d, udp sessions %d; want the one session, still open", p.SessionsOpened, p.UDPSessions)
	}
}

// TestRelayPeerQuotaResetsAndReloads: a public TCP client over its peer's
// session quota is reset and counted for that peer; a reload that raises
// the peer's own max_sessions admits it, without cutting the admitted flow.
func TestRelayPeerQuotaResetsAndReloads(t *testing.T) {
	t.Parallel()
	relay, cfg, _, _, public := tcpEchoThroughRelay(t, func(c *conf.RelayConfig) { c.Relay.PeerMaxSessions = 1 })

	first, err := net.DialTimeout("tcp", public.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	expectEchoByte(t, first, 'x')
	expectReset(t, public)
	if p := peerStatus(t, relay, "a"); p.Refusals["over_limit_peer_sessions"] != 1 || p.SessionsActive != 1 {
		t.Fatalf("peer a: refusals %v, active %d; want over_limit_peer_sessions 1 and the first flow", p.Refusals, p.SessionsActive)
	}

	raised := *cfg
	raised.Peers = []conf.Peer{cfg.Peers[0]}
	raised.Peers[0].MaxSessions = 2 // the peer's own, over [relay]'s 1
	if err := relay.relay.Reload(&raised); err != nil {
		t.Fatal(err)
	}
	second, err := net.DialTimeout("tcp", public.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	expectEchoByte(t, second, 'y')
	expectEchoByte(t, first, 'z')
	if p := peerStatus(t, relay, "a"); p.SessionsActive != 2 || p.SessionsOpened != 2 {
		t.Fatalf("peer a after the reload: active %d, opened %d; want 2 and 2", p.SessionsActive, p.SessionsOpened)
	}
}

// expectEchoByte writes b on c and wants it back.
func expectEchoByte(t *testing.T, c net.Conn, b byte) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{b}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := io.ReadFull(c, buf); err != nil || buf[0] != b {
		t.Fatalf("echo of %q: %q, %v", b, buf, err)
	}
}

// TestRelayConnectionLog: with log.connections, the relay writes one line
// per closed public session naming the real client, the peer's mapping and
// the bytes, as the appliance does.
func TestRelayConnectionLog(t *testing.T) {
	t.Parallel()
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	key := mustKey(t)
	cfg := onePeerRelayConfig(t, key, spec)
	cfg.Log.Connections = true
	core, logs := observer.New(zap.InfoLevel)
	relay := startRelay(t, cfg, zap.New(core))
	svc, _ := proxyEchoService(t)
	a := startAppliance(t, relay, key, applAddrA, tcpMapping("web", port, svc))
	waitRegistered(t, a, spec)

	client, got := tcpRoundTrip(t, netip.AddrPortFrom(loopback4, port), []byte("logged"))
	if string(got) != "logged" {
		t.Fatalf("echo %q", got)
	}
	var line observer.LoggedEntry
	waitFor(t, 5*time.Second, "the connection line", func() bool {
		entries := logs.FilterMessage("connection").All()
		if len(entries) == 0 {
			return false
		}
		line = entries[0]
		return true
	})
	f := line.ContextMap()
	if !strings.HasSuffix(line.LoggerName, "conn") || f["src"] != client.String() || f["rule"] != "a/"+spec || f["bytes_rx"] != uint64(len("logged")) ||
		f["target"] != netip.AddrPortFrom(applAddrA, port).String() {
		t.Fatalf("connection line %s %v, want one from %s on a/%s", line.LoggerName, f, client, spec)
	}
}
