package netstack

import (
	"io"
	"net"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// TestDialReusesSourcePortTowardAnotherPort: the relay dials with a
// client's own address and port, and one client may use the same source
// port toward two public ports at once or one after the other (the kernel
// keeps only 4-tuples unique). A flow on the local address and port toward
// another port, live or in TIME_WAIT after we closed first, must not make
// the dial's bind fail (the relay bench's crr resets: client ports that an
// earlier test's flows had used were refused as dial_failed); the same
// 4-tuple while live still must.
func TestDialReusesSourcePortTowardAnotherPort(t *testing.T) {
	client, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c) // echo; the dialer closes first
	}})
	src := netip.AddrPortFrom(clientPrefix4.Addr(), 40000)
	port := func(p uint16) netip.AddrPort { return netip.AddrPortFrom(serverPrefix4.Addr(), p) }
	dial := func(dst netip.AddrPort) (net.Conn, error) { return client.DialTCP(testContext(t), src, dst) }

	first, err := dial(port(80))
	if err != nil {
		t.Fatal(err)
	}
	live, err := dial(port(81))
	if err != nil {
		t.Fatalf("dial from a port live toward another port: %v", err)
	}
	defer live.Close()
	if _, err := dial(port(80)); err == nil {
		t.Fatal("a second dial on a live 4-tuple succeeded")
	}
	for _, c := range []net.Conn{first, live} {
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatalf("echo on %v: %v", c.RemoteAddr(), err)
		}
	}
	first.Close()
	waitUntil(t, "the first flow in TIME_WAIT", func() bool { return inTimeWait(client, src, port(80)) })
	third, err := dial(port(82))
	if err != nil {
		t.Fatalf("dial from a port in TIME_WAIT toward another port: %v", err)
	}
	third.Close()
}

// inTimeWait reports whether s has a TIME_WAIT endpoint for local -> remote.
func inTimeWait(s *Stack, local, remote netip.AddrPort) bool {
	te := s.stack.FindTransportEndpoint(header.IPv4ProtocolNumber, tcp.ProtocolNumber, stack.TransportEndpointID{
		LocalPort: local.Port(), LocalAddress: tcpipAddr(local.Addr()), RemotePort: remote.Port(), RemoteAddress: tcpipAddr(remote.Addr()),
	}, nicID)
	ep, ok := te.(*tcp.Endpoint)
	return ok && tcp.EndpointState(ep.State()) == tcp.StateTimeWait
}
