package rawsock_test

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"golang.org/x/net/ipv6"

	"github.com/natbox/natbox/internal/rawsock"
)

func udpSocket(t *testing.T, network, addr string) (*net.UDPConn, *rawsock.Batch) {
	t.Helper()
	c, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Skipf("%s on %s: %v", network, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	rc, err := c.(*net.UDPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.UDPConn), rawsock.NewBatch(rc, network == "udp6")
}

// A batch goes out in one Send and comes back in one Recv: the payloads,
// their lengths and the sender's address, for both families.
func TestBatchSendsAndReceives(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		t.Run(tc.network, func(t *testing.T) {
			a, sendA := udpSocket(t, tc.network, tc.addr)
			b, recvB := udpSocket(t, tc.network, tc.addr)
			to := b.LocalAddr().(*net.UDPAddr)
			out := make([]ipv6.Message, 3)
			for i := range out {
				// two buffers in one message: one datagram, gathered
				out[i] = ipv6.Message{Buffers: [][]byte{[]byte(fmt.Sprintf("datagram %d ", i)), bytes.Repeat([]byte{byte('a' + i)}, 100*i)}, Addr: to}
			}
			if n, err := sendA.Send(out); n != len(out) || err != nil {
				t.Fatalf("Send = %d, %v", n, err)
			}
			in := make([]ipv6.Message, 8)
			for i := range in {
				in[i].Buffers = [][]byte{make([]byte, 2048)}
				in[i].OOB = make([]byte, 64)
			}
			got := 0
			for got < len(out) {
				n, err := recvB.Recv(in[got:])
				if err != nil {
					t.Fatalf("Recv: %v", err)
				}
				got += n
			}
			from := a.LocalAddr().(*net.UDPAddr)
			for i := range out {
				want := append(append([]byte{}, out[i].Buffers[0]...), out[i].Buffers[1]...)
				m := in[i]
				if !bytes.Equal(m.Buffers[0][:m.N], want) {
					t.Errorf("message %d: %q; want %q", i, m.Buffers[0][:m.N], want)
				}
				// compared as AddrPorts: a 4in6 form of an IPv4 sender
				// would send the answer to the IPv6 socket
				ua, ok := m.Addr.(*net.UDPAddr)
				if !ok || ua.AddrPort() != from.AddrPort() {
					t.Errorf("message %d from %v; want %v", i, m.Addr, from)
				}
			}
		})
	}
}

func TestBatchRefusesAnAddressOfTheOtherFamily(t *testing.T) {
	_, send := udpSocket(t, "udp4", "127.0.0.1:0")
	msgs := []ipv6.Message{{Buffers: [][]byte{[]byte("x")}, Addr: &net.UDPAddr{IP: net.ParseIP("::1"), Port: 9}}}
	var ae *net.AddrError
	if _, err := send.Send(msgs); !errors.As(err, &ae) {
		t.Fatalf("Send of an IPv6 address on an IPv4 socket = %v; want an AddrError", err)
	}
}

func TestBatchAfterClose(t *testing.T) {
	c, b := udpSocket(t, "udp4", "127.0.0.1:0")
	c.Close()
	in := []ipv6.Message{{Buffers: [][]byte{make([]byte, 64)}}}
	if _, err := b.Recv(in); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Recv after Close = %v; want net.ErrClosed", err)
	}
}

func TestBatchMakesNoSchedulerSyscalls(t *testing.T) {
	a, send := udpSocket(t, "udp4", "127.0.0.1:0")
	b, recv := udpSocket(t, "udp4", "127.0.0.1:0")
	out := []ipv6.Message{{Buffers: [][]byte{[]byte("ping")}, Addr: b.LocalAddr()}}
	in := []ipv6.Message{{Buffers: [][]byte{make([]byte, 64)}}}
	const rounds = 50
	run := func(sendf, recvf func([]ipv6.Message, int) (int, error)) func() {
		return func() {
			logStart()
			for range rounds {
				if _, err := sendf(out, 0); err != nil {
					t.Error(err)
					return
				}
				if _, err := recvf(in, 0); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}
	pa, pb := ipv6.NewPacketConn(a), ipv6.NewPacketConn(b)
	if n := syscallEntries(t, run(pa.WriteBatch, pb.ReadBatch)); n < rounds {
		t.Fatalf("x/net's WriteBatch and ReadBatch entered the syscall state %d times in %d rounds; the trace cannot tell", n, rounds)
	}
	rawSend := func(m []ipv6.Message, _ int) (int, error) { return send.Send(m) }
	rawRecv := func(m []ipv6.Message, _ int) (int, error) { return recv.Recv(m) }
	if n := syscallEntries(t, run(rawSend, rawRecv)); n != 0 {
		t.Fatalf("Batch's Send and Recv entered the syscall state %d times in %d rounds; want 0", n, rounds)
	}
}

// NewBatchConn takes the socket's family from its local address: a batch
// goes out and comes back through x/net's signatures on either family.
func TestBatchConnTakesTheSocketsFamily(t *testing.T) {
	for _, fam := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		t.Run(fam.network, func(t *testing.T) {
			a, _ := udpSocket(t, fam.network, fam.addr)
			b, _ := udpSocket(t, fam.network, fam.addr)
			ca, cb := rawsock.NewBatchConn(a), rawsock.NewBatchConn(b)
			if _, ok := ca.(*rawsock.Batch); !ok {
				t.Fatalf("NewBatchConn = %T, want a raw *Batch on Linux", ca)
			}
			if n, err := ca.WriteBatch([]ipv6.Message{{Buffers: [][]byte{[]byte("one")}, Addr: b.LocalAddr()}}, 0); n != 1 || err != nil {
				t.Fatalf("WriteBatch = %d, %v", n, err)
			}
			b.SetReadDeadline(time.Now().Add(5 * time.Second))
			in := []ipv6.Message{{Buffers: [][]byte{make([]byte, 16)}}}
			if n, err := cb.ReadBatch(in, 0); n != 1 || err != nil || string(in[0].Buffers[0][:in[0].N]) != "one" {
				t.Fatalf("ReadBatch = %d, %v, %q", n, err, in[0].Buffers[0][:in[0].N])
			}
			if got := in[0].Addr.(*net.UDPAddr).AddrPort(); got != a.LocalAddr().(*net.UDPAddr).AddrPort() {
				t.Fatalf("from %v, want %v", got, a.LocalAddr())
			}
		})
	}
}
