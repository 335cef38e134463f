package netstack

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/testutil"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// countingTarget is a loopback target that reports each connection it
// accepted and, once the other side closed it, that it was closed.
type countingTarget struct {
	addr             string
	accepted, closed chan struct{}
}

func newCountingTarget(t *testing.T, n int) *countingTarget {
	ct := &countingTarget{accepted: make(chan struct{}, n), closed: make(chan struct{}, n)}
	ct.addr = testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) {
		ct.accepted <- struct{}{}
		c.Read(make([]byte, 1)) // returns at EOF: the handler closed its leg
		ct.closed <- struct{}{}
	}).String()
	return ct
}

// dialFirst is a handler that dials target, then accepts, and on a failed
// Accept closes the target connection at once and reports the error.
func dialFirst(target string, acceptErr chan<- error) func(r *TCPRequest) {
	return func(r *TCPRequest) {
		up, err := net.Dial("tcp", target)
		if err != nil {
			r.Reject()
			return
		}
		defer up.Close()
		c, err := r.Accept()
		if acceptErr != nil {
			acceptErr <- err
		}
		if err != nil {
			return
		}
		splice(c, up)
	}
}

// TestHandshakeTimeoutReleasesTarget: a SYN whose client never answers the
// SYN-ACK must not hold the target connection the handler dialed first for
// gVisor's two minutes of SYN-ACK retransmits.
func TestHandshakeTimeoutReleasesTarget(t *testing.T) {
	const timeout = 300 * time.Millisecond
	for _, tc := range []struct{ src, dst string }{
		{"192.0.2.1:1234", "10.0.0.2:80"},
		{"[2001:db8::1]:1234", "[2001:db8:1::2]:80"},
	} {
		t.Run(tc.src, func(t *testing.T) {
			target := newCountingTarget(t, 1)
			acceptErr := make(chan error, 1)
			s, peer := rawPeerConfig(t, Config{TCP: TCPConfig{HandshakeTimeout: timeout}},
				funcHandler{tcp: dialFirst(target.addr, acceptErr)})
			src, dst := netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst)
			start := time.Now()
			if _, err := peer.Write([][]byte{rawTCP(src, dst, 1000, 0, header.TCPFlagSyn)}, 0); err != nil {
				t.Fatalf("write syn: %v", err)
			}
			select {
			case <-target.accepted:
			case <-time.After(10 * time.Second):
				t.Fatal("the handler never dialed the target")
			}
			select {
			case <-target.closed:
			case <-time.After(timeout + 5*time.Second):
				t.Fatalf("target connection still open %v after the SYN (handshake timeout %v)", time.Since(start), timeout)
			}
			if el := time.Since(start); el < timeout {
				t.Fatalf("target closed after %v, before the handshake timeout %v", el, timeout)
			}
			if err := <-acceptErr; !errors.Is(err, ErrHandshakeTimeout) {
				t.Fatalf("Accept error = %v, want ErrHandshakeTimeout", err)
			}
			waitUntil(t, "no pending handshake", func() bool { return s.Stats().TCPHandshakesPending == 0 })
			if st := s.Stats(); st.TCPHandshakeTimeouts != 1 {
				t.Fatalf("TCPHandshakeTimeouts = %d, want 1", st.TCPHandshakeTimeouts)
			}
		})
	}
}

// waitUntil polls cond until it holds or 10 s pass.
func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
