package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/testutil"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
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
			err := <-acceptErr
			if !errors.Is(err, ErrHandshakeTimeout) {
				t.Fatalf("Accept error = %v, want ErrHandshakeTimeout", err)
			}
			// How the forwarder, which does not import netstack, tells.
			var ht interface{ HandshakeTimeout() bool }
			if !errors.As(err, &ht) || !ht.HandshakeTimeout() {
				t.Fatalf("Accept error %v has no HandshakeTimeout method reporting true", err)
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
	src := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), 1000)
	}
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

// floodRig is a server Stack whose link carries both a real client Stack
// and raw packets the test writes (spoofed SYNs). Of what the server sends,
// only packets for the client's addresses reach the client: replies to
// spoofed sources vanish, as they would on the Internet (the client stack,
// promiscuous, would otherwise answer them with RSTs).
type floodRig struct {
	server, client *Stack
	raw            tun.Device // write spoofed packets here
}

func newFloodRig(t *testing.T, cfg Config, h Handler) *floodRig {
	t.Helper()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	srvSide, rawSide := Pipe(1500)
	cliSide, swSide := Pipe(1500)
	cfg.Addresses = []netip.Prefix{serverPrefix4, serverPrefix6}
	server, err := New(srvSide, cfg, h, log.Named("server"))
	if err != nil {
		t.Fatalf("new server stack: %v", err)
	}
	client, err := New(cliSide, Config{Addresses: []netip.Prefix{clientPrefix4, clientPrefix6}}, funcHandler{}, log.Named("client"))
	if err != nil {
		server.Close()
		t.Fatalf("new client stack: %v", err)
	}
	runStack(t, server)
	runStack(t, client)
	var wg sync.WaitGroup
	pump := func(from, to tun.Device, keep func([]byte) bool) {
		defer wg.Done()
		bufs, sizes := make([][]byte, pipeBatchSize), make([]int, pipeBatchSize)
		for i := range bufs {
			bufs[i] = make([]byte, 1600)
		}
		out := make([][]byte, 0, pipeBatchSize)
		for {
			n, err := from.Read(bufs, sizes, 0)
			if err != nil {
				return
			}
			out = out[:0]
			for i := range n {
				if p := bufs[i][:sizes[i]]; keep(p) {
					out = append(out, p)
				}
			}
			if _, err := to.Write(out, 0); err != nil && errors.Is(err, os.ErrClosed) {
				return
			}
		}
	}
	toClient := func(p []byte) bool {
		switch p[0] >> 4 {
		case 4:
			return len(p) >= 20 && netip.AddrFrom4([4]byte(p[16:20])) == clientPrefix4.Addr()
		case 6:
			return len(p) >= 40 && netip.AddrFrom16([16]byte(p[24:40])) == clientPrefix6.Addr()
		}
		return false
	}
	wg.Add(2)
	go pump(swSide, rawSide, func([]byte) bool { return true })
	go pump(rawSide, swSide, toClient)
	t.Cleanup(func() {
		server.Close()
		client.Close()
		wg.Wait()
	})
	return &floodRig{server: server, client: client, raw: rawSide}
}

// flood writes n SYNs to dst from random spoofed sources in 198.18.0.0/15,
// in batches of 16.
func (r *floodRig) flood(t *testing.T, rng *rand.Rand, dst netip.AddrPort, n int) {
	t.Helper()
	batch := make([][]byte, 0, 16)
	for i := 0; i < n; i++ {
		a := [4]byte{198, 18 + byte(rng.IntN(2)), byte(rng.IntN(256)), byte(1 + rng.IntN(254))}
		src := netip.AddrPortFrom(netip.AddrFrom4(a), uint16(1024+rng.IntN(60000)))
		batch = append(batch, rawTCP4(src, dst, rng.Uint32(), 0, header.TCPFlagSyn))
		if len(batch) == cap(batch) || i == n-1 {
			if _, err := r.raw.Write(batch, 0); err != nil {
				t.Fatalf("write flood: %v", err)
			}
			batch = batch[:0]
		}
	}
}

