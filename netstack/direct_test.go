package netstack

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/natbox/natbox/internal/testutil"
)

// What wireguard-go's RoutineReadFromTUN passes to Read: conn.IdealBatchSize
// buffers of MaxMessageSize bytes, packets at MessageTransportHeaderSize.
const (
	wgBatch  = 128
	wgBufLen = 65535
	wgOffset = 16
)

// directBridge joins two Stacks the way two wireguard-go devices joined by
// UDP would: per direction, a reader with wireguard-go's batch reads one
// Direct pair's outer side and writes what it read into the other's. Every
// packet is checked on the way (checkWirePacket).
type directBridge struct {
	mtu      int
	maxBatch atomic.Int64 // largest Read
	multi    atomic.Int64 // Reads that returned more than one packet
	packets  atomic.Int64
	largest  atomic.Int64 // bytes of the largest packet
	tooBig   atomic.Int64 // writes the receiving side refused as too big
	// corrupt: after the check, flip the checksum of every UDP datagram
	// and TCP segment but SYNs (corruptChecksum).
	corrupt atomic.Bool
	// zeroOK: a TCP segment whose checksum is 0 and wrong is counted in
	// zeroSums, not failed (SetChecksumsOptional).
	zeroOK   atomic.Bool
	zeroSums atomic.Int64
	// alter, if set, replaces each checked packet by what it returns
	// (nothing drops it; more delivers others with it), for tests of loss
	// and reordering.
	alter atomic.Pointer[func(p []byte) [][]byte]
	mu    sync.Mutex
	errs  []error
	done  sync.WaitGroup
}

func (br *directBridge) fail(err error) {
	br.mu.Lock()
	defer br.mu.Unlock()
	if len(br.errs) < 10 {
		br.errs = append(br.errs, err)
	}
}

func (br *directBridge) run(from, to tun.Device) {
	defer br.done.Done()
	bufs := make([][]byte, wgBatch)
	for i := range bufs {
		bufs[i] = make([]byte, wgBufLen)
	}
	sizes := make([]int, wgBatch)
	out := make([][]byte, 0, wgBatch)
	for {
		n, err := from.Read(bufs, sizes, wgOffset)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				br.fail(fmt.Errorf("read: %w", err))
			}
			return
		}
		if int64(n) > br.maxBatch.Load() {
			br.maxBatch.Store(int64(n))
		}
		if n > 1 {
			br.multi.Add(1)
		}
		br.packets.Add(int64(n))
		out = out[:0]
		for i := range n {
			p := bufs[i][wgOffset : wgOffset+sizes[i]]
			if int64(len(p)) > br.largest.Load() {
				br.largest.Store(int64(len(p)))
			}
			if err := checkWirePacket(p, br.mtu); err != nil {
				if br.zeroOK.Load() && tcpChecksumZero(p) {
					br.zeroSums.Add(1) // left 0, not summed (a valid sum is 0 once in 65536)
				} else {
					br.fail(err)
				}
			}
			if br.corrupt.Load() {
				corruptChecksum(p)
			}
			if alter := br.alter.Load(); alter != nil {
				for _, q := range (*alter)(p) {
					out = append(out, append(make([]byte, wgOffset, wgOffset+len(q)), q...))
				}
				continue
			}
			out = append(out, bufs[i][:wgOffset+sizes[i]])
		}
		if _, err := to.Write(out, wgOffset); err != nil {
			if errors.Is(err, os.ErrClosed) {
				// The other side closed first: keep reading, as
				// wireguard-go does until its own device closes, or
				// this side's Close waits flushTimeout for its queue.
				continue
			}
			if errors.Is(err, ErrPacketTooBig) {
				br.tooBig.Add(1) // the receiving link refused it, as a device would
				continue
			}
			br.fail(fmt.Errorf("write: %w", err))
		}
	}
}

// tcpChecksumZero reports whether p is a TCP segment with checksum 0 (no
// IPv4 options; IPv6 without extension headers).
func tcpChecksumZero(p []byte) bool {
	l3, proto := header.IPv6MinimumSize, p[6]
	if p[0]>>4 == 4 {
		l3, proto = header.IPv4MinimumSize, p[9]
	}
	return proto == uint8(header.TCPProtocolNumber) && len(p) >= l3+header.TCPMinimumSize &&
		p[l3+header.TCPChecksumOffset] == 0 && p[l3+header.TCPChecksumOffset+1] == 0
}

