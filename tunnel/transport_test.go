package tunnel_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/testutil"
	"github.com/natbox/natbox/tunnel"
)

// udpGate stands between the appliance and the relay's WireGuard UDP port
// on loopback: it forwards both ways while open and silently drops
// everything while closed, as a network that blocks UDP does. upHeld
// drops only what the appliance sends. With dropDownEvery n > 0 it loses
// every nth WireGuard data message from the relay, as a lossy path does,
// counting them in droppedDown; dropUpEvery, droppedUp the same for the
// appliance's.
type udpGate struct {
	open          atomic.Bool
	upHeld        atomic.Bool
	dropDownEvery atomic.Int64
	droppedDown   atomic.Int64
	dropUpEvery   atomic.Int64 // the same for the appliance's messages
	droppedUp     atomic.Int64
	dataUp        atomic.Int64
	dataDown      atomic.Int64 // data messages from the relay
	pc            *net.UDPConn // the appliance talks to this
	up            *net.UDPConn // toward the relay
	peer          atomic.Pointer[net.UDPAddr]
}

func newUDPGate(t *testing.T, relayPort uint16) *udpGate {
	t.Helper()
	lo := net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback4, 0))
	pc, err := net.ListenUDP("udp4", lo)
	if err != nil {
		t.Fatal(err)
	}
	up, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback4, relayPort)))
	if err != nil {
		t.Fatal(err)
	}
	roomyBuffers(pc)
	roomyBuffers(up)
	g := &udpGate{pc: pc, up: up}
	done := make(chan struct{}, 2)
	go func() {
		defer func() { done <- struct{}{} }()
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDP(buf)
			if err != nil {
				return
			}
			g.peer.Store(from)
			if every := g.dropUpEvery.Load(); every > 0 && isDataMessage(buf[:n]) {
				if g.dataUp.Add(1)%every == 0 {
					g.droppedUp.Add(1)
					continue
				}
			}
			if g.open.Load() && !g.upHeld.Load() {
				up.Write(buf[:n])
			}
		}
	}()
	go func() {
		defer func() { done <- struct{}{} }()
		buf := make([]byte, 65536)
		for {
			n, err := up.Read(buf)
			if err != nil {
				return
			}
			if every := g.dropDownEvery.Load(); every > 0 && isDataMessage(buf[:n]) {
				if g.dataDown.Add(1)%every == 0 {
					g.droppedDown.Add(1)
					continue
				}
			}
			if p := g.peer.Load(); p != nil && g.open.Load() {
				pc.WriteToUDP(buf[:n], p)
			}
		}
	}()
	t.Cleanup(func() { pc.Close(); up.Close(); <-done; <-done })
	return g
}

// isDataMessage reports whether msg is a WireGuard transport message with a
// packet in it (type 4; a keepalive is one with nothing after its 16-byte
// header but the 16-byte tag).
func isDataMessage(msg []byte) bool {
	return len(msg) > 32 && msg[0] == 4 && msg[1] == 0 && msg[2] == 0 && msg[3] == 0
}

func (g *udpGate) port() uint16 { return uint16(g.pc.LocalAddr().(*net.UDPAddr).Port) }

// echoService echoes TCP on 127.0.0.1.
func echoService(t *testing.T) uint16 {
	t.Helper()
	ap := testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) { io.Copy(c, c) })
	return ap.Port()
}

// streamRelay starts a one-peer relay with the TCP transport on loopback
// and a TCP echo service mapped on one of its ports; it returns the relay,
// the peer's key, and the mapping's config text and public address.
func streamRelay(t *testing.T, opts ...tunnel.Option) (*relaySide, conf.Key, string, string, netip.AddrPort) {
	t.Helper()
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	key := mustKey(t)
	cfg := onePeerRelayConfig(t, key, spec)
	cfg.Relay.TCPListen = "127.0.0.1:0"
	relay := startRelay(t, cfg, testLogger(t), opts...)
	if relay.relay.StreamAddr() == nil {
		t.Fatal("relay has no tcp transport")
	}
	return relay, key, spec, mappingTOML("echo", "tcp", port, echoService(t), ""), netip.AddrPortFrom(loopback4, port)
}

