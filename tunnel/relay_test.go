package tunnel_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/testutil"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/tunnel"
)

var (
	applAddrA = netip.MustParseAddr("100.96.0.2")
	applAddrB = netip.MustParseAddr("100.96.0.3")
	loopback4 = netip.MustParseAddr("127.0.0.1")
	loopback6 = netip.MustParseAddr("::1")
)

// proxyEchoService accepts TCP on 127.0.0.1, reads a PROXY v1 header line,
// reports it (up to 16 unread), and echoes the rest.
func proxyEchoService(t *testing.T) (port uint16, headers <-chan string) {
	t.Helper()
	ch := make(chan string, 16)
	ap := testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) {
		br := bufio.NewReader(c)
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		select { // tests that do not read the headers must not stall
		case ch <- line:
		default:
		}
		io.Copy(c, br)
		c.CloseWrite()
	})
	return ap.Port(), ch
}

// udpEchoService echoes datagrams on 127.0.0.1.
func udpEchoService(t *testing.T) uint16 {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return uint16(pc.LocalAddr().(*net.UDPAddr).Port)
}

// tcpRoundTrip sends payload through the relay's public port and returns
// the client's local address and what came back after half-close.
func tcpRoundTrip(t *testing.T, public netip.AddrPort, payload []byte) (netip.AddrPort, []byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", public.String(), 5*time.Second)
	if err != nil {
		t.Fatalf("dial relay %s: %v", public, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	go func() {
		c.Write(payload)
		c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read from relay %s: %v", public, err)
	}
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), got
}

// udpRoundTrip sends one datagram and waits for the echo, retrying a few
// times (the first datagram may race the tunnel's handshake).
func udpRoundTrip(t *testing.T, c *net.UDPConn, public netip.AddrPort, payload []byte) []byte {
	t.Helper()
	buf := make([]byte, 65536)
	for range 10 {
		if _, err := c.WriteToUDPAddrPort(payload, public); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err == nil {
			if from.Port() != public.Port() {
				t.Fatalf("reply from %s, want port %d", from, public.Port())
			}
			return buf[:n]
		}
	}
	t.Fatalf("no udp echo through %s", public)
	return nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// A relayed request answered at once crosses the tunnel as one packet each
// way, like a kernel's TCP would send it: each stack holds the pure ACK of
// the request (or of the answer) until the answer (or the next request)
// carries it (netstack/delack.go on a Direct link). Without that, every
// round trip cost four tunnel packets, each encrypted, sent and handled by
// two stacks.
func TestRelayedRoundTripOnePacketEachWay(t *testing.T) {
	t.Parallel()
	publics, a := relayPathAppliance(t, benchTarget{"tcp", tcpService(t, func(c *net.TCPConn) { io.Copy(c, c) })})
	c, err := net.DialTimeout("tcp", publics[0], 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	testutil.EchoRoundTrip(t, c, 0) // the relayed connection is up end to end
	const n = 200
	st0 := a.stack.Stats()
	for i := range n {
		testutil.EchoRoundTrip(t, c, i+1)
	}
	st := a.stack.Stats()
	in, out, suppressed := st.PacketsIn-st0.PacketsIn, st.PacketsOut-st0.PacketsOut, st.AcksSuppressed-st0.AcksSuppressed
	t.Logf("%d round trips: %d tunnel packets in, %d out, %d ACKs suppressed", n, in, out, suppressed)
	// Two per round trip each way without held ACKs; a hold that a busy
	// machine's scheduling outlasts sends its ACK after all, so allow some.
	if in > n+n/4 || out > n+n/4 || suppressed < n/2 {
		t.Fatalf("%d round trips: %d tunnel packets in, %d out, %d ACKs suppressed; want about one packet each way per round trip", n, in, out, suppressed)
	}
}

// TestRelayEndToEnd: TCP and UDP through the relay with exact bytes; the
// appliance sees each client's real address and port; a port outside the
// peer's allowance is refused and the appliance logs why.
func TestRelayEndToEnd(t *testing.T) {
	t.Parallel()
	v6 := haveIPv6()
	binds := []netip.Addr{loopback4}
	if v6 {
		binds = append(binds, loopback6)
	}
	tcpPort, udpPort, deniedPort := freePort(t, v6), freePort(t, v6), freePort(t, v6)
	keyA := mustKey(t)
	relay := startRelay(t, relayConfig(mustKey(t), "127.0.0.1:0", binds, conf.Peer{
		Name: "a", PublicKey: keyA.Public(), Address: applAddrA,
		Ports: mustSpecs(t, fmt.Sprintf("tcp/%d", tcpPort), fmt.Sprintf("udp/%d", udpPort)),
	}), testLogger(t))

	svcTCP, headers := proxyEchoService(t)
	svcUDP := udpEchoService(t)
	appl := startAppliance(t, relay, keyA, applAddrA, fmt.Sprintf(`
[[mapping]]
name = "web"
protocol = "tcp"
listen = "%d"
target = "127.0.0.1:%d"
proxy_protocol = "v1"

[[mapping]]
name = "game"
protocol = "udp"
listen = "%d"
target = "127.0.0.1:%d"

[[mapping]]
name = "ssh"
protocol = "tcp"
listen = "%d"
target = "127.0.0.1:%d"
`, tcpPort, svcTCP, udpPort, svcUDP, deniedPort, svcTCP))

	tcpSpec, udpSpec, deniedSpec := fmt.Sprintf("tcp/%d", tcpPort), fmt.Sprintf("udp/%d", udpPort), fmt.Sprintf("tcp/%d", deniedPort)
	waitRegistered(t, appl, tcpSpec, udpSpec)

	t.Run("refused port logged", func(t *testing.T) {
		waitFor(t, 5*time.Second, "refusal log", func() bool {
			for _, e := range appl.logs.FilterMessage("relay refused port").All() {
				f := e.ContextMap()
				if e.Level == zap.WarnLevel && f["port"] == deniedSpec && f["reason"] == "not in this peer's ports" {
					return true
				}
			}
			return false
		})
		if got := appl.uplink.Status().Refused[deniedSpec]; got != "not in this peer's ports" {
			t.Fatalf("status refusal = %q", got)
		}
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, deniedPort).String(), time.Second)
		if err == nil {
			c.Close()
			t.Fatal("relay opened a refused port")
		}
	})

	t.Run("tcp", func(t *testing.T) {
		for _, host := range binds {
			public := netip.AddrPortFrom(host, tcpPort)
			payload := randomBytes(256 << 10)
			client, got := tcpRoundTrip(t, public, payload)
			if !bytes.Equal(got, payload) {
				t.Fatalf("via %s: echoed %d bytes, sent %d (equal: false)", public, len(got), len(payload))
			}
			var header string
			select {
			case header = <-headers:
			case <-time.After(5 * time.Second):
				t.Fatal("no PROXY header at the target")
			}
			// "PROXY TCP4 <client> <dst> <client port> <dst port>": the real
			// loopback client, not the relay's or the tunnel's address.
			fields := strings.Fields(header)
			if len(fields) != 6 || fields[2] != client.Addr().String() || fields[4] != fmt.Sprint(client.Port()) {
				t.Fatalf("via %s: target saw %q, client is %s", public, header, client)
			}
			t.Logf("via %s: target saw %q", public, strings.TrimSpace(header))
		}
	})

	t.Run("udp", func(t *testing.T) {
		for _, host := range binds {
			c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(host, 0)))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			public := netip.AddrPortFrom(host, udpPort)
			for _, size := range []int{1, 512, 1300} {
				payload := randomBytes(size)
				if got := udpRoundTrip(t, c, public, payload); !bytes.Equal(got, payload) {
					t.Fatalf("via %s: echoed %x, sent %x", public, got, payload)
				}
			}
			client := c.LocalAddr().(*net.UDPAddr).AddrPort()
			found := false
			for _, s := range appl.engine.Sessions() {
				found = found || (s.Protocol == "udp" && s.Client == client)
			}
			if !found {
				t.Fatalf("appliance has no udp session from the real client %s: %+v", client, appl.engine.Sessions())
			}
		}
		if st := relay.relay.Status(); st.UDPSessions != len(binds) {
			t.Fatalf("relay udp sessions = %d, want %d", st.UDPSessions, len(binds))
		}
	})

	t.Run("status", func(t *testing.T) {
		st := relay.relay.Status()
		if len(st.Peers) != 1 {
			t.Fatalf("peers %+v", st.Peers)
		}
		p := st.Peers[0]
		if p.Name != "a" || !p.Connected || p.LastHandshake.IsZero() || p.RxBytes == 0 || p.TxBytes == 0 ||
			strings.Join(p.Ports, ",") != tcpSpec+","+udpSpec || p.Refused[deniedSpec] == "" {
			t.Fatalf("relay peer status %+v", p)
		}
		if age := p.HandshakeAge(); age < 0 || age > time.Minute {
			t.Fatalf("relay peer handshake age %v", age)
		}
		us := appl.uplink.Status()
		if us.Peer != "a" || us.LastHandshake.IsZero() || us.RxBytes == 0 {
			t.Fatalf("uplink status %+v", us)
		}
	})
}

