package netstack

import (
	"bytes"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// rawPeer runs a Stack on one end of a Pipe and lets the test write raw
// packets into it; whatever the stack sends is read and discarded.
func rawPeer(t *testing.T, h Handler) (*Stack, tun.Device) {
	t.Helper()
	return rawPeerConfig(t, Config{}, h)
}

// rawPeerConfig is rawPeer with a Config (its Addresses are set here).
func rawPeerConfig(t *testing.T, cfg Config, h Handler) (*Stack, tun.Device) {
	t.Helper()
	a, b := Pipe(1500)
	cfg.Addresses = []netip.Prefix{serverPrefix4}
	s, err := New(a, cfg, h, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("new stack: %v", err)
	}
	runStack(t, s)
	done := make(chan struct{})
	go func() {
		defer close(done)
		bufs, sizes := [][]byte{make([]byte, 1600)}, []int{0}
		for {
			if _, err := b.Read(bufs, sizes, 0); err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		s.Close()
		<-done
	})
	return s, b
}

func TestAbandonedOnClientRST(t *testing.T) {
	got := make(chan string, 1)
	s, peer := rawPeer(t, funcHandler{tcp: func(r *TCPRequest) {
		select {
		case <-r.Abandoned():
			got <- "abandoned"
		case <-time.After(10 * time.Second):
			got <- "timeout"
		}
		r.Reject()
	}})
	client, server := netip.MustParseAddrPort("192.0.2.1:1234"), netip.MustParseAddrPort("10.0.0.2:80")
	if _, err := peer.Write([][]byte{rawTCP4(client, server, 1000, 0, header.TCPFlagSyn)}, 0); err != nil {
		t.Fatalf("write syn: %v", err)
	}
	// Wait until the request is pending, then give up.
	deadline := time.Now().Add(10 * time.Second)
	for s.pending.n.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if _, err := peer.Write([][]byte{rawTCP4(client, server, 1001, 0, header.TCPFlagRst)}, 0); err != nil {
		t.Fatalf("write rst: %v", err)
	}
	if r := <-got; r != "abandoned" {
		t.Fatalf("handler saw %s, want abandoned", r)
	}
	if st := s.Stats(); st.TCPAbandoned != 1 {
		t.Fatalf("TCPAbandoned = %d, want 1", st.TCPAbandoned)
	}
}

func TestMalformedInput(t *testing.T) {
	udp := make(chan []byte, 1)
	s, peer := rawPeer(t, funcHandler{udp: func(src, dst netip.AddrPort, p []byte) { udp <- bytes.Clone(p) }})
	src, dst := netip.MustParseAddrPort("192.0.2.1:1000"), netip.MustParseAddrPort("10.0.0.2:53")
	good := rawUDP(src, dst, []byte("valid"))
	badSum := rawUDP(src, dst, []byte("corrupt"))
	badSum[len(badSum)-1] ^= 0xff
	badIP := bytes.Clone(good)
	badIP[8]-- // TTL changed without fixing the header checksum
	longUDP := bytes.Clone(good)
	longUDP[25] = 200 // UDP length beyond the packet
	junk := [][]byte{
		{},
		{0x45},
		{0x60, 0, 0},
		{0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20},
		good[:10],
		good[:len(good)-3], // total length beyond the packet
		badSum,
		badIP,
		longUDP,
		rawTCP4(src, dst, 1, 0, header.TCPFlagSyn)[:30], // truncated TCP
		bytes.Repeat([]byte{0x45}, 60),
		bytes.Repeat([]byte{0x6f}, 60),
	}
	if _, err := peer.Write(junk, 0); err != nil {
		t.Fatalf("write junk: %v", err)
	}
	if _, err := peer.Write([][]byte{good}, 0); err != nil {
		t.Fatalf("write good: %v", err)
	}
	select {
	case p := <-udp:
		if string(p) != "valid" {
			t.Fatalf("HandleUDP got %q; a malformed datagram got through", p)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the valid datagram after the junk never arrived")
	}
	st := s.Stats()
	if st.Invalid.UDPChecksum != 1 || st.Invalid.IPChecksum == 0 || st.Invalid.IPHeader == 0 || st.Invalid.UDPHeader != 1 {
		t.Fatalf("invalid counters %+v", st.Invalid)
	}
}