// corruptChecksum flips a bit of p's UDP or TCP checksum, but a SYN's (no
// IPv4 options; IPv6 without extension headers).
func corruptChecksum(p []byte) {
	l3, proto := header.IPv6MinimumSize, p[6]
	if p[0]>>4 == 4 {
		l3, proto = header.IPv4MinimumSize, p[9]
	}
	switch {
	case proto == uint8(header.UDPProtocolNumber):
		p[l3+6] ^= 0x01 // the UDP checksum
	case proto == uint8(header.TCPProtocolNumber) && header.TCP(p[l3:]).Flags()&header.TCPFlagSyn == 0:
		p[l3+header.TCPChecksumOffset] ^= 0x01
	}
}

func (br *directBridge) check(t testing.TB) {
	t.Helper()
	br.mu.Lock()
	defer br.mu.Unlock()
	for _, err := range br.errs {
		t.Error(err)
	}
}

// checkWirePacket checks what a peer would: the packet fits the MTU, its IP
// length fields match its size, and its IPv4 header and TCP or UDP checksums
// are valid (computed here with gVisor's header package, independently of
// the code under test).
func checkWirePacket(p []byte, mtu int) error {
	if len(p) > mtu {
		return fmt.Errorf("%d-byte packet exceeds the %d mtu", len(p), mtu)
	}
	var src, dst tcpip.Address
	var proto uint8
	var l4 []byte
	switch p[0] >> 4 {
	case 4:
		ip := header.IPv4(p)
		if !ip.IsValid(len(p)) || int(ip.TotalLength()) != len(p) {
			return fmt.Errorf("bad ipv4 header or length: %x", p[:20])
		}
		if !ip.IsChecksumValid() {
			return fmt.Errorf("bad ipv4 header checksum")
		}
		src, dst, proto, l4 = ip.SourceAddress(), ip.DestinationAddress(), ip.Protocol(), ip.Payload()
	case 6:
		ip := header.IPv6(p)
		if !ip.IsValid(len(p)) || int(ip.PayloadLength())+header.IPv6MinimumSize != len(p) {
			return fmt.Errorf("bad ipv6 header or length")
		}
		src, dst, proto, l4 = ip.SourceAddress(), ip.DestinationAddress(), uint8(ip.TransportProtocol()), ip.Payload()
	default:
		return fmt.Errorf("not an IP packet: %x", p[0])
	}
	switch proto {
	case uint8(header.TCPProtocolNumber):
		tcp := header.TCP(l4)
		payload := l4[tcp.DataOffset():]
		if !tcp.IsChecksumValid(src, dst, checksum.Checksum(payload, 0), uint16(len(payload))) {
			return fmt.Errorf("bad tcp checksum (seq %d, %d bytes)", tcp.SequenceNumber(), len(payload))
		}
	case uint8(header.UDPProtocolNumber):
		udp := header.UDP(l4)
		if !udp.IsChecksumValid(src, dst, checksum.Checksum(udp.Payload(), 0)) {
			return fmt.Errorf("bad udp checksum")
		}
	}
	return nil
}

// newDirectPair is newPair over two Direct pairs and a bridge.
func newDirectPair(t testing.TB, mtu int, client, server Handler) (c, s *Stack, br *directBridge) {
	t.Helper()
	return newDirectPairConfig(t, Config{MTU: mtu}, Config{MTU: mtu}, client, server)
}

// newDirectPairConfig is newDirectPair with each side's Config (Addresses
// are set here); the bridge checks packets against the larger link MTU.
func newDirectPairConfig(t testing.TB, clientCfg, serverCfg Config, client, server Handler) (c, s *Stack, br *directBridge) {
	t.Helper()
	cs, co := Direct(clientCfg.MTU)
	ss, so := Direct(serverCfg.MTU)
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	clientCfg.Addresses = []netip.Prefix{clientPrefix4, clientPrefix6}
	c, err := New(cs, clientCfg, client, log.Named("client"))
	if err != nil {
		so.Close()
		t.Fatalf("new client stack: %v", err)
	}
	serverCfg.Addresses = []netip.Prefix{serverPrefix4, serverPrefix6}
	s, err = New(ss, serverCfg, server, log.Named("server"))
	if err != nil {
		c.Close()
		t.Fatalf("new server stack: %v", err)
	}
	br = &directBridge{mtu: max(clientCfg.MTU, serverCfg.MTU)}
	br.done.Add(2)
	go br.run(co, so)
	go br.run(so, co)
	t.Cleanup(func() {
		s.Close()
		c.Close()
		br.done.Wait()
	})
	runStack(t, c)
	runStack(t, s)
	return c, s, br
}