// engage floods dst until its port is in cookie mode: a first burst makes
// handshakes pending, the next SYN finds them.
func (r *floodRig) engage(t *testing.T, rng *rand.Rand, dst netip.AddrPort, threshold int) {
	t.Helper()
	before := r.server.Stats()
	switched := func() bool {
		st := r.server.Stats()
		return st.CookieModeEntries > before.CookieModeEntries || st.CookiePortsOverflow > before.CookiePortsOverflow
	}
	r.flood(t, rng, dst, threshold)
	// One more SYN at a time until one finds enough pending (a SYN of the
	// burst may already have); bounded.
	for i := 0; !switched(); i++ {
		if i == 100 {
			t.Fatalf("port %d not switched after %d SYNs; stats %+v", dst.Port(), threshold+i, r.server.Stats())
		}
		r.flood(t, rng, dst, 1)
		deadline := time.Now().Add(100 * time.Millisecond)
		for !switched() && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
}

// echoOnce dials dst from the real client, sends msg and expects it back.
func (r *floodRig) echoOnce(ctx context.Context, dst netip.AddrPort, msg string) error {
	c, err := r.client.DialTCP(ctx, netip.AddrPort{}, dst)
	if err != nil {
		return err
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	b := make([]byte, len(msg))
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	if string(b) != msg {
		return fmt.Errorf("echo %q, want %q", b, msg)
	}
	return nil
}

// heldTarget is a loopback echo target that counts the connections open on
// it and all it ever accepted.
type heldTarget struct {
	addr           string
	open, accepted atomic.Int64
}

func newHeldTarget(t *testing.T) *heldTarget {
	h := &heldTarget{}
	h.addr = testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) {
		h.accepted.Add(1)
		h.open.Add(1)
		defer h.open.Add(-1)
		echo(c)
	}).String()
	return h
}

// forward is a dial-first handler (the forwarder's shape) that records
// whether each request came in established, by destination port.
type forward struct {
	targets     map[uint16]string
	established sync.Map // netip.AddrPort (src) -> bool
}

func (f *forward) handle(r *TCPRequest) {
	f.established.Store(r.Src, r.Established())
	up, err := net.Dial("tcp", f.targets[r.Dst.Port()])
	if err != nil {
		r.Reject()
		return
	}
	c, err := r.Accept()
	if err != nil {
		up.Close()
		return
	}
	splice(c, up)
}

// TestSynFloodCookies: spoofed SYNs to port A switch A to SYN cookies, so
// they stop costing target connections and forwarder slots. While the flood
// runs, a real client of port B connects every time, and a real client of
// A still gets through (its handshake completed by a cookie) and exchanges
// bytes; once the handshake timeout has passed, A's target holds nothing.
func TestSynFloodCookies(t *testing.T) {
	const (
		floodN  = 600
		timeout = 500 * time.Millisecond
	)
	targetA, targetB := newHeldTarget(t), newHeldTarget(t)
	fw := &forward{targets: map[uint16]string{80: targetA.addr, 81: targetB.addr}}
	rig := newFloodRig(t, Config{TCP: TCPConfig{
		HandshakeTimeout:     timeout,
		MaxInFlight:          64, // the flood would fill it without cookies
		CookiePortThreshold:  8,
		CookieTotalThreshold: 1000,
	}}, funcHandler{tcp: fw.handle})
	portA, portB := netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("10.0.0.2:81")
	ctx := testContext(t)
	rng := rand.New(rand.NewPCG(1, 2))

	// Part of the flood first, until A is in cookie mode (a SYN must find
	// the earlier ones pending, so it may take a few bursts on a busy box).
	sent := 0
	for rig.server.Stats().CookiePortsActive == 0 {
		if sent >= floodN/2 {
			t.Fatalf("port A not in cookie mode after %d spoofed SYNs; stats %+v", sent, rig.server.Stats())
		}
		rig.flood(t, rng, portA, 25)
		sent += 25
		deadline := time.Now().Add(50 * time.Millisecond)
		for rig.server.Stats().CookiePortsActive == 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}

	// The rest of the flood, with real clients of B and A meanwhile.
	floodDone := make(chan struct{})
	go func() {
		defer close(floodDone)
		for i := sent; i < floodN; i += 50 {
			rig.flood(t, rng, portA, 50)
			time.Sleep(2 * time.Millisecond) // spread it over the clients' dials
		}
	}()
	for i := range 10 {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := rig.echoOnce(cctx, portB, fmt.Sprintf("to B %d", i))
		cancel()
		if err != nil {
			t.Fatalf("real client of port B, attempt %d, during the flood: %v", i, err)
		}
	}
	if err := rig.echoOnce(ctx, portA, "to A through a cookie"); err != nil {
		t.Fatalf("real client of port A during the flood: %v", err)
	}
	<-floodDone

	var viaCookie bool
	fw.established.Range(func(k, v any) bool {
		if k.(netip.AddrPort).Addr() == clientPrefix4.Addr() && v.(bool) {
			viaCookie = true
		}
		return true
	})
	if !viaCookie {
		t.Fatal("the real client of port A was not handed over established (no cookie handshake)")
	}
	waitUntil(t, "target A to hold no connection", func() bool { return targetA.open.Load() == 0 })
	st := rig.server.Stats()
	t.Logf("target A accepted %d connections for %d spoofed SYNs; stats %+v", targetA.accepted.Load(), floodN, st)
	if n := targetA.accepted.Load(); n > floodN/3 {
		t.Fatalf("target A accepted %d connections for %d spoofed SYNs: cookies did not take over", n, floodN)
	}
	if st.CookieModeEntries != 1 || st.SynCookiesSent == 0 || st.SynCookiesValid == 0 || st.CookieConns == 0 {
		t.Fatalf("cookie counters: entries %d, sent %d, valid %d, conns %d", st.CookieModeEntries, st.SynCookiesSent, st.SynCookiesValid, st.CookieConns)
	}
	waitUntil(t, "no pending handshake", func() bool { return rig.server.Stats().TCPHandshakesPending == 0 })
	if rig.server.Stats().TCPHandshakeTimeouts == 0 {
		t.Fatal("no handshake timed out: the flood never reached the dial-first path")
	}
}

