package tunnel_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/testutil"
	"github.com/natbox/natbox/tunnel"
)

// warmPeer is the relay's status of its one peer.
func warmPeer(t *testing.T, relay *relaySide) tunnel.RelayPeerStatus {
	t.Helper()
	ps := relay.relay.Status().Peers
	if len(ps) != 1 {
		t.Fatalf("relay has %d peers, want 1", len(ps))
	}
	return ps[0]
}

// gatedApplianceTOML is an appliance reaching the relay through gate, over
// UDP, at a fixed MTU: no path probe replaces the warm streams while a test
// counts them.
func gatedApplianceTOML(gate *udpGate, relay *relaySide, key conf.Key, mappings string) string {
	return applianceTOMLVia("127.0.0.1", gate.port(), relay, key, applAddrA, fmt.Sprintf("max_mtu = %d\n", testMTU)+mappings)
}

// requestTarget records the first line of each connection on lines and
// answers it with "ok\n".
func requestTarget(t *testing.T) (port uint16, lines <-chan string) {
	t.Helper()
	ch := make(chan string, 16)
	ap := testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return
		}
		ch <- line
		c.Write([]byte("ok\n"))
	})
	return ap.Port(), ch
}

// TestWarmStreamsSendTheFirstBytesAtOnce: a public connection's request
// reaches the appliance's target while nothing can come back from the
// appliance, so no handshake inside the tunnel stood before it (one round
// trip between relay and appliance per connection, not two); the answer
// follows once the way back opens. The flow carries the client's own
// address (the mapping's allowlist admits only it, not the relay's tunnel
// address). Without warm streams the request waits for the handshake.
func TestWarmStreamsSendTheFirstBytesAtOnce(t *testing.T) {
	t.Parallel()
	for _, warm := range []bool{true, false} {
		t.Run(fmt.Sprintf("warm=%v", warm), func(t *testing.T) {
			t.Parallel()
			port := freePort(t, false)
			spec := fmt.Sprintf("tcp/%d", port)
			key := mustKey(t)
			var opts []tunnel.Option
			if !warm {
				opts = append(opts, tunnel.WithWarmStreams(0, time.Minute))
			}
			relay := startRelay(t, onePeerRelayConfig(t, key, spec), testLogger(t), opts...)
			gate := newUDPGate(t, relay.port)
			gate.open.Store(true)
			target, lines := requestTarget(t)
			a := runAppliance(t, gatedApplianceTOML(gate, relay, key,
				mappingTOML("web", "tcp", port, target, "allow = [\"127.0.0.1/32\"]\n")), applAddrA)
			waitRegistered(t, a, spec)
			if warm {
				waitFor(t, 10*time.Second, "warm streams", func() bool { return warmPeer(t, relay).WarmStreamsIdle > 0 })
			}

			gate.upHeld.Store(true)
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, port).String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write([]byte("GET /\n")); err != nil {
				t.Fatal(err)
			}
			wait := 10 * time.Second
			if !warm {
				wait = time.Second // long enough for a request that needs no handshake
			}
			select {
			case line := <-lines:
				if !warm {
					t.Fatalf("the target read %q while the appliance could not answer the handshake", line)
				}
				if line != "GET /\n" {
					t.Fatalf("target read %q", line)
				}
			case <-time.After(wait):
				if warm {
					t.Fatal("the request did not reach the target while the way back was held")
				}
			}
			gate.upHeld.Store(false)
			p, us := warmPeer(t, relay), a.uplink.Status()
			if !warm {
				// The rest is TCP's retransmission of the lost handshake.
				if p.WarmStreamsUsed != 0 || p.WarmStreamsIdle != 0 || us.WarmStreamsServed != 0 {
					t.Fatalf("without warm streams: relay used %d, idle %d; appliance served %d", p.WarmStreamsUsed, p.WarmStreamsIdle, us.WarmStreamsServed)
				}
				return
			}
			got, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || got != "ok\n" {
				t.Fatalf("answer %q, %v", got, err)
			}
			if p.WarmStreamsUsed != 1 || us.WarmStreamsServed != 1 {
				t.Fatalf("relay used %d warm streams, appliance served %d; want 1, 1", p.WarmStreamsUsed, us.WarmStreamsServed)
			}
			for _, m := range a.engine.Snapshot().Mappings {
				refused := uint64(0)
				for _, n := range m.Refusals {
					refused += n
				}
				if m.Name == "web" && (m.SessionsOpened != 1 || refused != 0) {
					t.Fatalf("appliance mapping: %d sessions, refusals %v; want 1, none", m.SessionsOpened, m.Refusals)
				}
			}

			// The session's end closes the relay's streams toward the peer.
			c.Close()
			a.close()
			waitFor(t, 10*time.Second, "the relay's tunnel connections closed", func() bool { return relay.stack.Stats().TCPConns == 0 })
		})
	}
}

