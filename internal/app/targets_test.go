package app_test

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"testing"

	"github.com/natbox/natbox/internal/testutil"
)

// Targets: real servers on 127.0.0.1, the only host addresses tests touch.

// serveTCP serves each connection with fn on 127.0.0.1 until the test ends.
func serveTCP(t testing.TB, fn func(c *net.TCPConn)) netip.AddrPort {
	t.Helper()
	return testutil.ServeTCP(t, "127.0.0.1:0", fn)
}

// echo copies everything back, then half-closes.
var echo = testutil.Echo

// serveUDP answers each datagram on 127.0.0.1 with reply(from, payload),
// when reply returns non-nil.
func serveUDP(t testing.TB, reply func(from netip.AddrPort, payload []byte) []byte) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("listen udp: %v", err)
	}
	return serveUDPConn(t, pc, reply)
}

func serveUDPConn(t testing.TB, pc *net.UDPConn, reply func(from netip.AddrPort, payload []byte) []byte) netip.AddrPort {
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			if out := reply(from, buf[:n]); out != nil {
				pc.WriteToUDPAddrPort(out, from)
			}
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// udpEcho replies with the payload itself.
func udpEcho(_ netip.AddrPort, p []byte) []byte { return append([]byte(nil), p...) }

// consecutivePorts finds n consecutive free ports on 127.0.0.1 and returns
// them bound: TCP listeners (udp false) or UDP sockets (udp true).
func consecutivePorts(t testing.TB, n int, udp bool) []io.Closer {
	t.Helper()
	// Below the ephemeral range (testutil.FreePort): above it, the port
	// after an ephemeral bind is often an outgoing connection's on a busy host.
	for attempt := 0; attempt < 100; attempt++ {
		base := testutil.FreePort(t, false)
		first, err := bindPort(base, udp)
		if err != nil {
			continue
		}
		all := []io.Closer{first}
		for i := 1; i < n; i++ {
			c, err := bindPort(base+uint16(i), udp)
			if err != nil {
				break
			}
			all = append(all, c)
		}
		if len(all) == n {
			return all
		}
		for _, c := range all {
			c.Close()
		}
	}
	t.Fatalf("no %d consecutive free ports on 127.0.0.1", n)
	return nil
}

func bindPort(port uint16, udp bool) (io.Closer, error) {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port)))
	if udp {
		return net.ListenPacket("udp4", addr)
	}
	return net.Listen("tcp4", addr)
}

func localPort(c io.Closer) uint16 {
	switch c := c.(type) {
	case net.Listener:
		return c.Addr().(*net.TCPAddr).AddrPort().Port()
	case net.PacketConn:
		return c.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	}
	panic("not a socket")
}

// closedPort returns a 127.0.0.1 TCP port nothing listens on (it was just
// released).
func closedPort(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return a
}