// runDirect is runStack for a stack on a Direct pair, returning once Run
// has let the pair's reader and writers in (so a Close that follows finds
// the stack running).
func runDirect(t testing.TB, s *Stack) {
	t.Helper()
	runStack(t, s)
	<-s.direct.started
}

// TestDirectTCPBothWays sends flows of sizes around MSS multiples through
// two Direct pairs, IPv4 and IPv6, and has the server echo them: gVisor's
// GSO packets are cut into wire packets whose checksums a peer accepts,
// and what the peer writes reaches the stack intact.
func TestDirectTCPBothWays(t *testing.T) {
	const mtu = 1420
	echoServer := funcHandler{tcp: echoTCP}
	client, server, br := newDirectPair(t, mtu, funcHandler{}, echoServer)
	for _, dst := range []netip.AddrPort{
		netip.AddrPortFrom(serverPrefix4.Addr(), 7),
		netip.AddrPortFrom(serverPrefix6.Addr(), 7),
	} {
		// The MSS is the MTU less the IP and TCP headers (12 bytes of
		// timestamp options): 1368 over IPv4, 1348 over IPv6.
		mss := mtu - 20 - 20 - 12
		if dst.Addr().Is6() {
			mss = mtu - 40 - 20 - 12
		}
		for _, n := range []int{1, mss - 1, mss, mss + 1, 2*mss - 1, 2 * mss, 2*mss + 1, 47*mss + 1, 64 << 10, 1<<20 + 3} {
			ok := t.Run(fmt.Sprintf("%s/%d", map[bool]string{true: "v4", false: "v6"}[dst.Addr().Is4()], n), func(t *testing.T) {
				data := make([]byte, n)
				rand.Read(data)
				c, err := client.DialTCP(testContext(t), netip.AddrPort{}, dst)
				if err != nil {
					t.Fatalf("dial: %v", err)
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				errc := make(chan error, 1)
				go func() {
					_, err := c.Write(data)
					c.(closeWriter).CloseWrite()
					errc <- err
				}()
				got, err := io.ReadAll(c)
				if err != nil {
					t.Fatalf("read echo: %v", err)
				}
				if err := <-errc; err != nil {
					t.Fatalf("write: %v", err)
				}
				if !bytes.Equal(got, data) {
					t.Fatalf("echo: got %d bytes, sent %d (first difference at %d)", len(got), len(data), firstDiff(got, data))
				}
			})
			if !ok {
				br.check(t) // what the bridge saw explains it
				return
			}
		}
	}
	br.check(t)
	// gVisor counts a GSO packet as one segment sent; the link cut them
	// into more packets than that.
	cs, ss := client.Stats(), server.Stats()
	gs := client.stack.Stats().TCP.SegmentsSent.Value()
	if cs.PacketsOut <= gs {
		t.Errorf("client sent %d packets for %d gVisor segments: no GSO packet was cut", cs.PacketsOut, gs)
	}
	if cs.Oversize+ss.Oversize+cs.Invalid.TCPChecksum+ss.Invalid.TCPChecksum+cs.ReadErrors+ss.ReadErrors != 0 {
		t.Errorf("client %+v server %+v: oversize, bad checksums or read errors", cs, ss)
	}
	if m := br.maxBatch.Load(); m < 2 || m > wgBatch {
		t.Errorf("largest read %d packets, want 2..%d", m, wgBatch)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// gsoPacket builds a TCP packet as gVisor hands one to a host-GSO link:
// IP and TCP headers (with 12 bytes of options) in front of payload, the
// TCP checksum partial (here: garbage, which the cut must not trust).
func gsoPacket(v6 bool, payload []byte, mss int, seq uint32, id uint16, flags header.TCPFlags) *stack.PacketBuffer {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 128, Payload: buffer.MakeWithData(payload)})
	tcp := header.TCP(pkt.TransportHeader().Push(header.TCPMinimumSize + 12))
	tcp.Encode(&header.TCPFields{SrcPort: 1000, DstPort: 2000, SeqNum: seq, AckNum: 77, DataOffset: 32, Flags: flags, WindowSize: 500, Checksum: 0xdead})
	copy(tcp[20:], []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}) // NOP NOP TS
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	gso := stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: uint16(mss), L3HdrLen: header.IPv4MinimumSize, MaxSize: 1 << 16}
	if v6 {
		ip := header.IPv6(pkt.NetworkHeader().Push(header.IPv6MinimumSize))
		ip.Encode(&header.IPv6Fields{PayloadLength: uint16(pkt.Size() - header.IPv6MinimumSize), TransportProtocol: header.TCPProtocolNumber, HopLimit: 64,
			SrcAddr: tcpipAddr(clientPrefix6.Addr()), DstAddr: tcpipAddr(serverPrefix6.Addr())})
		pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
		gso.Type, gso.L3HdrLen = stack.GSOTCPv6, header.IPv6MinimumSize
	} else {
		ip := header.IPv4(pkt.NetworkHeader().Push(header.IPv4MinimumSize))
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(pkt.Size()), ID: id, Flags: header.IPv4FlagDontFragment, TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
			SrcAddr: tcpipAddr(clientPrefix4.Addr()), DstAddr: tcpipAddr(serverPrefix4.Addr())})
		ip.SetChecksum(^ip.CalculateChecksum())
		pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	}
	pkt.GSOOptions = gso
	return pkt
}

