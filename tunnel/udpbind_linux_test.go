package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
)

// openUDPBind opens a udpBind on any port; a watchdog closes it so that a
// lost datagram fails a test instead of blocking it.
func openUDPBind(t *testing.T) (*udpBind, []conn.ReceiveFunc, uint16) {
	t.Helper()
	b := newUDPBind().(*udpBind)
	fns, port, err := b.Open(0)
	if err != nil {
		t.Fatal(err)
	}
	watchdog := time.AfterFunc(20*time.Second, func() { b.Close() })
	t.Cleanup(func() { watchdog.Stop(); b.Close() })
	return b, fns, port
}

// bindPair is a receiving and a sending udpBind on loopback: the
// receiver's socket for addr's family, and the endpoint that reaches it.
func bindPair(t *testing.T, addr string) (recv *udpBind, sock *udpSocket, send *udpBind, ep conn.Endpoint) {
	t.Helper()
	recv, _, port := openUDPBind(t)
	send, _, _ = openUDPBind(t)
	a := netip.MustParseAddr(addr)
	sock, err := recv.socketFor(a)
	if err != nil {
		t.Skipf("no %s socket: %v", addr, err)
	}
	ep, err = send.ParseEndpoint(netip.AddrPortFrom(a, port).String())
	if err != nil {
		t.Fatal(err)
	}
	return recv, sock, send, ep
}

// numbered is count datagrams of the given sizes (cycled), each carrying
// its number in every 4 bytes, in buffers of wireguard-go's capacity.
func numbered(first, count int, sizes ...int) [][]byte {
	bufs := make([][]byte, count)
	for i := range bufs {
		size := sizes[i%len(sizes)]
		bufs[i] = make([]byte, size, device.MaxMessageSize)
		for j := 0; j+4 <= size; j += 4 {
			binary.BigEndian.PutUint32(bufs[i][j:], uint32(first+i))
		}
	}
	return bufs
}

// receiveAll receives len(want) datagrams through fn with batches of batch
// buffers and checks they arrive in order, whole, each with an endpoint,
// and no call returns more than the batch. It returns the endpoints.
func receiveAll(t *testing.T, fn conn.ReceiveFunc, batch int, want [][]byte) []conn.Endpoint {
	t.Helper()
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, device.MaxMessageSize)
	}
	sizes, eps := make([]int, batch), make([]conn.Endpoint, batch)
	var got []conn.Endpoint
	for len(got) < len(want) {
		n, err := fn(bufs, sizes, eps)
		if err != nil {
			t.Fatalf("after %d of %d datagrams: %v", len(got), len(want), err)
		}
		if n > batch {
			t.Fatalf("a call returned %d packets into %d buffers", n, batch)
		}
		for i := range n {
			if len(got) == len(want) {
				t.Fatalf("more datagrams than the %d sent", len(want))
			}
			w := want[len(got)]
			if p := bufs[i][:sizes[i]]; !bytes.Equal(p, w) {
				t.Fatalf("datagram %d: %d bytes (number %d), want %d bytes (number %d)", len(got), len(p), firstWord(p), len(w), firstWord(w))
			}
			if eps[i] == nil {
				t.Fatalf("datagram %d has no endpoint", len(got))
			}
			got = append(got, eps[i])
		}
	}
	return got
}

func firstWord(p []byte) int {
	if len(p) < 4 {
		return -1
	}
	return int(binary.BigEndian.Uint32(p))
}

// TestUDPBindBatches: batches of equal and mixed sizes cross the bind whole
// and in order, over IPv4 and IPv6, with GSO (one message per run of equal
// sizes) and without, into callers' batches smaller than what one GRO
// read returns (the rest spills to the next calls).
func TestUDPBindBatches(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		count int
		sizes []int
	}{
		{"equal", 64, []int{1200}},
		{"mixed", 50, []int{1452, 1452, 1452, 300, 1452, 80, 1452, 1452, 1500}},
		{"large", 6, []int{32032}},
	}
	for _, addr := range []string{"127.0.0.1", "::1"} {
		for _, gso := range []bool{true, false} {
			for _, batch := range []int{1, 8, deviceBatch} {
				_, sock, send, ep := bindPair(t, addr)
				r := newReceiver(sock)
				if !gso {
					s, _ := send.socketFor(ep.DstIP())
					s.gso.Store(false)
				}
				for round, c := range cases {
					want := numbered(round*100, c.count, c.sizes...)
					if err := send.Send(want, ep); err != nil {
						t.Fatalf("%s gso=%v %s: send: %v", addr, gso, c.name, err)
					}
					receiveAll(t, r.receive, batch, want)
				}
			}
		}
	}
}