// established4 reports whether the handler saw a request from src, and
// whether one came established.
func (f *forward) established4(t *testing.T, src netip.Addr) (est, seen bool) {
	t.Helper()
	f.established.Range(func(k, v any) bool {
		if k.(netip.AddrPort).Addr() == src {
			seen = true
			est = est || v.(bool)
		}
		return true
	})
	return est, seen
}

// newFloodedPort is a rig whose port 80 (a dial-first forward to an echo
// target) a flood has just switched to cookie mode, with cookieIdle and a
// short HandshakeTimeout.
func newFloodedPort(t *testing.T, rng *rand.Rand, cookieIdle time.Duration) (*floodRig, *forward, netip.AddrPort) {
	target := newHeldTarget(t)
	fw := &forward{targets: map[uint16]string{80: target.addr}}
	rig := newFloodRig(t, Config{TCP: TCPConfig{
		HandshakeTimeout:    300 * time.Millisecond,
		CookiePortThreshold: 2,
		CookieIdle:          cookieIdle,
	}}, funcHandler{tcp: fw.handle})
	port := netip.MustParseAddrPort("10.0.0.2:80")
	rig.engage(t, rng, port, 2)
	return rig, fw, port
}

// TestCookieModeLeavesWhenQuiet: a port leaves cookie mode once it saw no
// SYN for CookieIdle, and new clients take the dial-first path again.
func TestCookieModeLeavesWhenQuiet(t *testing.T) {
	rig, fw, port := newFloodedPort(t, rand.New(rand.NewPCG(3, 4)), 300*time.Millisecond)
	waitUntil(t, "cookie mode off", func() bool {
		st := rig.server.Stats()
		return st.CookiePortsActive == 0 && st.CookieModeExits == 1
	})
	if err := rig.echoOnce(testContext(t), port, "after the flood"); err != nil {
		t.Fatalf("client after cookie mode ended: %v", err)
	}
	if est, seen := fw.established4(t, clientPrefix4.Addr()); !seen || est {
		t.Fatalf("client request seen %v, established %v; want the dial-first path", seen, est)
	}
	if st := rig.server.Stats(); st.CookieModeEntries != 1 {
		t.Fatalf("CookieModeEntries = %d, want 1", st.CookieModeEntries)
	}
}