// TestDirectSegmentGSO cuts GSO packets of sizes around MSS multiples into
// batches smaller than the segment count (so a packet spans reads), and
// checks every segment: valid checksums, lengths, consecutive sequence
// numbers (across the 2^32 wrap) and IPv4 IDs, FIN and PSH only on the last
// segment, CWR only on the first, and the payloads in order.
func TestDirectSegmentGSO(t *testing.T) {
	const mtu, mss = 1420, 1000
	e := newLinkEndpoint(mtu, 16, &counters{}, false)
	for _, v6 := range []bool{false, true} {
		for _, n := range []int{0, 1, mss - 1, mss, mss + 1, 2*mss - 1, 2 * mss, 2*mss + 1, 7*mss + 5, 65000} {
			t.Run(fmt.Sprintf("v6=%v/%d", v6, n), func(t *testing.T) {
				payload := make([]byte, n)
				rand.Read(payload)
				const seq0 uint32 = 0xffffffff - 1500
				const id0 uint16 = 0xfffe
				flags := header.TCPFlagAck | header.TCPFlagPsh | header.TCPFlagFin | header.TCPFlagCwr
				pkt := gsoPacket(v6, payload, mss, seq0, id0, flags)
				b := &outBuf{pkt: pkt, n: pkt.Size()}
				defer pkt.DecRef()
				want := max((n+mss-1)/mss, 1)
				bufs := make([][]byte, 3)
				for i := range bufs {
					bufs[i] = make([]byte, wgOffset+mtu)
				}
				sizes := make([]int, len(bufs))
				var got []byte
				segs := 0
				for seg, done := 0, false; !done; {
					var k int
					k, done = e.readOut(b, seg, bufs, sizes, wgOffset)
					if k == 0 && !done {
						t.Fatal("readOut made no progress")
					}
					for i := range k {
						p := bufs[i][wgOffset : wgOffset+sizes[i]]
						if err := checkWirePacket(p, mtu); err != nil {
							t.Fatalf("segment %d: %v", segs, err)
						}
						l3 := header.IPv4MinimumSize
						if v6 {
							l3 = header.IPv6MinimumSize
						} else if id := header.IPv4(p).ID(); id != id0+uint16(segs) {
							t.Errorf("segment %d: ipv4 id %#x, want %#x", segs, id, id0+uint16(segs))
						}
						tcp := header.TCP(p[l3:])
						if s := tcp.SequenceNumber(); s != seq0+uint32(segs*mss) {
							t.Errorf("segment %d: seq %d, want %d", segs, s, seq0+uint32(segs*mss))
						}
						if len(tcp.Options()) != 12 || tcp.AckNumber() != 77 || tcp.WindowSize() != 500 {
							t.Errorf("segment %d: header not copied: %x", segs, tcp[:tcp.DataOffset()])
						}
						last, first := segs == want-1, segs == 0
						f := tcp.Flags()
						if f.Contains(header.TCPFlagFin) != last || f.Contains(header.TCPFlagPsh) != last || f.Contains(header.TCPFlagCwr) != first || !f.Contains(header.TCPFlagAck) {
							t.Errorf("segment %d of %d: flags %v", segs, want, f)
						}
						data := tcp.Payload()
						if !last && len(data) != mss {
							t.Errorf("segment %d: %d bytes, want mss %d", segs, len(data), mss)
						}
						got = append(got, data...)
						segs++
					}
					seg += k
				}
				if segs != want {
					t.Errorf("%d segments, want %d", segs, want)
				}
				if !bytes.Equal(got, payload) {
					t.Errorf("payload: got %d bytes, want %d (first difference at %d)", len(got), len(payload), firstDiff(got, payload))
				}
			})
		}
	}
}

