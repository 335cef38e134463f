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

// TestBadChecksumSYNNeverHandled: gVisor trusts TCP checksums here (the link
// advertises RX checksum offload and the NIC marks every packet validated),
// so a SYN with a wrong checksum must be dropped before it can start a dial,
// however it is carried.
func TestBadChecksumSYNNeverHandled(t *testing.T) {
	handled := make(chan netip.AddrPort, 16)
	s, peer := rawPeer(t, funcHandler{tcp: func(r *TCPRequest) {
		handled <- r.Src
		r.Reject()
	}})
	dst4, dst6 := netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("[2001:db8:1::2]:80")
	src := func(i int) netip.AddrPort { return netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), 1000) }
	src6 := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i)}), 1000)
	}
	bad := map[string][][]byte{
		"ipv4":              {corruptTCP(rawTCP4(src(1), dst4, 1, 0, header.TCPFlagSyn))},
		"ipv4 with options": {withIPv4Options(corruptTCP(rawTCP4(src(2), dst4, 1, 0, header.TCPFlagSyn)))},
		"ipv4 fragments":    ipv4Fragments(corruptTCP(rawTCP4(src(3), dst4, 1, 0, header.TCPFlagSyn)), 77),
		"ipv6":              {corruptTCP(rawTCP6(src6(4), dst6, 1, 0, header.TCPFlagSyn))},
		"ipv6 dest options": {withIPv6DestOpts(corruptTCP(rawTCP6(src6(5), dst6, 1, 0, header.TCPFlagSyn)))},
	}
	for name, pkts := range bad {
		if _, err := peer.Write(pkts, 0); err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
	}
	// The same SYNs, intact, each reach the handler; sent after the bad
	// ones, they prove those were processed (and dropped) first.
	for name, p := range map[string][][]byte{
		"ipv4":              {rawTCP4(src(11), dst4, 1, 0, header.TCPFlagSyn)},
		"ipv4 with options": {withIPv4Options(rawTCP4(src(12), dst4, 1, 0, header.TCPFlagSyn))},
		"ipv4 fragments":    ipv4Fragments(rawTCP4(src(13), dst4, 1, 0, header.TCPFlagSyn), 78),
		"ipv6":              {rawTCP6(src6(14), dst6, 1, 0, header.TCPFlagSyn)},
		"ipv6 dest options": {withIPv6DestOpts(rawTCP6(src6(15), dst6, 1, 0, header.TCPFlagSyn))},
	} {
		if _, err := peer.Write(p, 0); err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
	}
	want := map[netip.AddrPort]bool{src(11): true, src(12): true, src(13): true, src6(14): true, src6(15): true}
	for len(want) > 0 {
		select {
		case a := <-handled:
			if !want[a] {
				t.Fatalf("HandleTCP for %s: a SYN with a bad checksum got through", a)
			}
			delete(want, a)
		case <-time.After(10 * time.Second):
			t.Fatalf("intact SYNs from %v never reached the handler", want)
		}
	}
	st := s.Stats()
	if st.Invalid.TCPChecksum != uint64(len(bad)) {
		t.Fatalf("Invalid.TCPChecksum = %d, want %d", st.Invalid.TCPChecksum, len(bad))
	}
	if st.IPFragmentsIn != 4 {
		t.Fatalf("IPFragmentsIn = %d, want 4", st.IPFragmentsIn)
	}
}