// TestRelayPeersIsolated: two peers cannot take the same port, and one
// peer cannot reach the other's tunnel address, ports or UDP flows.
func TestRelayPeersIsolated(t *testing.T) {
	t.Parallel()
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	uspec := fmt.Sprintf("udp/%d", port)
	keyA, keyB := mustKey(t), mustKey(t)
	relay := startRelay(t, relayConfig(mustKey(t), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, "tcp+udp/"+fmt.Sprint(port))},
		conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB, Ports: mustSpecs(t, "tcp+udp/"+fmt.Sprint(port))},
	), testLogger(t))

	svcTCP, _ := proxyEchoService(t)
	svcUDP := udpEchoService(t)
	mappings := tcpMapping("web", port, svcTCP) + udpMapping("game", port, svcUDP)
	a := startAppliance(t, relay, keyA, applAddrA, mappings)
	waitRegistered(t, a, spec, uspec)
	b := startAppliance(t, relay, keyB, applAddrB, mappings)
	waitFor(t, 20*time.Second, "b's refusal", func() bool {
		r := b.uplink.Status().Refused
		return r[spec] == `held by peer "a"` && r[uspec] == `held by peer "a"`
	})

	// A UDP client of a's port, so there is a session b could try to hijack.
	client := udpClient(t)
	public := netip.AddrPortFrom(loopback4, port)
	if got := udpRoundTrip(t, client, public, []byte("hello a")); string(got) != "hello a" {
		t.Fatalf("echo %q", got)
	}
	clientAddr := client.LocalAddr().(*net.UDPAddr).AddrPort()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	for _, dst := range []netip.AddrPort{
		netip.AddrPortFrom(applAddrA, port),                     // a's tunnel address
		netip.AddrPortFrom(tunnel.TunnelAddr6(applAddrA), port), // a's v6 tunnel address
		netip.AddrPortFrom(relayTunnelAddr, port),               // the relay's address, a public port
		netip.AddrPortFrom(loopback4, port),                     // the relay host's public listener
	} {
		src := netip.AddrPortFrom(applAddrB, 0)
		if dst.Addr().Is6() {
			src = netip.AddrPortFrom(tunnel.TunnelAddr6(applAddrB), 0)
		}
		c, err := b.stack.DialTCP(ctx, src, dst)
		if err == nil {
			c.Close()
			t.Fatalf("b reached %s through the relay", dst)
		}
	}
	// b answering a's client session, from its own address or spoofing a's:
	// neither reaches the client. The relay refuses the first (counted);
	// WireGuard drops the spoofed one before the relay sees it, so a last
	// one from b's own address marks when both were decided: the tunnel
	// delivers a peer's packets in order.
	rejected := relay.relay.Status().Rejected
	for _, w := range []struct {
		src netip.Addr
		msg string
	}{{applAddrB, "from b"}, {applAddrA, "b as a"}, {applAddrB, "from b again"}} {
		if err := b.stack.WriteUDP(netip.AddrPortFrom(w.src, port), clientAddr, []byte(w.msg)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "the relay to refuse b's datagrams", func() bool { return relay.relay.Status().Rejected >= rejected+2 })
	// Anything the relay passed on is in the client's socket by now.
	client.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	buf := make([]byte, 100)
	if n, _, err := client.ReadFromUDPAddrPort(buf); !errors.Is(err, context.DeadlineExceeded) && !isTimeout(err) {
		t.Fatalf("client received %q from b (err %v)", buf[:n], err)
	}
	if st := relay.relay.Status(); st.Rejected == 0 {
		t.Fatalf("relay counted no rejected flows: %+v", st)
	}
	// The control port closes on a client that does not start with hello
	// or sends an oversize line, and a's registration is unaffected.
	for _, first := range []string{
		`{"v":1,"type":"register","ports":["tcp/1"]}` + "\n",
		`{"v":1,"type":"hello","version":"` + strings.Repeat("x", 70<<10) + `"}` + "\n",
	} {
		dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := b.stack.DialTCP(dctx, netip.AddrPortFrom(applAddrB, 0), netip.AddrPortFrom(relayTunnelAddr, tunnel.ControlPort))
		dcancel()
		if err != nil {
			t.Fatalf("dial control port: %v", err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte(first))
		reply, err := io.ReadAll(c)
		c.Close()
		if isTimeout(err) {
			t.Fatalf("relay kept a bad control connection open (sent %.40q)", first)
		}
		if strings.Contains(string(reply), `"hello"`) {
			t.Fatalf("relay greeted a bad client: %q", reply)
		}
	}
	// a's flows still work.
	if got := udpRoundTrip(t, client, public, []byte("still a")); string(got) != "still a" {
		t.Fatalf("echo %q", got)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestRelayRestart: the relay restarts mid-run with the same key and port;
// the appliance re-registers on its own and the mapping works again.
func TestRelayRestart(t *testing.T) {
	t.Parallel()
	port := freePort(t, false)
	keyA, relayKey := mustKey(t), mustKey(t)
	peer := conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, fmt.Sprintf("tcp/%d", port))}
	log := testLogger(t)
	relay := startRelay(t, relayConfig(relayKey, "127.0.0.1:0", []netip.Addr{loopback4}, peer), log)
	svc, headers := proxyEchoService(t)
	appl := startAppliance(t, relay, keyA, applAddrA, fmt.Sprintf(`
[[mapping]]
name = "web"
protocol = "tcp"
listen = "%d"
target = "127.0.0.1:%d"
proxy_protocol = "v1"
`, port, svc))
	spec := fmt.Sprintf("tcp/%d", port)
	waitRegistered(t, appl, spec)
	public := netip.AddrPortFrom(loopback4, port)
	if _, got := tcpRoundTrip(t, public, []byte("before")); string(got) != "before" {
		t.Fatalf("before restart: %q", got)
	}
	<-headers

	relay.close()
	start := time.Now()
	relay2 := startRelay(t, relayConfig(relayKey, fmt.Sprintf("127.0.0.1:%d", relay.port), []netip.Addr{loopback4}, peer), log)
	waitFor(t, 30*time.Second, "re-registration with the new relay", func() bool {
		for _, p := range relay2.relay.Status().Peers {
			if len(p.Ports) == 1 && p.Ports[0] == spec {
				return true
			}
		}
		return false
	})
	if _, got := tcpRoundTrip(t, public, []byte("after")); string(got) != "after" {
		t.Fatalf("after restart: %q", got)
	}
	<-headers
	t.Logf("mapping back %v after the relay restarted", time.Since(start).Round(time.Millisecond))
}

// TestRelayResetsWhenTheApplianceRefuses: a public connection the appliance
// refuses inside the tunnel (its target is down) reaches the client as a
// reset, not as an empty answer, and both sides count it.
func TestRelayResetsWhenTheApplianceRefuses(t *testing.T) {
	t.Parallel()
	relay, keyA, port, spec := startOnePeerRelay(t, "tcp")
	down := freePort(t, false) // nothing listens there
	a := startAppliance(t, relay, keyA, applAddrA, tcpMapping("down", port, down))
	waitRegistered(t, a, spec)

	expectReset(t, netip.AddrPortFrom(loopback4, port))
	// On a warm stream the relay counts the failure as the session ends,
	// just after the client's reset.
	var peer tunnel.RelayPeerStatus
	waitFor(t, 10*time.Second, "the relay to count the failure", func() bool {
		peer = relay.relay.Status().Peers[0]
		return peer.DialFailures > 0
	})
	// On a warm stream (tunnel/warm.go) the flow was passed on before the
	// refusal came back: a session opened too.
	if peer.DialFailures != 1 || peer.SessionsOpened != peer.WarmStreamsUsed {
		t.Fatalf("peer a: dial failures %d, sessions opened %d, warm streams used %d; want 1 and as many sessions as warm streams",
			peer.DialFailures, peer.SessionsOpened, peer.WarmStreamsUsed)
	}
	for _, m := range a.engine.Snapshot().Mappings {
		if m.Name == "down" && m.Refusals["dial_failed"] != 1 {
			t.Fatalf("appliance refusals %v, want dial_failed 1", m.Refusals)
		}
	}
}

// expectReset connects to addr and wants the connection reset. The kernel
// accepts a public connection before the relay knows the appliance's answer,
// so the reset may arrive before connect returns or on the first read; both
// are the reset a client must see (never a clean, empty close).
func expectReset(t *testing.T, addr netip.AddrPort) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err == nil {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("connection to %s: %v, want connection reset", addr, err)
	}
}