// TestCookiePortsCap: at most MaxCookiePorts ports are in cookie mode; SYNs
// of a further port under pressure take the normal path and are counted.
func TestCookiePortsCap(t *testing.T) {
	target := newHeldTarget(t)
	fw := &forward{targets: map[uint16]string{80: target.addr, 81: target.addr, 82: target.addr}}
	rig := newFloodRig(t, Config{TCP: TCPConfig{
		HandshakeTimeout:    2 * time.Second,
		CookiePortThreshold: 2,
		MaxCookiePorts:      2,
	}}, funcHandler{tcp: fw.handle})
	rng := rand.New(rand.NewPCG(5, 6))
	for _, port := range []uint16{80, 81} {
		rig.engage(t, rng, netip.AddrPortFrom(serverPrefix4.Addr(), port), 2)
	}
	third := netip.AddrPortFrom(serverPrefix4.Addr(), 82)
	rig.engage(t, rng, third, 2)
	if st := rig.server.Stats(); st.CookiePortsActive != 2 || st.CookieModeEntries != 2 {
		t.Fatalf("cookie ports active %d, entries %d; want 2 and 2", st.CookiePortsActive, st.CookieModeEntries)
	}
	// The third port still works, dial first.
	if err := rig.echoOnce(testContext(t), third, "over the cap"); err != nil {
		t.Fatalf("client of the port over the cap: %v", err)
	}
	if est, seen := fw.established4(t, clientPrefix4.Addr()); !seen || est {
		t.Fatalf("client request seen %v, established %v; want the dial-first path", seen, est)
	}
}

// TestCookieRejectResets: a request a cookie completed cannot be refused
// before the handshake; Reject resets it (an RST, not a FIN).
func TestCookieRejectResets(t *testing.T) {
	target := newHeldTarget(t)
	fw := &forward{targets: map[uint16]string{80: target.addr}}
	connected := make(chan struct{})
	rig := newFloodRig(t, Config{TCP: TCPConfig{
		HandshakeTimeout:    time.Second,
		CookiePortThreshold: 2,
	}}, funcHandler{tcp: func(r *TCPRequest) {
		if r.Established() {
			<-connected // the client's connect has returned: refuse only now
			r.Reject()
			return
		}
		fw.handle(r)
	}})
	port := netip.MustParseAddrPort("10.0.0.2:80")
	rig.engage(t, rand.New(rand.NewPCG(7, 8)), port, 2)
	var once sync.Once
	release := func() { once.Do(func() { close(connected) }) }
	t.Cleanup(release) // before the rig's: its Close waits for the handler
	c, err := rig.client.DialTCP(testContext(t), netip.AddrPort{}, port)
	if err != nil {
		t.Fatalf("dial in cookie mode = %v; want the handshake to complete", err)
	}
	defer c.Close()
	release()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read after Reject = %v; want a connection reset", err)
	}
	if st := rig.server.Stats(); st.TCPRejected != 1 || st.CookieConns != 1 {
		t.Fatalf("TCPRejected %d, CookieConns %d; want 1 and 1", st.TCPRejected, st.CookieConns)
	}
}

// TestCookieModeSparesPendingHandshake: a client whose dial-first handshake
// is still pending when its port switches to cookies retransmits its SYN;
// that SYN must not get a cookie (the cookie connection would race the
// pending one for the 4-tuple and the client would be reset).
func TestCookieModeSparesPendingHandshake(t *testing.T) {
	target := newHeldTarget(t)
	fw := &forward{targets: map[uint16]string{80: target.addr}}
	gate := make(chan struct{})
	var once sync.Once
	open := func() { once.Do(func() { close(gate) }) }
	rig := newFloodRig(t, Config{TCP: TCPConfig{
		HandshakeTimeout:    5 * time.Second,
		CookiePortThreshold: 2,
	}}, funcHandler{tcp: func(r *TCPRequest) {
		if r.Src.Addr() == clientPrefix4.Addr() {
			<-gate // a slow dial
		}
		fw.handle(r)
	}})
	t.Cleanup(open)
	port := netip.MustParseAddrPort("10.0.0.2:80")
	done := make(chan error, 1)
	go func() { done <- rig.echoOnce(testContext(t), port, "pending through the switch") }()
	waitUntil(t, "the client's handshake pending", func() bool { return rig.server.Stats().TCPHandshakesPending == 1 })
	rig.engage(t, rand.New(rand.NewPCG(11, 12)), port, 2)
	// The client retransmits its SYN after about a second.
	waitUntil(t, "the client's SYN retransmission held", func() bool { return rig.server.Stats().CookieSYNRetransHeld > 0 })
	open()
	if err := <-done; err != nil {
		t.Fatalf("client whose handshake was pending when cookies came on: %v", err)
	}
	if est, seen := fw.established4(t, clientPrefix4.Addr()); !seen || est {
		t.Fatalf("client request seen %v, established %v; want only the dial-first request", seen, est)
	}
}