func uplinkTOML(relayUDP uint16, relayTCP net.Addr, relayPub, key conf.Key, transport, mappings string) string {
	return fmt.Sprintf(`
[uplink]
relay = "127.0.0.1:%d"
relay_tcp = %q
transport = %q
relay_public_key = %q
private_key = %q
address = %q
relay_address = %q
keepalive = "1s"
mtu = %d
%s`, relayUDP, relayTCP, transport, relayPub, key, applAddrA, relayTunnelAddr, testMTU, mappings)
}

// echoLine writes line on c and reads it back.
func echoLine(t *testing.T, c net.Conn, line string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, line); err != nil {
		t.Fatalf("write %q: %v", line, err)
	}
	got := make([]byte, len(line))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read back %q: %v", line, err)
	}
	if string(got) != line {
		t.Fatalf("echo: got %q, want %q", got, line)
	}
}

// TestTransportFallbackAndBack: with UDP to the relay blackholed, an "auto"
// uplink moves to TLS, registers, and a public TCP flow crosses; when UDP
// passes again it moves back, and when UDP is blocked mid-session it moves
// to TCP again; the one flow opened at the start works throughout.
func TestTransportFallbackAndBack(t *testing.T) {
	relay, key, spec, mapping, public := streamRelay(t)
	gate := newUDPGate(t, relay.port)
	a := runAppliance(t, uplinkTOML(gate.port(), relay.relay.StreamAddr(), relay.key.Public(), key, "auto", mapping), applAddrA,
		tunnel.WithTransportLadder(time.Second, 2*time.Second, 50*time.Millisecond))

	waitRegistered(t, a, spec)
	st := a.uplink.Status()
	if st.Transport != tunnel.TransportTCP || !st.UsingTCP || st.TransportSwitches != 1 ||
		!strings.Contains(st.SwitchReason, "no reply over udp") || !strings.HasPrefix(st.Endpoint, "tcp/") || st.TCPForLoss {
		t.Fatalf("over blocked udp: %+v", st)
	}
	if rs := relay.relay.Status(); rs.TCPStreams != 1 || rs.TCPAccepted < 1 || !strings.HasPrefix(rs.Peers[0].Endpoint, "tcp/") {
		t.Fatalf("relay: streams %d accepted %d peer endpoint %q", rs.TCPStreams, rs.TCPAccepted, rs.Peers[0].Endpoint)
	}
	c, err := net.Dial("tcp", public.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoLine(t, c, "over tcp\n")
	if logs := a.logs.FilterMessage("uplink transport switched").All(); len(logs) != 1 {
		t.Fatalf("switch logs: %d, want 1", len(logs))
	}

	gate.open.Store(true)
	waitFor(t, 20*time.Second, "the uplink back on udp", func() bool { return a.uplink.Status().Transport == tunnel.TransportUDP })
	st = a.uplink.Status()
	if st.TransportSwitches != 2 || st.SwitchReason != "the relay answered over udp" || strings.HasPrefix(st.Endpoint, "tcp/") {
		t.Fatalf("back on udp: %+v", st)
	}
	echoLine(t, c, "same flow over udp\n")
	waitFor(t, 10*time.Second, "the relay's stream closed", func() bool { return relay.relay.Status().TCPStreams == 0 })
	if ep := relay.relay.Status().Peers[0].Endpoint; strings.HasPrefix(ep, "tcp/") {
		t.Fatalf("relay still answers on %q", ep)
	}
	echoLine(t, c, "and again\n")

	// UDP blocked mid-session: the same flow moves to TCP with the tunnel.
	gate.open.Store(false)
	waitFor(t, 20*time.Second, "the uplink on tcp again", func() bool { return a.uplink.Status().Transport == tunnel.TransportTCP })
	if st := a.uplink.Status(); st.TransportSwitches != 3 || !strings.Contains(st.SwitchReason, "no reply over udp") {
		t.Fatalf("blocked again: %+v", st)
	}
	echoLine(t, c, "the same flow over tcp again\n")
}

// TestTransportTCPOnly: transport "tcp" never uses UDP (the UDP address
// drops everything) and carries flows.
func TestTransportTCPOnly(t *testing.T) {
	relay, key, spec, mapping, public := streamRelay(t)
	gate := newUDPGate(t, relay.port)
	a := runAppliance(t, uplinkTOML(gate.port(), relay.relay.StreamAddr(), relay.key.Public(), key, "tcp", mapping), applAddrA)
	waitRegistered(t, a, spec)
	if st := a.uplink.Status(); st.Transport != tunnel.TransportTCP || st.TCPConnects != 1 {
		t.Fatalf("%+v", st)
	}
	c, err := net.Dial("tcp", public.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	payload := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB: many full frames
	go func() { c.Write(payload) }()
	got := make([]byte, len(payload))
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("1 MiB echo over tcp transport: %v", err)
	}
}

// TestTransportWrongRelayKey: an uplink pinned to another key is refused
// over TLS with an error naming relay_public_key, and never registers.
func TestTransportWrongRelayKey(t *testing.T) {
	relay, key, _, mapping, _ := streamRelay(t)
	gate := newUDPGate(t, relay.port)
	a := runAppliance(t, uplinkTOML(gate.port(), relay.relay.StreamAddr(), mustKey(t).Public(), key, "tcp", mapping), applAddrA)
	waitFor(t, 10*time.Second, "a refused tcp connect", func() bool { return a.uplink.Status().TCPConnectFailures > 0 })
	st := a.uplink.Status()
	if !strings.Contains(st.TransportError, "did not prove uplink.relay_public_key") || st.TCPConnects != 0 || st.State == tunnel.StateRegistered {
		t.Fatalf("%+v", st)
	}
	// The relay counts the refusal once the appliance hangs up.
	waitFor(t, 10*time.Second, "the relay's refusal", func() bool { return relay.relay.Status().TCPRefusals["handshake"] > 0 })
	if rs := relay.relay.Status(); rs.TCPStreams != 0 || rs.TCPAccepted != 0 {
		t.Fatalf("relay: %+v", rs)
	}
}

// TestTransportPeerRemovedOnReload: a peer removed from the relay's config
// loses its TCP transport connection with it, and cannot connect again.
func TestTransportPeerRemovedOnReload(t *testing.T) {
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	key := mustKey(t)
	cfg := onePeerRelayConfig(t, key, spec)
	cfg.Relay.TCPListen = "127.0.0.1:0"
	relay := startRelay(t, cfg, testLogger(t))
	gate := newUDPGate(t, relay.port)
	a := runAppliance(t, uplinkTOML(gate.port(), relay.relay.StreamAddr(), relay.key.Public(), key, "tcp",
		mappingTOML("echo", "tcp", port, echoService(t), "")), applAddrA)
	waitRegistered(t, a, spec)
	if n := relay.relay.Status().TCPStreams; n != 1 {
		t.Fatalf("tcp streams %d, want 1", n)
	}
	without := *cfg
	without.Peers = nil
	if err := relay.relay.Reload(&without); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the removed peer's stream closed", func() bool { return relay.relay.Status().TCPStreams == 0 })
	waitFor(t, 10*time.Second, "a refused reconnect", func() bool { return relay.relay.Status().TCPRefusals["handshake"] > 0 })
	// The relay counts the refusal when it drops the handshake; the appliance
	// learns of it only when its own TLS handshake fails after that.
	waitFor(t, 10*time.Second, "the appliance told why", func() bool {
		return strings.Contains(a.uplink.Status().TransportError, "relay_public_key")
	})
}

// relayWithoutTCP starts a one-peer relay without the TCP transport that
// holds spec (tcp/port), an open udpGate to its WireGuard port, and names a
// loopback TCP address where nothing listens, for the uplink's relay_tcp.
func relayWithoutTCP(t *testing.T) (relay *relaySide, key conf.Key, spec string, port uint16, gate *udpGate, closed net.Addr) {
	t.Helper()
	port = freePort(t, false)
	spec = fmt.Sprintf("tcp/%d", port)
	key = mustKey(t)
	relay = startRelay(t, onePeerRelayConfig(t, key, spec), testLogger(t))
	gate = newUDPGate(t, relay.port)
	gate.open.Store(true)
	closed = net.TCPAddrFromAddrPort(netip.AddrPortFrom(loopback4, freePort(t, false)))
	return relay, key, spec, port, gate, closed
}

// TestTransportAutoWithoutRelayTCP: an "auto" uplink whose relay offers no
// TCP transport loses nothing by trying it: after a UDP outage it finds TCP
// unreachable, keeps sending over UDP, and is back on UDP as soon as UDP
// answers (long before the next probe), with the flow intact.
func TestTransportAutoWithoutRelayTCP(t *testing.T) {
	relay, key, spec, port, gate, closed := relayWithoutTCP(t)
	a := runAppliance(t, uplinkTOML(gate.port(), closed, relay.key.Public(), key, "auto",
		mappingTOML("echo", "tcp", port, echoService(t), "")), applAddrA,
		tunnel.WithTransportLadder(time.Second, time.Hour, 50*time.Millisecond))
	waitRegistered(t, a, spec)
	c, err := net.Dial("tcp", netip.AddrPortFrom(loopback4, port).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoLine(t, c, "over udp\n")

	gate.open.Store(false)
	waitFor(t, 20*time.Second, "a tcp attempt", func() bool {
		st := a.uplink.Status()
		return st.Transport == tunnel.TransportTCP && st.TCPConnectFailures > 0
	})
	gate.open.Store(true)
	waitFor(t, 20*time.Second, "the uplink back on udp", func() bool { return a.uplink.Status().Transport == tunnel.TransportUDP })
	if st := a.uplink.Status(); st.TCPConnects != 0 || st.TransportSwitches != 2 {
		t.Fatalf("%+v", st)
	}
	echoLine(t, c, "still there\n")
}

// TestUplinkCountsPathLoss: an upload through the relay over a path that
// loses every 40th WireGuard data message from the relay arrives whole (the
// tunnel's TCP recovers), and the appliance's status counts the messages
// lost, as the gate dropped them; the relay's counts its own direction,
// which lost nothing.
func TestUplinkCountsPathLoss(t *testing.T) {
	const size = 4 << 20
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	key := mustKey(t)
	cfg := onePeerRelayConfig(t, key, spec)
	cfg.Relay.MaxMTU = testMTU // no path probe: internet-sized messages
	relay := startRelay(t, cfg, testLogger(t))
	gate := newUDPGate(t, relay.port)
	gate.open.Store(true)
	gate.dropDownEvery.Store(40)
	target := testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "%d\n", n)
	})
	// loss_fallback off: the uplink stays on UDP while the test counts.
	a := runAppliance(t, gatedApplianceTOML(gate, relay, key, "loss_fallback = \"off\"\n"+mappingTOML("up", "tcp", port, target.Port(), "")), applAddrA)
	waitRegistered(t, a, spec)

	c, err := net.Dial("tcp", netip.AddrPortFrom(loopback4, port).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(bytes.Repeat([]byte("u"), size)); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(c); string(got) != fmt.Sprintf("%d\n", size) {
		t.Fatalf("the target got %q bytes of %d: %v", got, size, err)
	}
	dropped := uint64(gate.droppedDown.Load())
	if dropped < 20 {
		t.Fatalf("the gate dropped %d messages of %d; the test needs a lossy path", dropped, gate.dataDown.Load())
	}
	// A loss shows once a later message arrives: the relay's keepalive
	// brings one after the upload's last.
	var st tunnel.UplinkStatus
	waitFor(t, 5*time.Second, "the uplink's loss estimate to reach the gate's drops", func() bool {
		st = a.uplink.Status()
		return st.DatagramsLost+1 >= dropped
	})
	t.Logf("uplink: %d messages in, %d lost; the gate dropped %d of %d", st.DatagramsIn, st.DatagramsLost, dropped, gate.dataDown.Load())
	if st.DatagramsLost > dropped || st.DatagramsIn < size/testMTU {
		t.Fatalf("uplink: %d messages in, %d lost; the gate dropped %d", st.DatagramsIn, st.DatagramsLost, dropped)
	}
	if rs := relay.relay.Status(); rs.DatagramsIn == 0 || rs.DatagramsLost != 0 {
		t.Fatalf("relay: %d messages in, %d lost over a path that lost none its way", rs.DatagramsIn, rs.DatagramsLost)
	}
}

