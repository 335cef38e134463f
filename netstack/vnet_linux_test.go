//go:build linux

package netstack

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// These tests drive natbox's own kernel TUN (vnetTUN) from kernel sockets in
// a network namespace they create and remove; they need root (kernelTUN).

var tunAddrs = []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24"), netip.MustParsePrefix("fd99::2/64")}

// sendRandom writes size random bytes (a multiple of 128 KiB) to c, closes
// its write side and returns their hash.
func sendRandom(t *testing.T, c net.Conn, size int, seed byte) []byte {
	t.Helper()
	h := sha256.New()
	rng := rand.NewChaCha8([32]byte{seed})
	buf := make([]byte, 128<<10)
	for left := size; left > 0; left -= len(buf) {
		rng.Read(buf)
		h.Write(buf)
		if _, err := c.Write(buf); err != nil {
			t.Errorf("write: %v", err)
			return nil
		}
	}
	if err := c.(closeWriter).CloseWrite(); err != nil {
		t.Errorf("close write: %v", err)
	}
	return h.Sum(nil)
}

// TestKernelTUNTSOFramesIn: a kernel socket's bulk send reaches the Stack as
// TSO frames, each read and injected as one packet larger than the MTU (not
// split into MTU packets that GRO merges again), and the stream arrives
// intact, over IPv4 and IPv6.
func TestKernelTUNTSOFramesIn(t *testing.T) {
	ns, dev := kernelTUNQueues(t, 1)
	if dev == nil {
		return
	}
	s, sums := runHashingStack(t, dev)
	for _, target := range []string{"10.99.0.2:9", "[fd99::2]:9"} {
		t.Run(target, func(t *testing.T) {
			var c net.Conn
			if err := inNetns(ns, func() (err error) {
				c, err = net.DialTimeout("tcp", target, 10*time.Second)
				return err
			}); err != nil {
				t.Fatalf("kernel dial: %v", err)
			}
			defer c.Close()
			st0 := s.Stats()
			sent := sendRandom(t, c, 4<<20, 1)
			select {
			case got := <-sums:
				if !bytes.Equal(got, sent) {
					t.Fatal("the Stack received a different stream")
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the Stack did not receive the stream")
			}
			st := s.Stats()
			frames, pkts, bytesIn := st.GSOFramesIn-st0.GSOFramesIn, st.PacketsIn-st0.PacketsIn, st.BytesIn-st0.BytesIn
			t.Logf("%d bytes in %d packets, %d of them TSO frames", bytesIn, pkts, frames)
			if frames == 0 || bytesIn < 4*1500*pkts {
				t.Errorf("%d bytes in %d packets (%d TSO frames): kernel frames were not taken whole", bytesIn, pkts, frames)
			}
		})
	}
	if st := s.Stats(); st.Invalid != (InvalidStats{}) || st.ReadErrors != 0 {
		t.Errorf("frames dropped: %+v", st)
	}
}

// TestKernelTUNMultiQueue: with four queues the kernel spreads flows over
// them, every queue's pump delivers, and TCP streams and UDP datagrams cross
// intact both ways.
func TestKernelTUNMultiQueue(t *testing.T) {
	const queues = 4
	ns, dev := kernelTUNQueues(t, queues)
	if dev == nil {
		return
	}
	// The handler sees the Stack through an atomic: the race detector cannot
	// see that no datagram arrives before New returns.
	var sp atomic.Pointer[Stack]
	s, err := New(dev, Config{MTU: 1500, Addresses: tunAddrs}, funcHandler{tcp: echoTCP, udp: func(src, dst netip.AddrPort, p []byte) {
		sp.Load().WriteUDP(dst, src, p)
	}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("new stack: %v", err)
	}
	sp.Store(s)
	defer s.Close()
	runStack(t, s)
	if len(s.queues) != queues {
		t.Fatalf("stack reads %d queues, want %d", len(s.queues), queues)
	}

	// UDP from many sockets: the kernel hashes each socket's flow to a
	// queue, so 64 of them reach all four (a miss has odds ~4*(3/4)^64).
	const socks = 64
	var wg sync.WaitGroup
	for i := range socks {
		wg.Go(func() {
			var c net.Conn
			if err := inNetns(ns, func() (err error) {
				c, err = net.Dial("udp", "10.99.0.2:53")
				return err
			}); err != nil {
				t.Errorf("udp socket: %v", err)
				return
			}
			defer c.Close()
			msg := fmt.Appendf(nil, "datagram %d", i)
			buf := make([]byte, 100)
			for try := 0; try < 5; try++ { // UDP: a datagram may be lost
				c.Write(msg)
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				n, err := c.Read(buf)
				if err == nil && bytes.Equal(buf[:n], msg) {
					return
				}
			}
			t.Errorf("socket %d: no echo", i)
		})
	}
	// TCP streams meanwhile, each echoed intact.
	for i := range 8 {
		wg.Go(func() {
			target := "10.99.0.2:7"
			if i%2 == 1 {
				target = "[fd99::2]:7"
			}
			var c net.Conn
			if err := inNetns(ns, func() (err error) {
				c, err = net.DialTimeout("tcp", target, 10*time.Second)
				return err
			}); err != nil {
				t.Errorf("kernel dial: %v", err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			done := make(chan []byte, 1)
			go func() {
				h := sha256.New()
				io.Copy(h, c)
				done <- h.Sum(nil)
			}()
			sent := sendRandom(t, c, 1<<20, byte(i))
			if got := <-done; !bytes.Equal(got, sent) {
				t.Errorf("stream %d to %s: echo differs", i, target)
			}
		})
	}
	wg.Wait()
	for i := range s.queueFrames {
		n := s.queueFrames[i].Load()
		t.Logf("queue %d: %d frames", i, n)
		if n == 0 {
			t.Errorf("queue %d delivered nothing", i)
		}
	}
	if st := s.Stats(); st.Invalid != (InvalidStats{}) || st.ReadErrors != 0 || st.WriteErrors != 0 {
		t.Errorf("frames dropped or failed: %+v", st)
	}
}

// TestKernelTUNBadChecksumDropped: a segment the kernel does not vouch for
// (a raw socket's: no DATA_VALID, no NEEDS_CSUM) is verified; with a bad
// checksum it is dropped and counted and starts no connection, while the
// same SYN with a good checksum does.
func TestKernelTUNBadChecksumDropped(t *testing.T) {
	ns, dev := kernelTUNQueues(t, 1)
	if dev == nil {
		return
	}
	requests := make(chan uint16, 4)
	s, err := New(dev, Config{MTU: 1500, Addresses: tunAddrs}, funcHandler{tcp: func(r *TCPRequest) {
		requests <- r.Src.Port()
		r.Reject()
	}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("new stack: %v", err)
	}
	defer s.Close()
	runStack(t, s)
	var fd int
	if err := inNetns(ns, func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
		return err
	}); err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	defer unix.Close(fd)
	dst := netip.MustParseAddrPort("10.99.0.2:80")
	send := func(srcPort uint16, corrupt bool) {
		t.Helper()
		p := rawTCP4(netip.AddrPortFrom(netip.MustParseAddr("10.99.0.1"), srcPort), dst, 1000, 0, header.TCPFlagSyn)
		if corrupt {
			p[header.IPv4MinimumSize+16] ^= 0x5a // the TCP checksum
		}
		if err := unix.Sendto(fd, p, 0, &unix.SockaddrInet4{Addr: dst.Addr().As4()}); err != nil {
			t.Fatalf("send: %v", err)
		}
	}
	send(40001, true)
	deadline := time.Now().Add(10 * time.Second)
	for s.Stats().Invalid.TCPChecksum == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the corrupt SYN was not counted: %+v", s.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Same queue, in order: the good SYN's request is the first one.
	send(40002, false)
	select {
	case port := <-requests:
		if port != 40002 {
			t.Fatalf("request from port %d; the corrupt SYN (40001) started a connection", port)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the good SYN started no connection")
	}
	if n := s.Stats().Invalid.TCPChecksum; n != 1 {
		t.Errorf("Invalid.TCPChecksum = %d, want 1", n)
	}
	// Dropped as read, not later by gVisor's SYN check (synChecksumValid).
	if n := s.stats.invalid[dropTCPChecksum].Load(); n != 1 {
		t.Errorf("%d segments dropped at read for their checksum, want 1", n)
	}
}

// TestKernelTUNUSOFramesIn: a kernel UDP socket sending with UDP_SEGMENT
// hands the TUN one USO frame (where the kernel has TUN USO, 6.2+); the
// Stack gives the Handler each datagram, in order and intact.
func TestKernelTUNUSOFramesIn(t *testing.T) {
	ns, dev := kernelTUNQueues(t, 1)
	if dev == nil {
		return
	}
	uso := dev.(*vnetTUN).uso
	got := make(chan []byte, 64)
	s, err := New(dev, Config{MTU: 1500, Addresses: tunAddrs}, funcHandler{udp: func(src, dst netip.AddrPort, p []byte) {
		got <- append([]byte(nil), p...)
	}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("new stack: %v", err)
	}
	defer s.Close()
	runStack(t, s)
	for _, target := range []string{"10.99.0.2:5000", "[fd99::2]:5000"} {
		t.Run(target, func(t *testing.T) {
			var c *net.UDPConn
			if err := inNetns(ns, func() error {
				nc, err := net.Dial("udp", target)
				if err != nil {
					return err
				}
				c = nc.(*net.UDPConn)
				return nil
			}); err != nil {
				t.Fatalf("udp socket: %v", err)
			}
			defer c.Close()
			const seg, n = 100, 10
			rc, err := c.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			var serr error
			rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_SEGMENT, seg) })
			if serr != nil {
				t.Skipf("UDP_SEGMENT: %v", serr)
			}
			msg := make([]byte, seg*n)
			for i := range msg {
				msg[i] = byte(i / seg)
			}
			frames0 := s.Stats().GSOFramesIn
			if _, err := c.Write(msg); err != nil {
				t.Fatalf("write: %v", err)
			}
			for i := range n {
				select {
				case p := <-got:
					if !bytes.Equal(p, msg[i*seg:(i+1)*seg]) {
						t.Fatalf("datagram %d: %d bytes starting %v, want %d bytes of %d", i, len(p), p[:min(len(p), 4)], seg, i)
					}
				case <-time.After(10 * time.Second):
					t.Fatalf("%d of %d datagrams arrived", i, n)
				}
			}
			frames := s.Stats().GSOFramesIn - frames0
			t.Logf("TUN USO %v: %d USO frames", uso, frames)
			if uso && frames != 1 {
				t.Errorf("%d USO frames read, want 1", frames)
			}
		})
	}
	if st := s.Stats(); st.Invalid != (InvalidStats{}) {
		t.Errorf("frames dropped: %+v", st)
	}
}

// TestKernelTUNSynFloodCookies: spoofed SYNs from many sources (a raw
// socket, checksums verified at read) spread over a four-queue TUN's pumps
// switch the port to SYN cookies, and a real kernel client of that port
// still connects (its handshake completed by a cookie) and exchanges bytes.
func TestKernelTUNSynFloodCookies(t *testing.T) {
	ns, dev := kernelTUNQueues(t, 4)
	if dev == nil {
		return
	}
	release := make(chan struct{})
	s, err := New(dev, Config{MTU: 1500, Addresses: tunAddrs, TCP: TCPConfig{
		HandshakeTimeout:     500 * time.Millisecond,
		CookiePortThreshold:  8,
		CookieTotalThreshold: 1000,
	}}, funcHandler{tcp: func(r *TCPRequest) {
		if !r.Established() {
			// Dial-first: a target that never answers, so the spoofed
			// handshakes stay pending.
			select {
			case <-release:
			case <-r.Abandoned():
			}
			r.Reject()
			return
		}
		echoTCP(r)
	}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("new stack: %v", err)
	}
	defer s.Close()
	runStack(t, s)
	defer close(release)
	var fd int
	if err := inNetns(ns, func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
		return err
	}); err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	defer unix.Close(fd)
	dst := netip.MustParseAddrPort("10.99.0.2:80")
	rng := rand.New(rand.NewPCG(3, 4))
	for sent := 0; s.Stats().CookiePortsActive == 0; sent++ {
		if sent >= 2000 {
			t.Fatalf("port not in cookie mode after %d spoofed SYNs: %+v", sent, s.Stats())
		}
		// Spoofed sources off-link (10.98.x.y): their SYN-ACKs die in the
		// namespace, which does not forward.
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 98, byte(rng.IntN(256)), byte(1 + rng.IntN(254))}), uint16(1024+rng.IntN(60000)))
		p := rawTCP4(src, dst, rng.Uint32(), 0, header.TCPFlagSyn)
		if err := unix.Sendto(fd, p, 0, &unix.SockaddrInet4{Addr: dst.Addr().As4()}); err != nil {
			t.Fatalf("send: %v", err)
		}
		if sent%50 == 49 {
			deadline := time.Now().Add(50 * time.Millisecond)
			for s.Stats().CookiePortsActive == 0 && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
		}
	}
	var c net.Conn
	if err := inNetns(ns, func() (err error) {
		c, err = net.DialTimeout("tcp", dst.String(), 10*time.Second)
		return err
	}); err != nil {
		t.Fatalf("real client during the flood: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := []byte("through a cookie")
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo %q, %v; want %q", got, err, msg)
	}
	st := s.Stats()
	if st.CookieModeEntries != 1 || st.SynCookiesSent == 0 || st.CookieConns == 0 {
		t.Fatalf("cookie counters: entries %d, sent %d, conns %d", st.CookieModeEntries, st.SynCookiesSent, st.CookieConns)
	}
	busy := 0
	for i := range s.queueFrames {
		if s.queueFrames[i].Load() > 0 {
			busy++
		}
	}
	if busy < 2 {
		t.Errorf("the flood reached %d of 4 queues", busy)
	}
}

// TestKernelTUNWithoutTSO: with the TUN's TSO offload switched off (only
// checksum offload left), the kernel hands over MTU segments; the pump
// batches them (groWorthWaiting) so gVisor's GRO merges them, and the
// stream arrives intact.
func TestKernelTUNWithoutTSO(t *testing.T) {
	ns, dev := kernelTUNQueues(t, 1)
	if dev == nil {
		return
	}
	rc, err := dev.(*vnetTUN).queues[0].f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var oerr error
	if err := rc.Control(func(fd uintptr) { oerr = unix.IoctlSetInt(int(fd), unix.TUNSETOFFLOAD, tunFCsum) }); err != nil || oerr != nil {
		t.Fatalf("TUNSETOFFLOAD: %v %v", err, oerr)
	}
	s, sums := runHashingStack(t, dev)
	var c net.Conn
	if err := inNetns(ns, func() (err error) {
		c, err = net.DialTimeout("tcp", "10.99.0.2:9", 10*time.Second)
		return err
	}); err != nil {
		t.Fatalf("kernel dial: %v", err)
	}
	defer c.Close()
	sent := sendRandom(t, c, 8<<20, 5)
	select {
	case got := <-sums:
		if !bytes.Equal(got, sent) {
			t.Fatal("the Stack received a different stream")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the Stack did not receive the stream")
	}
	st := s.Stats()
	t.Logf("%d packets in, %d TSO frames, %d merged by GRO", st.PacketsIn, st.GSOFramesIn, st.GROCoalesced)
	if st.GSOFramesIn != 0 {
		t.Errorf("%d TSO frames read with TSO off", st.GSOFramesIn)
	}
	if st.GROCoalesced == 0 {
		t.Error("GRO merged nothing: MTU segments were not batched")
	}
}

// runHashingStack runs a Stack on dev whose handler accepts each TCP
// connection and sends the SHA-256 of all it read (nil if the accept
// failed); the Stack closes when the test ends.
func runHashingStack(t *testing.T, dev tun.Device) (*Stack, <-chan []byte) {
	t.Helper()
	sums := make(chan []byte, 1)
	s, err := New(dev, Config{MTU: 1500, Addresses: tunAddrs}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			sums <- nil
			return
		}
		defer c.Close()
		h := sha256.New()
		io.Copy(h, c)
		sums <- h.Sum(nil)
	}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("new stack: %v", err)
	}
	runStack(t, s)
	return s, sums
}