// TestCookiePortKeepsPace: a busy port in cookie mode carries its clients'
// first data as fast as it did before. The client's first data often
// reaches the cookie listener before its handshake ACK has made the
// connection; gVisor moves such a segment to the new connection but leaves
// its size charged to the listener, whose queue then refused every later
// payload after ~1 MiB (each such client waited out a 200 ms
// retransmission). newCookieListener lifts that charge's limit.
func TestCookiePortKeepsPace(t *testing.T) {
	const request = 1400 // one full segment: the charge grows fastest
	total := 2000
	if testing.Short() {
		total = 1000
	}
	cfg := Config{TCP: TCPConfig{CookiePortThreshold: 1}} // every port in cookie mode at once
	client, server := newPairConfig(t, cfg, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b := make([]byte, request)
		if _, err := io.ReadFull(c, b); err == nil {
			c.Write(b[:1])
		}
	}})
	dst := netip.MustParseAddrPort("10.0.0.2:80")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req := make([]byte, request)
	res := testutil.Churn(ctx, total, 64, total, 20000, func(ctx context.Context, port uint16) error {
		c, err := client.DialTCP(ctx, netip.AddrPortFrom(clientPrefix4.Addr(), port), dst)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Write(req); err != nil {
			return err
		}
		_, err = io.ReadFull(c, make([]byte, 1))
		return err
	})
	if res.Failures != 0 {
		t.Fatalf("%d of %d connections failed; first: %v", res.Failures, total, res.FirstErr)
	}
	st := server.Stats()
	if st.CookieConns < uint64(total)/2 {
		t.Fatalf("cookies completed %d of %d connections; the test did not exercise cookie mode", st.CookieConns, total)
	}
	var dropped uint64
	server.cookies.mu.Lock()
	for _, l := range server.cookies.m {
		for _, ep := range l.eps {
			dropped += ep.Stats().(*tcp.Stats).ReceiveErrors.SegmentQueueDropped.Value()
		}
	}
	server.cookies.mu.Unlock()
	// The client's retransmission timeouts are the symptom (logged); the
	// listener's drops are the cause, and a loaded machine cannot make them.
	t.Logf("%d connections in %v; client retransmission timeouts %d", total, res.Elapsed, client.Stats().TCPTimeouts)
	if dropped != 0 {
		t.Fatalf("cookie listener dropped %d segments over %d connections; want 0", dropped, total)
	}
}

// TestBusyPortStaysOutOfCookieMode: a port whose clients complete their
// handshakes may keep more pending than the threshold (half a second of
// its completions), so a busy port on a slow target is not taken for a
// flooded one (cookie connections lose window scaling).
func TestBusyPortStaysOutOfCookieMode(t *testing.T) {
	const (
		threshold = 8
		dialTime  = 20 * time.Millisecond // the handler's "dial" before Accept
	)
	cfg := Config{TCP: TCPConfig{CookiePortThreshold: threshold, CookieTotalThreshold: 1000}}
	client, server := newPairConfig(t, cfg, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		time.Sleep(dialTime)
		closeFirstServer.tcp(r)
	}})
	dst := netip.MustParseAddrPort("10.0.0.2:80")
	port := uint16(20000)
	var portMu sync.Mutex
	churn := func(workers int, d time.Duration) testutil.ChurnResult {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		return testutil.Churn(ctx, 1<<20, workers, 1, 0, func(ctx context.Context, _ uint16) error {
			portMu.Lock()
			port++
			src := netip.AddrPortFrom(clientPrefix4.Addr(), port)
			portMu.Unlock()
			err := churnOnce(context.Background(), client, src, dst)
			if ctx.Err() != nil {
				return nil // the phase ended: the run is judged by its other connections
			}
			return err
		})
	}
	// A second of a few clients at a time (under the threshold) sets the
	// port's completion rate; then four times the threshold at once.
	if res := churn(threshold/2, 1200*time.Millisecond); res.Failures != 0 {
		t.Fatalf("warm-up: %d connections failed; first: %v", res.Failures, res.FirstErr)
	}
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			if n := server.Stats().TCPHandshakesPending; n > peak.Load() {
				peak.Store(n)
			}
		}
	}()
	res := churn(4*threshold, time.Second)
	close(stop)
	<-sampled
	if res.Failures != 0 {
		t.Fatalf("busy phase: %d connections failed; first: %v", res.Failures, res.FirstErr)
	}
	st := server.Stats()
	t.Logf("peak pending handshakes %d (threshold %d); cookie mode entries %d", peak.Load(), threshold, st.CookieModeEntries)
	if peak.Load() <= threshold {
		t.Fatalf("peak pending handshakes %d: the test never passed the threshold %d", peak.Load(), threshold)
	}
	if st.CookieModeEntries != 0 {
		t.Fatalf("a busy port whose clients all complete went to SYN cookies (%d entries)", st.CookieModeEntries)
	}
}