// TestWarmStreamUnansweredIsADialFailure: a warm stream whose appliance
// does not answer within relay.dial_timeout resets the client and counts
// as a failed dial, as an unanswered handshake did.
func TestWarmStreamUnansweredIsADialFailure(t *testing.T) {
	t.Parallel()
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	key := mustKey(t)
	cfg := onePeerRelayConfig(t, key, spec)
	cfg.Relay.DialTimeout = conf.Duration(time.Second)
	relay := startRelay(t, cfg, testLogger(t))
	gate := newUDPGate(t, relay.port)
	gate.open.Store(true)
	a := runAppliance(t, gatedApplianceTOML(gate, relay, key, mappingTOML("echo", "tcp", port, echoService(t), "")), applAddrA)
	waitRegistered(t, a, spec)
	waitFor(t, 10*time.Second, "warm streams", func() bool { return warmPeer(t, relay).WarmStreamsIdle > 0 })
	gate.open.Store(false)
	start := time.Now()
	expectReset(t, netip.AddrPortFrom(loopback4, port))
	if d := time.Since(start); d < time.Second {
		t.Fatalf("reset after %v, before the dial timeout", d)
	}
	waitFor(t, 10*time.Second, "the relay to count the failure", func() bool { return warmPeer(t, relay).DialFailures > 0 })
	if p := warmPeer(t, relay); p.WarmStreamsUsed != 1 || p.DialFailures != 1 {
		t.Fatalf("relay: warm streams used %d, dial failures %d; want 1, 1", p.WarmStreamsUsed, p.DialFailures)
	}
}

// warmEcho is a relay keeping up to 8 warm streams and an appliance with
// applWarm serving an echo on the port it returns, registered.
func warmEcho(t *testing.T, applWarm tunnel.Option) (port uint16, relay *relaySide, a *appliance) {
	t.Helper()
	port = freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	key := mustKey(t)
	relay = startRelay(t, onePeerRelayConfig(t, key, spec), testLogger(t), tunnel.WithWarmStreams(8, time.Minute))
	a = runAppliance(t, applianceTOML("127.0.0.1", relay, key, applAddrA, mappingTOML("echo", "tcp", port, echoService(t), "")),
		applAddrA, applWarm)
	waitRegistered(t, a, spec)
	return port, relay, a
}

// TestDeadWarmStreamIsNotUsed: warm streams the appliance closed while they
// waited (here its wait bound, 2 x 300 ms, against the relay's minute) sit
// in the relay's pool until taken. A public connection must not be given
// one, which would reset it, but the next live stream or a fresh dial; the
// relay counts what it threw away.
func TestDeadWarmStreamIsNotUsed(t *testing.T) {
	t.Parallel()
	port, relay, a := warmEcho(t, tunnel.WithWarmStreams(8, 300*time.Millisecond))
	waitFor(t, 10*time.Second, "warm streams", func() bool { return a.uplink.Status().WarmStreamsWaiting > 0 })
	waitFor(t, 10*time.Second, "the appliance to give up on them", func() bool { return a.uplink.Status().WarmStreamsWaiting == 0 })
	if p := warmPeer(t, relay); p.WarmStreamsIdle == 0 {
		t.Fatal("the relay's pool is empty: nothing to test")
	}
	for i := range 3 {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, port).String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		echoLine(t, c, fmt.Sprintf("flow %d\n", i))
		c.Close()
	}
	if p := warmPeer(t, relay); p.WarmStreamsDead == 0 {
		t.Fatalf("relay: %d dead warm streams counted, want some (used %d, missed %d)", p.WarmStreamsDead, p.WarmStreamsUsed, p.WarmStreamsMissed)
	}
}