// TestUDPBindTooBigFailsAlone: a datagram the route cannot take (as a path
// MTU probe over a smaller link; here over UDP's own limit) fails with
// EMSGSIZE, and every other datagram of the batch, before and after it and
// in its GSO run, still crosses.
func TestUDPBindTooBigFailsAlone(t *testing.T) {
	t.Parallel()
	for _, addr := range []string{"127.0.0.1", "::1"} {
		for _, gso := range []bool{true, false} {
			_, sock, send, ep := bindPair(t, addr)
			r := newReceiver(sock)
			if !gso {
				s, _ := send.socketFor(ep.DstIP())
				s.gso.Store(false)
			}
			bufs := numbered(0, 7, 1200, 1200, device.MaxMessageSize, 1200, 1200, 1200, 80)
			err := send.Send(bufs, ep)
			if !errors.Is(err, unix.EMSGSIZE) {
				t.Fatalf("%s gso=%v: send = %v, want EMSGSIZE", addr, gso, err)
			}
			receiveAll(t, r.receive, 8, append(bufs[:2:2], bufs[3:]...))
		}
	}
}

// TestUDPBindCoalescedReads: a plain read that meets a GRO-coalesced
// datagram of 64 into 8 buffers hands the rest over on later calls and
// turns to landing reads (the receiver's own buffers); landing reads
// deliver coalesced and single datagrams alike, and plainAfter reads
// without a coalesced one turn back to plain reads.
func TestUDPBindCoalescedReads(t *testing.T) {
	t.Parallel()
	_, sock, send, ep := bindPair(t, "127.0.0.1")
	if !sock.gro {
		t.Skip("no UDP_GRO on this kernel: reads never coalesce")
	}
	r := newReceiver(sock)
	want := numbered(0, 64, 1000)
	if err := send.Send(want, ep); err != nil {
		t.Fatal(err)
	}
	receiveAll(t, r.receive, 8, want[:8])
	if !r.pending.left() || !r.landing {
		t.Fatalf("after 8 of 64 coalesced datagrams: pending %v, landing %v; want both", r.pending.left(), r.landing)
	}
	receiveAll(t, r.receive, 8, want[8:])
	want = numbered(64, 64, 1000)
	if err := send.Send(want, ep); err != nil {
		t.Fatal(err)
	}
	receiveAll(t, r.receive, deviceBatch, want)
	s, _ := send.socketFor(ep.DstIP())
	s.gso.Store(false)
	for i := range plainAfter {
		one := numbered(128+i, 1, 1000)
		if err := send.Send(one, ep); err != nil {
			t.Fatal(err)
		}
		receiveAll(t, r.receive, deviceBatch, one)
	}
	if r.landing || r.pending.left() {
		t.Fatalf("after %d single datagrams: landing %v, pending %v; want plain reads, nothing pending", plainAfter, r.landing, r.pending.left())
	}
}

// TestUDPBindStickySource: the endpoint of a received datagram remembers the
// local address it came to, and a reply goes out from that address, not the
// one routing would pick (on a multi-homed relay, the one the peer knows).
func TestUDPBindStickySource(t *testing.T) {
	t.Parallel()
	recv, fns, port := openUDPBind(t)
	peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	peer.SetDeadline(time.Now().Add(10 * time.Second))
	to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 5), Port: int(port)}
	if _, err := peer.WriteToUDP([]byte("hello"), to); err != nil {
		t.Fatal(err)
	}
	eps := receiveAll(t, fns[0], 4, [][]byte{[]byte("hello")})
	ep := eps[0]
	if got := ep.SrcIP(); got != netip.MustParseAddr("127.0.0.5") {
		t.Fatalf("endpoint source %v, want 127.0.0.5 (where the datagram went)", got)
	}
	if got, want := ep.DstToString(), peer.LocalAddr().String(); got != want {
		t.Fatalf("endpoint destination %s, want %s", got, want)
	}
	if err := recv.Send([][]byte{[]byte("reply")}, ep); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	n, from, err := peer.ReadFromUDP(buf)
	if err != nil {
		t.Fatal(err)
	}
	if string(buf[:n]) != "reply" || !from.IP.Equal(net.IPv4(127, 0, 0, 5)) {
		t.Fatalf("got %q from %v, want \"reply\" from 127.0.0.5", buf[:n], from)
	}
	// Cleared, the source is routing's again (127.0.0.1 on loopback).
	ep.ClearSrc()
	if err := recv.Send([][]byte{[]byte("again")}, ep); err != nil {
		t.Fatal(err)
	}
	if n, from, err = peer.ReadFromUDP(buf); err != nil || string(buf[:n]) != "again" || !from.IP.Equal(net.IPv4(127, 0, 0, 1)) {
		t.Fatalf("after ClearSrc got %q from %v (%v), want \"again\" from 127.0.0.1", buf[:n], from, err)
	}
}