// TestRelayOutageThenReturn: the relay goes away long enough for the
// uplink to notice (its control connection times out and it starts
// retrying with backoff), then comes back with the same key and address:
// the uplink re-registers by itself and the mapping serves again. Unlike
// TestRelayRestart, the appliance has already given up its session.
func TestRelayOutageThenReturn(t *testing.T) {
	t.Parallel()
	port := freePort(t, false)
	keyA, relayKey := mustKey(t), mustKey(t)
	spec := fmt.Sprintf("tcp/%d", port)
	peer := conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, spec)}
	log := testLogger(t)
	relay := startRelay(t, relayConfig(relayKey, "127.0.0.1:0", []netip.Addr{loopback4}, peer), log)
	svc, _ := proxyEchoService(t)
	appl := startAppliance(t, relay, keyA, applAddrA, tcpMapping("web", port, svc))
	waitRegistered(t, appl, spec)
	public := netip.AddrPortFrom(loopback4, port)
	if _, got := tcpRoundTrip(t, public, []byte("before")); string(got) != "before" {
		t.Fatalf("before the outage: %q", got)
	}

	relay.close()
	// The uplink notices within its ping timeout (3 s in tests) and says so once.
	waitFor(t, 15*time.Second, "the uplink to notice the relay is gone", func() bool {
		return appl.uplink.Status().State == tunnel.StateConnecting &&
			appl.logs.FilterMessage("relay control connection lost; reconnecting").Len() > 0
	})
	if _, err := net.DialTimeout("tcp", public.String(), time.Second); err == nil {
		t.Fatal("the public port still accepts with the relay gone")
	}

	relay2 := startRelay(t, relayConfig(relayKey, fmt.Sprintf("127.0.0.1:%d", relay.port), []netip.Addr{loopback4}, peer), log)
	start := time.Now()
	waitRegistered(t, appl, spec)
	waitFor(t, 5*time.Second, "the returned relay to hold the port", func() bool {
		ps := relay2.relay.Status().Peers
		return len(ps) == 1 && slices.Equal(ps[0].Ports, []string{spec})
	})
	if _, got := tcpRoundTrip(t, public, []byte("after")); string(got) != "after" {
		t.Fatalf("after the relay returned: %q", got)
	}
	t.Logf("registered again %v after the relay returned", time.Since(start).Round(time.Millisecond))
}

