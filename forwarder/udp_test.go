package forwarder

import (
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/natbox/natbox/conf"
)

// udpEcho answers each datagram with "<port>|<source seen>|<payload>" and
// returns its port.
func udpEcho(t testing.TB) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	serveUDPEcho(t, c)
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

func serveUDPEcho(t testing.TB, c *net.UDPConn) {
	var wg sync.WaitGroup
	t.Cleanup(func() { c.Close(); wg.Wait() })
	port := itoa(uint16(c.LocalAddr().(*net.UDPAddr).Port))
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 65535)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort([]byte(port+"|"+from.String()+"|"+string(buf[:n])), from)
		}
	}()
}

// udpEchoPair opens echoes on two consecutive ports and returns the first.
func udpEchoPair(t testing.TB) uint16 {
	t.Helper()
	for range 50 {
		a, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		p := a.LocalAddr().(*net.UDPAddr).Port
		b, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p + 1})
		if err != nil {
			a.Close()
			continue
		}
		serveUDPEcho(t, a)
		serveUDPEcho(t, b)
		return uint16(p)
	}
	t.Fatal("no two consecutive free UDP ports")
	return 0
}

func TestUDPSession(t *testing.T) {
	t.Parallel()
	port := udpEchoPair(t)
	e := newEngine(t, config(mapping("game", conf.UDP, "5000-5001", "127.0.0.1:"+itoa(port))), Options{})
	tun := newIngress(conf.IngressTUN)
	client := netip.MustParseAddrPort("203.0.113.7:4444")

	e.HandleUDP(tun, client, netip.MustParseAddrPort("198.51.100.1:5000"), []byte("one"))
	r := tun.next(t)
	if r.src != netip.MustParseAddrPort("198.51.100.1:5000") || r.dst != client {
		t.Fatalf("reply %v -> %v, want from the public addr:port to the client", r.src, r.dst)
	}
	parts := strings.SplitN(r.payload, "|", 3)
	if parts[0] != itoa(port) || parts[2] != "one" {
		t.Fatalf("reply payload %q", r.payload)
	}
	firstSource := parts[1]

	// Endpoint-independent: another public address and the other port of
	// the range reuse the session (same source port toward the target), and
	// replies come from what the client used.
	e.HandleUDP(tun, client, netip.MustParseAddrPort("198.51.100.2:5001"), []byte("two"))
	r = tun.next(t)
	if r.src != netip.MustParseAddrPort("198.51.100.2:5001") {
		t.Fatalf("reply source %v, want 198.51.100.2:5001", r.src)
	}
	parts = strings.SplitN(r.payload, "|", 3)
	if parts[0] != itoa(port+1) || parts[1] != firstSource || parts[2] != "two" {
		t.Fatalf("reply payload %q, want port %d and source %s", r.payload, port+1, firstSource)
	}
	if n := len(e.Sessions()); n != 1 {
		t.Fatalf("%d sessions, want 1", n)
	}
	// Another client gets its own session.
	e.HandleUDP(tun, netip.MustParseAddrPort("203.0.113.8:4444"), netip.MustParseAddrPort("198.51.100.1:5000"), []byte("three"))
	if r := tun.next(t); r.dst != netip.MustParseAddrPort("203.0.113.8:4444") {
		t.Fatalf("reply to %v", r.dst)
	}
	ms := mappingStatus(t, e, "game")
	if ms.SessionsOpened != 2 || ms.BytesIn != 11 || ms.Hits != 2 {
		t.Fatalf("status %+v", ms)
	}
}