// TestUDPBindPack: runs of equal sizes share a message up to the kernel's
// 64 segments and 64 KiB; a shorter or longer datagram ends a run.
func TestUDPBindPack(t *testing.T) {
	t.Parallel()
	ep := &udpEndpoint{dst: netip.MustParseAddrPort("127.0.0.1:9")}
	sizes := func(n, size int) []int {
		s := make([]int, n)
		for i := range s {
			s[i] = size
		}
		return s
	}
	for _, c := range []struct {
		name  string
		sizes []int
		want  []int // datagrams per message
	}{
		{"one", []int{1452}, []int{1}},
		{"run and short tail", []int{1452, 1452, 1452, 300, 1452, 1452}, []int{4, 2}},
		{"longer ends a run", []int{300, 1452, 1452}, []int{1, 2}},
		{"64 segments", sizes(70, 100), []int{64, 6}},
		{"64 KiB", sizes(50, 1452), []int{45, 5}},
		{"32000-byte MTU", sizes(5, 32032), []int{2, 2, 1}},
	} {
		bufs := make([][]byte, len(c.sizes))
		for i, n := range c.sizes {
			bufs[i] = make([]byte, n)
		}
		var sb sendBatch
		n, used := sb.pack(bufs, ep, false, true)
		if used != len(bufs) || sb.bufsIn(n) != len(bufs) {
			t.Fatalf("%s: packed %d of %d bufs (bufsIn %d)", c.name, used, len(bufs), sb.bufsIn(n))
		}
		var got []int
		for _, m := range sb.msgs[:n] {
			got = append(got, len(m.Buffers))
		}
		if !equalInts(got, c.want) {
			t.Fatalf("%s: datagrams per message %v, want %v", c.name, got, c.want)
		}
		if seg := segmentSize(t, sb.msgs[0].OOB); (c.want[0] > 1) != (seg == c.sizes[0]) {
			t.Fatalf("%s: first message's segment size %d", c.name, seg)
		}
		n, _ = sb.pack(bufs, ep, false, false)
		if n != len(bufs) {
			t.Fatalf("%s: without GSO %d messages for %d datagrams", c.name, n, len(bufs))
		}
		sb.reset(n)
		for _, m := range sb.msgs {
			if len(m.Buffers) != 0 || m.Addr != nil {
				t.Fatalf("%s: reset left a message with %d buffers", c.name, len(m.Buffers))
			}
		}
	}
}

// segmentSize is the UDP_SEGMENT size a send's control data asks for (0:
// none).
func segmentSize(t *testing.T, oob []byte) int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		if m.Header.Level == unix.IPPROTO_UDP && m.Header.Type == unix.UDP_SEGMENT {
			return int(binary.NativeEndian.Uint16(m.Data))
		}
	}
	return 0
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestUDPBindClosed: a closed bind's receive and send fail with
// net.ErrClosed (wireguard-go stops its receive goroutines on it), and the
// bind opens again.
func TestUDPBindClosed(t *testing.T) {
	t.Parallel()
	b, fns, _ := openUDPBind(t)
	ep, _ := b.ParseEndpoint("127.0.0.1:9")
	errc := make(chan error, 1)
	go func() {
		_, err := fns[0]([][]byte{make([]byte, device.MaxMessageSize)}, make([]int, 1), make([]conn.Endpoint, 1))
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond) // let it block in the read
	b.Close()
	if err := <-errc; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("receive on a closed bind: %v, want net.ErrClosed", err)
	}
	if err := b.Send([][]byte{[]byte("x")}, ep); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("send on a closed bind: %v, want net.ErrClosed", err)
	}
	if _, _, err := b.Open(0); err != nil {
		t.Fatalf("reopen: %v", err)
	}
	if _, _, err := b.Open(0); !errors.Is(err, conn.ErrBindAlreadyOpen) {
		t.Fatalf("open twice: %v, want ErrBindAlreadyOpen", err)
	}
}