// tcpFrame is a vnet frame (zero virtio-net header) of a bare IPv4 TCP
// header from src to dst, in one buffer (whole) or as header and packet.
func tcpFrame(src, dst netip.AddrPort, whole bool) [][]byte {
	pkt := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize)
	ip := header.IPv4(pkt)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(pkt)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
		SrcAddr: tcpip.AddrFrom4(src.Addr().As4()), DstAddr: tcpip.AddrFrom4(dst.Addr().As4()),
	})
	header.TCP(pkt[header.IPv4MinimumSize:]).Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), DataOffset: header.TCPMinimumSize})
	if whole {
		return [][]byte{append(make([]byte, vnetHdrLen), pkt...)}
	}
	return [][]byte{make([]byte, vnetHdrLen), pkt}
}

func TestFlowQueue(t *testing.T) {
	a := netip.MustParseAddrPort("10.99.0.1:40000")
	b := netip.MustParseAddrPort("10.99.0.2:5201")
	seen := map[int]bool{}
	for p := range uint16(64) {
		src := netip.AddrPortFrom(a.Addr(), a.Port()+p)
		q := flowQueue(tcpFrame(src, b, true), 4)
		if q < 0 || q >= 4 {
			t.Fatalf("queue %d of 4", q)
		}
		if back := flowQueue(tcpFrame(b, src, true), 4); back != q {
			t.Fatalf("%v -> %v on queue %d, the reverse on %d", src, b, q, back)
		}
		if split := flowQueue(tcpFrame(src, b, false), 4); split != q {
			t.Fatalf("header apart (a TSO frame): queue %d, want %d", split, q)
		}
		seen[q] = true
	}
	if len(seen) != 4 {
		t.Fatalf("64 flows used queues %v, want all 4", seen)
	}
	for _, junk := range [][][]byte{nil, {{1, 2}}, {make([]byte, vnetHdrLen), {0x45, 0}}, {make([]byte, vnetHdrLen+60)}} {
		if q := flowQueue(junk, 4); q != 0 {
			t.Fatalf("unparseable frame %v: queue %d, want 0", junk, q)
		}
	}
}