// TestDirectUDPAndTooBig: a datagram WriteUDP sends comes out of the outer
// side's Read, one written to it reaches HandleUDP, and a packet over the
// MTU is dropped with ErrPacketTooBig while the rest of its batch is
// delivered.
func TestDirectUDPAndTooBig(t *testing.T) {
	got := make(chan string, 4)
	ss, outer := Direct(1500)
	s, err := New(ss, Config{Addresses: []netip.Prefix{serverPrefix4}}, funcHandler{udp: func(src, dst netip.AddrPort, p []byte) {
		got <- fmt.Sprintf("%s>%s %s", src, dst, p)
	}}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	runStack(t, s)
	a, b := netip.MustParseAddrPort("10.0.0.2:53"), netip.MustParseAddrPort("192.0.2.9:4000")
	if err := s.WriteUDP(a, b, []byte("out")); err != nil {
		t.Fatal(err)
	}
	bufs, sizes := [][]byte{make([]byte, wgBufLen), make([]byte, wgBufLen)}, make([]int, 2)
	n, err := outer.Read(bufs, sizes, wgOffset)
	if err != nil || n != 1 {
		t.Fatalf("read = %d, %v", n, err)
	}
	p := bufs[0][wgOffset : wgOffset+sizes[0]]
	if err := checkWirePacket(p, 1500); err != nil || !bytes.Equal(header.UDP(header.IPv4(p).Payload()).Payload(), []byte("out")) {
		t.Fatalf("read packet %x: %v", p, err)
	}
	in := append(make([]byte, wgOffset), rawUDP(b, a, []byte("in"))...)
	big := append(make([]byte, wgOffset), rawUDP(b, a, make([]byte, 1500))...)
	n, err = outer.Write([][]byte{big, in}, wgOffset)
	if n != 1 || !errors.Is(err, ErrPacketTooBig) {
		t.Fatalf("write = %d, %v; want 1, ErrPacketTooBig", n, err)
	}
	if g := <-got; g != "192.0.2.9:4000>10.0.0.2:53 in" {
		t.Fatalf("HandleUDP got %q", g)
	}
	if st := s.Stats(); st.ReadErrors != 1 || st.UDPFastPath != 1 || st.PacketsOut != 1 {
		t.Fatalf("stats %+v: want 1 read error, 1 fast-path datagram, 1 packet out", st)
	}
}

// echoMiB sends 1 MiB of random bytes from client to the echo service at
// dst and checks they all come back.
func echoMiB(t *testing.T, client *Stack, dst netip.AddrPort) {
	t.Helper()
	data := make([]byte, 1<<20)
	rand.Read(data)
	c, err := client.DialTCP(testContext(t), netip.AddrPort{}, dst)
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		c.Write(data)
		c.(closeWriter).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("echo from %s: %d of %d bytes, %v", dst, len(got), len(data), err)
	}
}