// TestWarmStreamsBounded: the relay keeps at most WithWarmStreams' max
// toward a peer, the appliance holds at most twice its own max waiting and
// refuses the rest, both count it, and every flow still goes through (a
// flow that finds no warm stream opens its own connection).
func TestWarmStreamsBounded(t *testing.T) {
	t.Parallel()
	port, relay, a := warmEcho(t, tunnel.WithWarmStreams(2, time.Minute))
	waitFor(t, 10*time.Second, "warm streams", func() bool { return warmPeer(t, relay).WarmStreamsIdle > 0 })

	// Held open at once: more than the pool has, so it misses and grows.
	const flows = 12
	conns := make([]net.Conn, 0, flows)
	for range flows {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, port).String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	for i, c := range conns {
		echoLine(t, c, fmt.Sprintf("flow %d\n", i))
	}
	waitFor(t, 10*time.Second, "the appliance to refuse past its bound", func() bool {
		return a.uplink.Status().WarmStreamsRefused > 0 && warmPeer(t, relay).WarmStreamDialFailures > 0
	})
	p, us := warmPeer(t, relay), a.uplink.Status()
	if p.WarmStreamsMissed == 0 || p.WarmStreamsIdle > 8 || us.WarmStreamsWaiting > 4 {
		t.Fatalf("relay: missed %d, idle %d (max 8); appliance waiting %d (max 4)", p.WarmStreamsMissed, p.WarmStreamsIdle, us.WarmStreamsWaiting)
	}
	if got := p.WarmStreamsUsed + p.WarmStreamsMissed; got != flows || p.SessionsOpened != flows {
		t.Fatalf("relay: %d flows on warm streams or their own, %d sessions; want %d", got, p.SessionsOpened, flows)
	}
	for i, c := range conns {
		echoLine(t, c, fmt.Sprintf("again %d\n", i))
	}
}

// TestWarmHeaderRoundTrip: what the relay writes, the appliance reads; a
// malformed header is an error, never a flow.
func TestWarmHeaderRoundTrip(t *testing.T) {
	for _, client := range []netip.AddrPort{
		netip.MustParseAddrPort("203.0.113.7:40000"),
		netip.MustParseAddrPort("[2001:db8::1]:1"),
		netip.MustParseAddrPort("[::ffff:198.51.100.2]:65535"),
	} {
		b := tunnel.AppendWarmHeader(nil, client, 443)
		got, port, err := tunnel.ReadWarmHeader(bytes.NewReader(append(b, "GET"...)))
		want := netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
		if err != nil || got != want || port != 443 {
			t.Fatalf("%s: read %s port %d, %v", client, got, port, err)
		}
	}
	for _, bad := range [][]byte{
		{}, {1, 4, 1, 187}, {2, 4, 1, 187, 0, 1, 1, 2, 3, 4}, {1, 5, 1, 187, 0, 1, 1, 2, 3, 4},
		{1, 4, 0, 0, 0, 1, 1, 2, 3, 4}, {1, 4, 1, 187, 0, 1, 0, 0, 0, 0}, {1, 6, 1, 187, 0, 1, 1, 2, 3, 4},
	} {
		if c, port, err := tunnel.ReadWarmHeader(bytes.NewReader(bad)); err == nil {
			t.Fatalf("% x: read %s port %d, want an error", bad, c, port)
		}
	}
	if _, _, err := tunnel.ReadWarmHeader(bytes.NewReader(nil)); err != io.EOF {
		t.Fatalf("empty stream: %v, want EOF (a relay closing an idle stream)", err)
	}
}

// TestWarmStreamMalformedHeader: a stream from the relay's address to port
// 7 whose header is not one is closed and counted, never forwarded; the
// mapping still works.
func TestWarmStreamMalformedHeader(t *testing.T) {
	t.Parallel()
	relay, key, port, spec := startOnePeerRelay(t, "tcp")
	a := startAppliance(t, relay, key, applAddrA, mappingTOML("echo", "tcp", port, echoService(t), ""))
	waitRegistered(t, a, spec)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := relay.stack.DialTCP(ctx, netip.AddrPortFrom(relayTunnelAddr, 0), netip.AddrPortFrom(applAddrA, tunnel.ControlPort))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{9, 4, 0, 80, 0, 1, 203, 0, 113, 7, 'G', 'E', 'T'}); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("read %d bytes, %v; want the stream closed without an answer", n, err)
	}
	if st := a.uplink.Status(); st.WarmStreamsBad != 1 || st.WarmStreamsServed != 0 {
		t.Fatalf("appliance: warm streams bad %d, served %d; want 1, 0", st.WarmStreamsBad, st.WarmStreamsServed)
	}
	if _, got := tcpRoundTrip(t, netip.AddrPortFrom(loopback4, port), []byte("still\n")); string(got) != "still\n" {
		t.Fatalf("echo after the bad stream: %q", got)
	}
}
