package app_test

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/app"
)

func TestUDPRequestReply(t *testing.T) {
	t.Parallel()
	target := serveUDP(t, func(_ netip.AddrPort, p []byte) []byte { return append([]byte("re:"), p...) })
	h := newHarness(t, spec{Mappings: mapping("dns", "udp", "5300", target.String())}, app.Options{})

	// Every size up to what the link carries: natbox never fragments.
	maxPayload := linkMTU - 20 - 8 - len("re:")
	from := ap(client4, 40000)
	for _, size := range []int{0, 1, 512, maxPayload} {
		payload := bytes.Repeat([]byte{byte(size)}, size)
		h.sendUDP(from, ap(public4, 5300), payload)
		d := h.mustRecvUDP(from)
		if want := append([]byte("re:"), payload...); !bytes.Equal(d.payload, want) {
			t.Fatalf("size %d: reply %d bytes %q..., want %d bytes", size, len(d.payload), d.payload[:min(len(d.payload), 8)], len(want))
		}
		if d.src != ap(public4, 5300) {
			t.Fatalf("size %d: reply from %s, want the public address the client sent to, %s", size, d.src, ap(public4, 5300))
		}
	}

	// The mapping listens on every address of the ingress: a reply comes
	// from whichever public address the client used.
	other := netip.MustParseAddr("198.51.100.2")
	from2 := ap(client4, 40001)
	h.sendUDP(from2, ap(other, 5300), []byte("ping"))
	if d := h.mustRecvUDP(from2); d.src != ap(other, 5300) || string(d.payload) != "re:ping" {
		t.Fatalf("reply %q from %s, want %q from %s", d.payload, d.src, "re:ping", ap(other, 5300))
	}
	if n := h.inbox.dropped.Load(); n != 0 {
		t.Fatalf("client inbox dropped %d datagrams", n)
	}
}

func TestUDPEndpointIndependentMapping(t *testing.T) {
	t.Parallel()
	socks := consecutivePorts(t, 2, true)
	base := localPort(socks[0])
	// Each target reports its own port and the source natbox used toward it.
	for _, s := range socks {
		pc := s.(*net.UDPConn)
		port := localPort(s)
		serveUDPConn(t, pc, func(from netip.AddrPort, _ []byte) []byte {
			return []byte(fmt.Sprintf("%d %s", port, from))
		})
	}
	h := newHarness(t, spec{Mappings: mapping("game", "udp", "10100-10101", "127.0.0.1:"+strconv.Itoa(int(base)))}, app.Options{})

	from := ap(client4, 41000)
	var natSources []string
	for i, listen := range []uint16{10100, 10101} {
		h.sendUDP(from, ap(public4, listen), []byte("hi"))
		d := h.mustRecvUDP(from)
		var port int
		var natSrc string
		if _, err := fmt.Sscanf(string(d.payload), "%d %s", &port, &natSrc); err != nil {
			t.Fatalf("reply %q: %v", d.payload, err)
		}
		if port != int(base)+i {
			t.Fatalf("public port %d reached target port %d, want %d", listen, port, int(base)+i)
		}
		if d.src != ap(public4, listen) {
			t.Fatalf("reply from %s, want %s", d.src, ap(public4, listen))
		}
		natSources = append(natSources, natSrc)
	}
	if natSources[0] != natSources[1] {
		t.Fatalf("natbox reached the two targets from %v: want one socket for one client (endpoint-independent)", natSources)
	}
	if ss := h.sessionsOf("game"); len(ss) != 1 || ss[0].Client != from {
		t.Fatalf("sessions = %+v, want one, for %s", ss, from)
	}
	if m := h.mappingStatus("game"); m.SessionsOpened != 1 {
		t.Fatalf("sessions opened = %d, want 1", m.SessionsOpened)
	}
}

func TestUDPIdleExpiry(t *testing.T) {
	t.Parallel()
	target := serveUDP(t, udpEcho)
	h := newHarness(t, spec{Mappings: mapping("short", "udp", "5301", target.String(), `idle_timeout = "1s"`)}, app.Options{})
	from := ap(client4, 42000)

	h.sendUDP(from, ap(public4, 5301), []byte("one"))
	h.mustRecvUDP(from)
	opened := time.Now()
	if n := len(h.sessionsOf("short")); n != 1 {
		t.Fatalf("%d sessions after the first exchange, want 1", n)
	}
	waitFor(t, 5*time.Second, "the idle session to expire", func() bool { return len(h.sessionsOf("short")) == 0 })
	if el := time.Since(opened); el < 900*time.Millisecond {
		t.Fatalf("session expired after %v, before its 1s idle timeout", el)
	}
	if m := h.mappingStatus("short"); m.UDPExpired != 1 || m.SessionsActive != 0 {
		t.Fatalf("expired %d, active %d; want 1 and 0", m.UDPExpired, m.SessionsActive)
	}
	// The same client comes back: a new session, working.
	h.sendUDP(from, ap(public4, 5301), []byte("two"))
	if d := h.mustRecvUDP(from); string(d.payload) != "two" {
		t.Fatalf("reply after expiry %q, want two", d.payload)
	}
	if m := h.mappingStatus("short"); m.SessionsOpened != 2 {
		t.Fatalf("sessions opened = %d, want 2", m.SessionsOpened)
	}
}

func TestUDPDeniedSourceIsDropped(t *testing.T) {
	t.Parallel()
	var seen atomic.Int64
	target := serveUDP(t, func(_ netip.AddrPort, p []byte) []byte { seen.Add(1); return udpEcho(netip.AddrPort{}, p) })
	h := newHarness(t, spec{Mappings: mapping("dns", "udp", "5302", target.String(), `deny = ["203.0.113.66/32"]`)}, app.Options{})
	denied := ap(netip.MustParseAddr("203.0.113.66"), 42100)
	h.sendUDP(denied, ap(public4, 5302), []byte("let me in"))
	waitFor(t, 5*time.Second, "the refusal to count", func() bool { return h.mappingStatus("dns").Refusals["denied"] == 1 })
	// An allowed client's exchange after it proves the path works, and
	// that the denied datagram never reached the target.
	allowed := ap(client4, 42101)
	h.sendUDP(allowed, ap(public4, 5302), []byte("hello"))
	if d := h.mustRecvUDP(allowed); string(d.payload) != "hello" {
		t.Fatalf("reply %q", d.payload)
	}
	if n := seen.Load(); n != 1 {
		t.Fatalf("target saw %d datagrams, want only the allowed one", n)
	}
	if d, err := h.recvUDP(denied, 50*time.Millisecond); err == nil {
		t.Fatalf("denied client got %q", d.payload)
	}
	if ss := h.sessionsOf("dns"); len(ss) != 1 || ss[0].Client != allowed {
		t.Fatalf("sessions = %+v, want only %s's", ss, allowed)
	}
}