// TestDirectTrustsAuthenticatedChecksums: what a Direct pair's outer side
// delivers left WireGuard authenticated, so TCP segments and UDP datagrams
// whose checksums are wrong still reach the stack (a Pipe's stack drops
// them: TestBadChecksumSYNNeverHandled) and nothing is counted invalid.
// SYNs no endpoint takes are still checked (synChecksumValid: a few bytes).
func TestDirectTrustsAuthenticatedChecksums(t *testing.T) {
	echoServer := funcHandler{tcp: echoTCP}
	got := make(chan string, 1)
	echoServer.udp = func(src, dst netip.AddrPort, p []byte) { got <- string(p) }
	client, server, br := newDirectPair(t, 1420, funcHandler{}, echoServer)
	br.corrupt.Store(true)
	echoMiB(t, client, netip.AddrPortFrom(serverPrefix4.Addr(), 7))
	echoMiB(t, client, netip.AddrPortFrom(serverPrefix6.Addr(), 7))
	if err := client.WriteUDP(netip.AddrPortFrom(clientPrefix4.Addr(), 9), netip.AddrPortFrom(serverPrefix4.Addr(), 53), []byte("udp")); err != nil {
		t.Fatal(err)
	}
	select {
	case g := <-got:
		if g != "udp" {
			t.Fatalf("HandleUDP got %q", g)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the datagram never arrived")
	}
	br.check(t)
	for _, s := range []*Stack{client, server} {
		if inv := s.Stats().Invalid; inv.TCPChecksum != 0 || inv.UDPChecksum != 0 {
			t.Fatalf("invalid counters %+v: a Direct pair's packets are not checked", inv)
		}
	}
}

// TestDirectChecksumsOptional: towards destinations SetChecksumsOptional
// names, the segments cut from GSO packets leave with checksum 0 and still
// arrive (the peer's Direct pair trusts them); towards others, and after
// the list is cleared, every checksum is filled.
func TestDirectChecksumsOptional(t *testing.T) {
	client, server, br := newDirectPair(t, 1420, funcHandler{}, funcHandler{tcp: echoTCP})
	br.zeroOK.Store(true)
	echo := func(dst netip.AddrPort) { echoMiB(t, client, dst) }
	dst4, dst6 := netip.AddrPortFrom(serverPrefix4.Addr(), 7), netip.AddrPortFrom(serverPrefix6.Addr(), 7)
	server.SetChecksumsOptional([]netip.Prefix{clientPrefix4})
	echo(dst4)
	zero4 := br.zeroSums.Load()
	echo(dst6) // IPv6 is not named: filled
	if zero4 == 0 || br.zeroSums.Load() != zero4 {
		t.Fatalf("checksum-0 segments: %d over IPv4 (named), %d more over IPv6 (not); want some, none", zero4, br.zeroSums.Load()-zero4)
	}
	server.SetChecksumsOptional(nil)
	echo(dst4)
	if br.zeroSums.Load() != zero4 {
		t.Fatalf("%d checksum-0 segments after the list was cleared", br.zeroSums.Load()-zero4)
	}
	br.check(t) // the client's segments, and every other, had valid checksums
}

// waitBlocked polls the goroutine dump until, for each function, a goroutine
// with it on its stack is blocked in a select or channel receive.
func waitBlocked(t *testing.T, funcs ...string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for deadline := time.Now().Add(10 * time.Second); ; {
		dump := string(buf[:runtime.Stack(buf, true)])
		blocked := 0
		for _, fn := range funcs {
			for _, g := range strings.Split(dump, "\n\n") {
				hdr, _, _ := strings.Cut(g, "\n")
				if (strings.Contains(hdr, "[select") || strings.Contains(hdr, "[chan receive")) && strings.Contains(g, fn) {
					blocked++
					break
				}
			}
		}
		if blocked == len(funcs) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not every one of %q is blocked:\n%s", funcs, dump)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestDirectCloseUnblocks: closing the outer side (wireguard-go closing its
// device) unblocks a waiting Read, fails later Writes and the stack's sends,
// and the stack still closes; before New attaches a stack, Read and Write
// wait and Close releases them.
func TestDirectCloseUnblocks(t *testing.T) {
	t.Run("running", func(t *testing.T) {
		ss, outer := Direct(1500)
		s, err := New(ss, Config{Addresses: []netip.Prefix{serverPrefix4}}, funcHandler{}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
		if err != nil {
			t.Fatal(err)
		}
		runStack(t, s)
		errc := make(chan error, 1)
		go func() {
			_, err := outer.Read([][]byte{make([]byte, wgBufLen)}, []int{0}, wgOffset)
			errc <- err
		}()
		waitBlocked(t, "netstack.(*directOuter).Read(")
		outer.Close()
		if err := <-errc; !errors.Is(err, os.ErrClosed) {
			t.Fatalf("read after close: %v", err)
		}
		if _, err := outer.Write([][]byte{append(make([]byte, wgOffset), rawUDP(netip.MustParseAddrPort("192.0.2.9:1"), netip.MustParseAddrPort("10.0.0.2:2"), nil)...)}, wgOffset); !errors.Is(err, os.ErrClosed) {
			t.Fatalf("write after close: %v", err)
		}
		if err := s.WriteUDP(netip.MustParseAddrPort("10.0.0.2:2"), netip.MustParseAddrPort("192.0.2.9:1"), nil); !errors.Is(err, ErrClosed) {
			t.Fatalf("WriteUDP on a closed device: %v", err)
		}
		if err := s.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
	})
	t.Run("no reader", func(t *testing.T) {
		// A stack whose device was never handed to wireguard-go (its
		// setup failed) has nothing to flush: Close must not wait the
		// flush timeout for a reader.
		ss, _ := Direct(1500)
		s, err := New(ss, Config{Addresses: []netip.Prefix{serverPrefix4}}, funcHandler{}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
		if err != nil {
			t.Fatal(err)
		}
		runDirect(t, s)
		start := time.Now()
		if err := s.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
		if el := time.Since(start); el >= flushTimeout {
			t.Fatalf("Close took %v: it waited for a flush with nothing queued", el)
		}
	})
	t.Run("unattached", func(t *testing.T) {
		ss, outer := Direct(1500)
		errc := make(chan error, 2)
		go func() {
			_, err := outer.Read([][]byte{make([]byte, wgBufLen)}, []int{0}, wgOffset)
			errc <- err
		}()
		go func() {
			_, err := outer.Write([][]byte{make([]byte, wgOffset+20)}, wgOffset)
			errc <- err
		}()
		waitBlocked(t, "netstack.(*directOuter).Read(", "netstack.(*directOuter).Write(")
		ss.Close() // either end closes both
		for range 2 {
			if err := <-errc; !errors.Is(err, os.ErrClosed) {
				t.Fatalf("blocked call returned %v, want os.ErrClosed", err)
			}
		}
	})
}

// TestDirectCloseFlushes: Stack.Close hands what is still queued to the
// reader before its Read reports os.ErrClosed.
func TestDirectCloseFlushes(t *testing.T) {
	ss, outer := Direct(1500)
	s, err := New(ss, Config{Addresses: []netip.Prefix{serverPrefix4}}, funcHandler{}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	runDirect(t, s)
	a, b := netip.MustParseAddrPort("10.0.0.2:53"), netip.MustParseAddrPort("192.0.2.9:4000")
	for i := range 3 {
		if err := s.WriteUDP(a, b, []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	bufs, sizes := [][]byte{make([]byte, wgBufLen)}, make([]int, 1)
	var got []byte
	for {
		n, err := outer.Read(bufs, sizes, wgOffset)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				t.Fatalf("read: %v", err)
			}
			break
		}
		for i := range n {
			p := bufs[i][wgOffset : wgOffset+sizes[i]]
			got = append(got, header.UDP(header.IPv4(p).Payload()).Payload()...)
		}
	}
	if err := <-closed; err != nil {
		t.Fatalf("close: %v", err)
	}
	if !bytes.Equal(got, []byte{0, 1, 2}) {
		t.Fatalf("flushed datagrams %v, want [0 1 2]", got)
	}
}

// TestDirectConcurrentWrites: wireguard-go writes from one goroutine per
// peer, so deliveries run at once; every datagram arrives, and Writes
// racing Stack.Close either deliver or fail with os.ErrClosed while Close
// waits for them.
func TestDirectConcurrentWrites(t *testing.T) {
	const writers, batches, batch = 4, 50, 16
	var got atomic.Int64
	ss, outer := Direct(1500)
	s, err := New(ss, Config{Addresses: []netip.Prefix{serverPrefix4}}, funcHandler{udp: func(netip.AddrPort, netip.AddrPort, []byte) {
		got.Add(1)
	}}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	runStack(t, s)
	write := func(w int, stop <-chan struct{}) (sent int, err error) {
		src := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.9"), uint16(1000+w))
		bufs := make([][]byte, batch)
		for i := range bufs {
			bufs[i] = append(make([]byte, wgOffset), rawUDP(src, netip.MustParseAddrPort("10.0.0.2:53"), []byte{byte(w), byte(i)})...)
		}
		for range batches {
			select {
			case <-stop:
				return sent, nil
			default:
			}
			n, err := outer.Write(bufs, wgOffset)
			sent += n
			if err != nil {
				return sent, err
			}
		}
		return sent, nil
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			if n, err := write(w, nil); err != nil || n != batches*batch {
				t.Errorf("writer %d: %d written, %v", w, n, err)
			}
		})
	}
	wg.Wait()
	if g := got.Load(); g != writers*batches*batch {
		t.Fatalf("HandleUDP saw %d datagrams, want %d", g, writers*batches*batch)
	}

	// Now with Close in the middle.
	stop := make(chan struct{})
	var stopOnce sync.Once
	t.Cleanup(func() { // also on a failure below: no writer outlives the test
		stopOnce.Do(func() { close(stop) })
		s.Close()
		wg.Wait()
	})
	for w := range writers {
		wg.Go(func() {
			for {
				if _, err := write(w, stop); err != nil {
					if !errors.Is(err, os.ErrClosed) {
						t.Errorf("writer %d during close: %v", w, err)
					}
					return
				}
				select {
				case <-stop:
					return
				default:
				}
			}
		})
	}
	first := got.Load()
	for deadline := time.Now().Add(10 * time.Second); got.Load() < first+writers*batch; { // delivering again
		if time.Now().After(deadline) {
			t.Fatal("writers made no progress")
		}
		runtime.Gosched()
	}
	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	before := got.Load()
	stopOnce.Do(func() { close(stop) })
	wg.Wait()
	if _, err := outer.Write([][]byte{append(make([]byte, wgOffset), rawUDP(netip.MustParseAddrPort("192.0.2.9:1"), netip.MustParseAddrPort("10.0.0.2:53"), nil)...)}, wgOffset); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("write after close: %v", err)
	}
	if got.Load() != before {
		t.Fatal("a datagram was delivered after Close returned")
	}
}

// TestDirectLifecycle: over a Direct pair, as over a Pipe, nothing moves
// before Run. New starts none of our goroutines; a Write that arrives first
// is held (not dropped, HandleUDP not called) and delivered once Run starts,
// and the reader takes nothing queued before then; Close before Run fails
// the held Write with os.ErrClosed without delivering it; Run starts only
// the cookie sweep (wireguard-go's goroutines move the packets) and returns
// after it stopped.
func TestDirectLifecycle(t *testing.T) {
	a, b := netip.MustParseAddrPort("10.0.0.2:53"), netip.MustParseAddrPort("192.0.2.9:4000")
	newStack := func(t *testing.T, got chan<- string) (*Stack, tun.Device) {
		t.Helper()
		ss, outer := Direct(1500)
		s, err := New(ss, Config{Addresses: []netip.Prefix{serverPrefix4}}, funcHandler{udp: func(src, dst netip.AddrPort, p []byte) {
			got <- fmt.Sprintf("%s>%s %s", src, dst, p)
		}}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
		if err != nil {
			t.Fatal(err)
		}
		return s, outer
	}
	heldWrite := func(outer tun.Device) <-chan error {
		errc := make(chan error, 1)
		go func() {
			_, err := outer.Write([][]byte{append(make([]byte, wgOffset), rawUDP(b, a, []byte("early"))...)}, wgOffset)
			errc <- err
		}()
		return errc
	}

	t.Run("held until run", func(t *testing.T) {
		before := testutil.Goroutines()
		got := make(chan string, 4)
		s, outer := newStack(t, got)
		defer s.Close()
		if extra := testutil.Goroutines().Started(before); len(extra) > 0 {
			t.Fatalf("New started goroutines:\n%s", strings.Join(extra, "\n\n"))
		}
		if err := s.WriteUDP(a, b, []byte("queued")); err != nil {
			t.Fatal(err)
		}
		werr := heldWrite(outer)
		rerr := make(chan error, 1)
		var out []byte
		go func() {
			bufs, sizes := [][]byte{make([]byte, wgBufLen)}, make([]int, 1)
			n, err := outer.Read(bufs, sizes, wgOffset)
			if err == nil && n == 1 {
				out = header.UDP(header.IPv4(bufs[0][wgOffset : wgOffset+sizes[0]]).Payload()).Payload()
			}
			rerr <- err
		}()
		waitBlocked(t, "netstack.(*directOuter).Read(", "netstack.(*directOuter).Write(")
		select {
		case g := <-got:
			t.Fatalf("HandleUDP got %q before Run", g)
		default:
		}
		if st := s.Stats(); st.PacketsIn != 0 || st.PacketsOut != 0 {
			t.Fatalf("stats before Run %+v: want nothing in or out", st)
		}

		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		if g := <-got; g != "192.0.2.9:4000>10.0.0.2:53 early" {
			t.Fatalf("HandleUDP got %q", g)
		}
		if err := <-werr; err != nil {
			t.Fatalf("held write: %v", err)
		}
		if err := <-rerr; err != nil || string(out) != "queued" {
			t.Fatalf("read after Run: %q, %v; want the datagram queued before Run", out, err)
		}
		testutil.WaitGoroutines(t, before, 1) // the cookie sweep
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("Run: %v", err)
		}
		testutil.WaitGoroutines(t, before, 0)
	})

	t.Run("close before run", func(t *testing.T) {
		got := make(chan string, 4)
		s, outer := newStack(t, got)
		werr := heldWrite(outer)
		waitBlocked(t, "netstack.(*directOuter).Write(")
		if err := s.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
		if err := <-werr; !errors.Is(err, os.ErrClosed) {
			t.Fatalf("held write after Close: %v; want os.ErrClosed", err)
		}
		select {
		case g := <-got:
			t.Fatalf("HandleUDP got %q from a stack that never ran", g)
		default:
		}
		if err := s.Run(context.Background()); !errors.Is(err, ErrClosed) {
			t.Fatalf("Run after Close = %v; want ErrClosed", err)
		}
	})
}