// TestKernelTUNFlowsSpreadOverQueues: four kernel flows into a two-queue
// TUN, two of them on each queue by flowQueue. The kernel steers a flow's
// packets to the queue natbox writes it on, so each input pump reads
// about half of the frames (all of them went to one pump when every write
// used the first queue).
func TestKernelTUNFlowsSpreadOverQueues(t *testing.T) {
	ns, dev := kernelTUNQueues(t, 2)
	if dev == nil {
		return
	}
	var received atomic.Int64
	s, err := New(dev, Config{MTU: 1500, Addresses: tunAddrs}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		received.Add(n)
	}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	runStack(t, s)
	dst := netip.MustParseAddrPort("10.99.0.2:5201")
	var ports []uint16
	perQueue := [2]int{}
	for p := uint16(41000); len(ports) < 4; p++ {
		q := flowQueue(tcpFrame(netip.AddrPortFrom(netip.MustParseAddr("10.99.0.1"), p), dst, true), 2)
		if perQueue[q] < 2 {
			perQueue[q]++
			ports = append(ports, p)
		}
	}
	const perFlow = 4 << 20
	var wg sync.WaitGroup
	errs := make(chan error, len(ports))
	for _, p := range ports {
		var c net.Conn
		if err := inNetns(ns, func() (err error) {
			d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(10, 99, 0, 1), Port: int(p)}}
			c, err = d.Dial("tcp", dst.String())
			return err
		}); err != nil {
			t.Fatalf("kernel dial from port %d: %v", p, err)
		}
		wg.Go(func() {
			defer c.Close()
			if _, err := c.Write(make([]byte, perFlow)); err != nil {
				errs <- err
			}
			c.(*net.TCPConn).CloseWrite()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("write: %v", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for received.Load() < perFlow*int64(len(ports)) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := received.Load(); got != perFlow*int64(len(ports)) {
		t.Fatalf("received %d of %d bytes", got, perFlow*len(ports))
	}
	f0, f1 := s.queueFrames[0].Load(), s.queueFrames[1].Load()
	if share := float64(max(f0, f1)) / float64(f0+f1); share > 0.75 {
		t.Fatalf("frames read per queue %d, %d: the busiest has %.0f %%, want at most 75 %%", f0, f1, share*100)
	}
}