// echoPump writes a stream of 64 KiB chunks through an echoing connection
// and checks every byte that comes back, on one reader for the connection's
// life, so one flow can be followed across transport switches.
type echoPump struct {
	t     *testing.T
	c     net.Conn
	chunk []byte
	sent  int64
	got   atomic.Int64
	errc  chan error
}

func newEchoPump(t *testing.T, c net.Conn) *echoPump {
	p := &echoPump{t: t, c: c, chunk: bytes.Repeat([]byte("0123456789abcdef"), 4096), errc: make(chan error, 1)}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	go func() {
		buf := make([]byte, len(p.chunk))
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				p.errc <- err
				return
			}
			if !bytes.Equal(buf, p.chunk) {
				p.errc <- fmt.Errorf("echo differs after %d bytes", p.got.Load())
				return
			}
			p.got.Add(int64(len(buf)))
		}
	}()
	return p
}

// until writes until stop returns true (within 20 s), then waits for the
// echo of everything written.
func (p *echoPump) until(stop func() bool) {
	p.t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !stop(); {
		if time.Now().After(deadline) {
			p.t.Fatalf("condition not met after 20 s (%d bytes echoed)", p.got.Load())
		}
		if _, err := p.c.Write(p.chunk); err != nil {
			p.t.Fatalf("write after %d bytes: %v", p.sent, err)
		}
		p.sent += int64(len(p.chunk))
	}
	for p.got.Load() < p.sent {
		select {
		case err := <-p.errc:
			p.t.Fatalf("echo: %v after %d of %d bytes", err, p.got.Load(), p.sent)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestTransportLossFallback: over a path that loses every 50th WireGuard
// data message from the relay, an "auto" uplink moves to TCP (the reason
// says how much was lost), comes back to UDP when its hold ends, and moves
// again, while one echoed flow crosses intact; with loss_fallback "off" it
// stays on UDP over the same path.
func TestTransportLossFallback(t *testing.T) {
	for _, tt := range []struct {
		name, setting string
		moves         bool
	}{
		// 1 %: 500 messages a window (at the default 0.002 %, 250 000).
		{"1%", `loss_fallback = "1%"` + "\n", true},
		{"off", `loss_fallback = "off"` + "\n", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			relay, key, spec, mapping, public := streamRelay(t)
			gate := newUDPGate(t, relay.port)
			gate.open.Store(true)
			gate.dropDownEvery.Store(50)
			// max_mtu = mtu: internet-sized messages, no path probe.
			toml := uplinkTOML(gate.port(), relay.relay.StreamAddr(), relay.key.Public(), key, "auto",
				fmt.Sprintf("max_mtu = %d\n", testMTU)+tt.setting+mapping)
			a := runAppliance(t, toml, applAddrA, tunnel.WithTransportLadder(time.Minute, 200*time.Millisecond, 50*time.Millisecond),
				tunnel.WithLossFallback(5*time.Second, 500, 1500*time.Millisecond))
			waitRegistered(t, a, spec)
			c, err := net.Dial("tcp", public.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			echo := newEchoPump(t, c)

			if !tt.moves {
				echo.until(func() bool { return gate.droppedDown.Load() >= 100 })
				if st := a.uplink.Status(); st.Transport != tunnel.TransportUDP || st.TransportSwitches != 0 || st.DatagramsLost < 90 {
					t.Fatalf("loss_fallback off: transport %s after %d switches (%s), %d lost", st.Transport, st.TransportSwitches, st.SwitchReason, st.DatagramsLost)
				}
				return
			}
			echo.until(func() bool { return a.uplink.Status().Transport == tunnel.TransportTCP })
			if logs := a.logs.FilterMessage("uplink transport switched").All(); len(logs) < 1 ||
				!strings.HasSuffix(logs[0].ContextMap()["reason"].(string), " over udp") || !strings.Contains(logs[0].ContextMap()["reason"].(string), " % of the ") {
				t.Fatalf("switch logs after loss: %v", logs)
			}
			if st := a.uplink.Status(); st.Transport == tunnel.TransportTCP && !st.TCPForLoss {
				t.Fatalf("on tcp for loss, tcp_for_loss unset: %+v", st)
			}
			// The hold ends, a probe finds UDP answering, and the loss
			// moves the uplink again.
			echo.until(func() bool { return a.uplink.Status().TransportSwitches >= 3 })
			if logs := a.logs.FilterMessage("uplink transport switched").All(); len(logs) < 3 ||
				logs[1].ContextMap()["reason"] != "the relay answered over udp" ||
				!strings.Contains(logs[2].ContextMap()["reason"].(string), " % of the ") {
				t.Fatalf("switch logs: %v", logs)
			}
		})
	}
}

// TestTransportLossFallbackWithoutRelayTCP: when the relay offers no TCP, a
// loss switch finds no stream, the uplink's sends stay on UDP, the relay's
// answer there brings it back, and loss does not move it again for the hold.
func TestTransportLossFallbackWithoutRelayTCP(t *testing.T) {
	relay, key, spec, port, gate, closed := relayWithoutTCP(t)
	gate.dropDownEvery.Store(50)
	toml := uplinkTOML(gate.port(), closed, relay.key.Public(), key, "auto",
		fmt.Sprintf("max_mtu = %d\nloss_fallback = \"1%%\"\n", testMTU)+mappingTOML("echo", "tcp", port, echoService(t), ""))
	a := runAppliance(t, toml, applAddrA, tunnel.WithTransportLadder(time.Minute, 200*time.Millisecond, 50*time.Millisecond),
		tunnel.WithLossFallback(2*time.Second, 500, time.Minute))
	waitRegistered(t, a, spec)
	c, err := net.Dial("tcp", netip.AddrPortFrom(loopback4, port).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo := newEchoPump(t, c)
	echo.until(func() bool { return a.uplink.Status().TransportSwitches >= 2 })
	st := a.uplink.Status()
	if st.Transport != tunnel.TransportUDP || st.SwitchReason != "the relay answered over udp" || st.TCPConnectFailures == 0 {
		t.Fatalf("after a loss switch without relay tcp: transport %s, reason %q, %d connect failures", st.Transport, st.SwitchReason, st.TCPConnectFailures)
	}
	// Several more lossy windows: the uplink stays on UDP.
	lost := st.DatagramsLost
	echo.until(func() bool { return a.uplink.Status().DatagramsLost >= lost+60 })
	if st := a.uplink.Status(); st.TransportSwitches != 2 {
		t.Fatalf("loss moved the uplink again during the hold: %d switches, last %q", st.TransportSwitches, st.SwitchReason)
	}
}

// TestTransportLossFallbackOnTheWayOut: a path that loses every 50th data
// message from the appliance, which the appliance cannot see lost, moves an
// "auto" uplink to TCP by its tunnel stack's TCP resends.
func TestTransportLossFallbackOnTheWayOut(t *testing.T) {
	relay, key, spec, mapping, public := streamRelay(t)
	gate := newUDPGate(t, relay.port)
	gate.open.Store(true)
	gate.dropUpEvery.Store(50)
	toml := uplinkTOML(gate.port(), relay.relay.StreamAddr(), relay.key.Public(), key, "auto",
		fmt.Sprintf("max_mtu = %d\nloss_fallback = \"1%%\"\n", testMTU)+mapping)
	a := runAppliance(t, toml, applAddrA, tunnel.WithTransportLadder(time.Minute, 200*time.Millisecond, 50*time.Millisecond),
		tunnel.WithLossFallback(5*time.Second, 500, time.Minute))
	waitRegistered(t, a, spec)
	c, err := net.Dial("tcp", public.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	newEchoPump(t, c).until(func() bool { return a.uplink.Status().Transport == tunnel.TransportTCP })
	// The reason names the way out. (The way in may count a few lost
	// around the switch: the relay's stream queue drops past 256 packets.)
	if st := a.uplink.Status(); !strings.Contains(st.SwitchReason, "resent by TCP over udp") {
		t.Fatalf("switched for %q with %d of the relay's messages lost (the gate dropped %d of the appliance's)",
			st.SwitchReason, st.DatagramsLost, gate.droppedUp.Load())
	}
}

// TestTransportCongestion: each end asks the kernel for its tcp_congestion
// on the TCP transport's connection and reports what the connection runs;
// "system" keeps the kernel's default, and a name the kernel lacks leaves
// the default too, logged once with what to do, while flows still cross.
func TestTransportCongestion(t *testing.T) {
	def := socketRuns(t, "")
	want := "reno" // built into every kernel and always allowed
	if def == want {
		want = "cubic"
	}
	// What a socket that asked for want reports: want itself, except where
	// the platform reads the name short (socketRuns), and then natbox logs
	// the difference as a refusal.
	asked, askedRefusals := socketRuns(t, want), 0
	if asked != want {
		askedRefusals = 1
	}
	cases := []struct {
		name, relayCC, uplinkCC string
		relayRuns, uplinkRuns   string
		refusalLogs             int
	}{
		{"asked", want, want, asked, asked, askedRefusals},
		{"system and refused", conf.TCPCongestionSystem, "no_such_cc", def, def, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			port := freePort(t, false)
			spec := fmt.Sprintf("tcp/%d", port)
			key := mustKey(t)
			cfg := onePeerRelayConfig(t, key, spec)
			cfg.Relay.TCPListen = "127.0.0.1:0"
			cfg.Relay.TCPCongestion = tc.relayCC
			relay := startRelay(t, cfg, testLogger(t))
			gate := newUDPGate(t, relay.port)
			a := runAppliance(t, uplinkTOML(gate.port(), relay.relay.StreamAddr(), relay.key.Public(), key, "tcp",
				fmt.Sprintf("tcp_congestion = %q\n", tc.uplinkCC)+mappingTOML("echo", "tcp", port, echoService(t), "")), applAddrA)
			waitRegistered(t, a, spec)
			c, err := net.Dial("tcp", netip.AddrPortFrom(loopback4, port).String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			echoLine(t, c, "over tcp\n")
			if got := a.uplink.Status().TCPCongestion; got != tc.uplinkRuns {
				t.Errorf("uplink's connection runs %q, want %q", got, tc.uplinkRuns)
			}
			if got := relay.relay.Status().TCPCongestion; got != tc.relayRuns {
				t.Errorf("relay's connection runs %q, want %q", got, tc.relayRuns)
			}
			if n := a.logs.FilterMessage("relay tcp transport: the kernel runs another congestion control than uplink.tcp_congestion").Len(); n != tc.refusalLogs {
				t.Errorf("%d refusal logs, want %d", n, tc.refusalLogs)
			}
		})
	}
}