// TestRelayClientPortTowardTwoPublicPorts: a client may use one source port
// toward two public ports (the kernel keeps only 4-tuples unique). The
// relay originates both flows from that address and port in its stack, so
// the second must not fail to bind there while the first is live or in
// TIME_WAIT (the relay bench's crr resets: ports that an earlier test's
// flows had used were refused as dial_failed).
func TestRelayClientPortTowardTwoPublicPorts(t *testing.T) {
	t.Parallel()
	portA, portB := freePort(t, false), freePort(t, false)
	specA, specB := fmt.Sprintf("tcp/%d", portA), fmt.Sprintf("tcp/%d", portB)
	key := mustKey(t)
	relay := startRelay(t, onePeerRelayConfig(t, key, specA, specB), testLogger(t))
	svc, _ := proxyEchoService(t)
	a := startAppliance(t, relay, key, applAddrA, tcpMapping("a", portA, svc)+tcpMapping("b", portB, svc))
	waitRegistered(t, a, specA, specB)

	// Both sockets bind the same port with SO_REUSEADDR, as a kernel that
	// picks one ephemeral port for two destinations would have them.
	src := freePort(t, false)
	dial := func(port uint16) net.Conn {
		t.Helper()
		d := net.Dialer{
			Timeout:   5 * time.Second,
			LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(loopback4, src)),
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
				}); err != nil {
					return err
				}
				return serr
			},
		}
		c, err := d.Dial("tcp4", netip.AddrPortFrom(loopback4, port).String())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	echo := func(c net.Conn, msg string) {
		t.Helper()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte(msg + "\n")); err != nil {
			t.Fatal(err)
		}
		if line, err := bufio.NewReader(c).ReadString('\n'); line != msg+"\n" {
			t.Fatalf("echo through %v: %q, %v", c.RemoteAddr(), line, err)
		}
	}
	first := dial(portA)
	echo(first, "first")
	second := dial(portB)
	defer second.Close()
	echo(second, "second, while the first is live")
	echo(first, "first again")
	first.Close()
}

// TestFirstHandshakeNeedsNoRetry: a fresh uplink reaches a running relay on
// its first handshake. Setting the endpoint once sent two initiations in one
// TAI64N tick; the relay took the second for a replay, the first one's
// response no longer matched, and every start waited out wireguard-go's 5 s
// retry.
func TestFirstHandshakeNeedsNoRetry(t *testing.T) {
	t.Parallel()
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	key := mustKey(t)
	relay := startRelay(t, onePeerRelayConfig(t, key, spec), testLogger(t))
	svc, _ := proxyEchoService(t)
	start := time.Now()
	a := startAppliance(t, relay, key, applAddrA, tcpMapping("web", port, svc))
	waitRegistered(t, a, spec)
	if took := time.Since(start); took >= 4*time.Second {
		t.Fatalf("registered after %v: the first handshake was retried (wireguard-go retries after 5 s)", took.Round(time.Millisecond))
	}
}