// TestCookieModeLeavesABusyPort: a port in cookie mode whose SYNs are
// answered again (the flood ended, its clients keep coming) leaves the mode
// after CookieIdle although SYNs never stop, and its clients take the
// dial-first path again.
func TestCookieModeLeavesABusyPort(t *testing.T) {
	rig, fw, port := newFloodedPort(t, rand.New(rand.NewPCG(11, 12)), 300*time.Millisecond)
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; rig.server.Stats().CookieModeExits == 0; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("still in cookie mode after %d answered connections; stats %+v", i, rig.server.Stats())
		}
		// A client every 10 ms: never CookieIdle without a SYN.
		if err := rig.echoOnce(testContext(t), port, fmt.Sprintf("client %d", i)); err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	fw.established.Clear()
	if err := rig.echoOnce(testContext(t), port, "after"); err != nil {
		t.Fatalf("client after cookie mode ended: %v", err)
	}
	if est, seen := fw.established4(t, clientPrefix4.Addr()); !seen || est {
		t.Fatalf("client request seen %v, established %v; want the dial-first path", seen, est)
	}
	if st := rig.server.Stats(); st.CookieModeEntries != 1 || st.CookiePortsActive != 0 {
		t.Fatalf("cookie mode entries %d, ports active %d; want 1 and 0", st.CookieModeEntries, st.CookiePortsActive)
	}
}

// TestCookieModeExitGrace: a port leaving cookie mode keeps its listener
// for cookieLeaveGrace and drops the port's new SYNs meanwhile (counted),
// instead of closing the listener under them: gVisor answers a SYN still
// queued on a closing listener with a RST, which refused a client about once
// in three runs of TestCookieModeLeavesABusyPort. The dropped client's
// retransmitted SYN takes the dial-first path once the listener is gone.
func TestCookieModeExitGrace(t *testing.T) {
	// The stack's own sweep never lets the port go (an hour's CookieIdle);
	// the test's call does, so the grace starts right before the client.
	rig, fw, port := newFloodedPort(t, rand.New(rand.NewPCG(13, 14)), time.Hour)
	waitUntil(t, "the flood's handshakes timed out", func() bool { return rig.server.Stats().TCPHandshakesPending == 0 })
	rig.server.sweepCookies(time.Now().Add(2*time.Hour), time.Hour) // no SYN for two hours
	if st := rig.server.Stats(); st.CookiePortsActive != 1 || st.CookieModeExits != 0 {
		t.Fatalf("right after the sweep: cookie ports active %d, exits %d; want 1 and 0 (the grace)", st.CookiePortsActive, st.CookieModeExits)
	}
	start := time.Now()
	if err := rig.echoOnce(testContext(t), port, "in the grace"); err != nil {
		t.Fatalf("client during the exit grace: %v", err)
	}
	took := time.Since(start)
	st := rig.server.Stats()
	if st.CookieExitSynsHeld == 0 || st.CookieModeExits != 1 || st.CookiePortsActive != 0 {
		t.Fatalf("SYNs held %d, exits %d, ports active %d; want >0, 1 and 0", st.CookieExitSynsHeld, st.CookieModeExits, st.CookiePortsActive)
	}
	if took < cookieLeaveGrace {
		t.Fatalf("client connected after %v, before the grace of %v ended", took, cookieLeaveGrace)
	}
	if est, seen := fw.established4(t, clientPrefix4.Addr()); !seen || est {
		t.Fatalf("client request seen %v, established %v; want the dial-first path", seen, est)
	}
}

func TestCompletionRate(t *testing.T) {
	var c completionRate
	const t0 = 1_000_000 // a unix second
	for range 5 {
		c.add(t0)
	}
	if got := c.perSecond(t0); got != 5 {
		t.Fatalf("same second: %d, want 5", got)
	}
	c.add(t0 + 1)
	if got := c.perSecond(t0 + 1); got != 5 {
		t.Fatalf("next second, 1 so far: %d, want the last whole second's 5", got)
	}
	if got := c.perSecond(t0 + 2); got != 1 {
		t.Fatalf("two seconds on: %d, want 1", got)
	}
	if got := c.perSecond(t0 + 3); got != 0 {
		t.Fatalf("three seconds on: %d, want 0", got)
	}
	c.add(t0 + 10) // a gap: the old counts are gone
	if got := c.perSecond(t0 + 10); got != 1 {
		t.Fatalf("after a gap: %d, want 1", got)
	}
	if got := pendingLimit(64, &c, t0+10); got != 64 {
		t.Fatalf("pendingLimit at 1/s = %d, want the threshold 64", got)
	}
	for range 5000 {
		c.add(t0 + 10)
	}
	if got := pendingLimit(256, &c, t0+10); got != 2500 {
		t.Fatalf("pendingLimit(256) at 5001/s = %d, want 2500 (half a second)", got)
	}
	if got := pendingLimit(8, &c, t0+10); got != 8*busyFactor {
		t.Fatalf("pendingLimit(8) at 5001/s = %d, want the cap %d", got, 8*busyFactor)
	}
}

// TestCookieExitDropsSYNsUntilClosed: a port leaving cookie mode drops its
// SYNs until its listener's endpoints are closed, not only until the close
// begins. A SYN in between reached the still-bound listener and got a
// cookie; its ACK, after the close, got a reset. The close is taken in its
// two steps, the SYN sent between them; after the second, a SYN takes the
// dial-first path and its handshake completes.
func TestCookieExitDropsSYNsUntilClosed(t *testing.T) {
	srvSide, raw := Pipe(1500)
	s, err := New(srvSide, Config{Addresses: []netip.Prefix{serverPrefix4}, TCP: TCPConfig{CookiePortThreshold: 1000}},
		funcHandler{tcp: echoTCP}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	runStack(t, s)
	s.enterCookieMode(80)
	s.cookies.mu.Lock()
	l := s.cookies.m[80]
	s.cookies.mu.Unlock()
	if l == nil {
		t.Fatal("port 80 is not in cookie mode")
	}
	l.leaving.Store(true) // as the sweep marks it before the grace
	if !s.stopCookieListener(l) {
		t.Fatal("stopCookieListener refused")
	}
	cli, dst := netip.MustParseAddrPort("198.18.0.5:40000"), netip.MustParseAddrPort("10.0.0.2:80")
	if _, err := raw.Write([][]byte{rawTCP4(cli, dst, 1000, 0, header.TCPFlagSyn)}, 0); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the SYN to be dropped", func() bool { return s.Stats().CookieExitSynsHeld == 1 })
	<-l.stopped
	s.forgetCookieListener(l)
	if st := s.Stats(); st.SynCookiesSent != 0 || st.CookiePortsActive != 0 {
		t.Fatalf("cookies sent %d, cookie ports %d; want 0 and 0", st.SynCookiesSent, st.CookiePortsActive)
	}
	// The client's retransmission: now the forwarder's, answered.
	if _, err := raw.Write([][]byte{rawTCP4(cli, dst, 1000, 0, header.TCPFlagSyn)}, 0); err != nil {
		t.Fatal(err)
	}
	got := make(chan header.TCP, 1)
	go func() {
		bufs, sizes := [][]byte{make([]byte, 1600)}, []int{0}
		if n, err := raw.Read(bufs, sizes, 0); err == nil && n == 1 {
			p := bufs[0][:sizes[0]]
			got <- header.TCP(p[header.IPv4(p).HeaderLength():])
		}
	}()
	select {
	case synack := <-got:
		if synack.Flags() != header.TCPFlagSyn|header.TCPFlagAck {
			t.Fatalf("retransmitted SYN answered with %v, want SYN-ACK", synack.Flags())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the retransmitted SYN got no answer")
	}
}
