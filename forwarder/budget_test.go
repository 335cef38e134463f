package forwarder

import (
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

func TestSourceKey(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{"203.0.113.7", "203.0.113.7"},
		{"::ffff:203.0.113.7", "203.0.113.7"},
		{"2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::"},
		{"2001:db8:1:2::1", "2001:db8:1:2::"},
		{"2001:db8:1:3::1", "2001:db8:1:3::"},
		{"fe80::1%eth0", "fe80::"},
	}
	for _, tt := range tests {
		if got := sourceKey(netip.MustParseAddr(tt.in)); got != netip.MustParseAddr(tt.want) {
			t.Errorf("sourceKey(%s) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

// udpSink is a loopback UDP target that reads and never answers, as the
// target of a spoofed flood behaves from natbox's side: no session of it is
// ever assured. It returns its port and a count of datagrams received.
func udpSink(t testing.TB) (uint16, func() int) {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu sync.Mutex
		n  int
		wg sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 2048)
		for {
			if _, _, err := c.ReadFromUDPAddrPort(buf); err != nil {
				return
			}
			mu.Lock()
			n++
			mu.Unlock()
		}
	}()
	t.Cleanup(func() { c.Close(); wg.Wait() })
	return uint16(c.LocalAddr().(*net.UDPAddr).Port), func() int { mu.Lock(); defer mu.Unlock(); return n }
}

// floodSource is the i-th spoofed source of a flood (198.18.0.0/15, the
// benchmarking range; no packet is ever sent to it).
func floodSource(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), uint16(1024+i%50000))
}

// TestUDPFloodKeepsTCPAndRealClients: a flood of spoofed sources fills the
// UDP pool; each new flood session evicts the oldest one that never had a
// reply, so the real client whose target answers keeps its session, TCP to
// another mapping is never refused, and every eviction is counted.
func TestUDPFloodKeepsTCPAndRealClients(t *testing.T) {
	t.Parallel()
	sink, _ := udpSink(t)
	echo := udpEcho(t)
	web := tcpEcho(t)
	cfg := config(
		mapping("flood", conf.UDP, "6000", "127.0.0.1:"+itoa(sink)),
		mapping("game", conf.UDP, "6001", "127.0.0.1:"+itoa(echo)),
		mapping("web", conf.TCP, "80", "127.0.0.1:"+itoa(web)),
	)
	cfg.Limits.MaxSessions = 40
	cfg.Limits.MaxUDPSessions = 8
	e := newEngine(t, cfg, Options{NoUDPProbation: true})
	tun := newIngress(conf.IngressTUN)
	client := netip.MustParseAddrPort("203.0.113.5:4000")
	game := netip.MustParseAddrPort("198.51.100.1:6001")

	converse(t, e, tun, client, game)
	sessionOf := func() uint64 {
		for _, s := range e.Sessions() {
			if s.Client == client {
				return s.ID
			}
		}
		return 0
	}
	id := sessionOf()
	if id == 0 {
		t.Fatal("the real client has no session")
	}

	const flood = 3000
	for i := range flood {
		e.HandleUDP(tun, floodSource(i), netip.MustParseAddrPort("198.51.100.1:6000"), []byte("spoof"))
	}
	ms := mappingStatus(t, e, "flood")
	// The pool holds 8: the real client and 7 flood sessions; every other
	// flood session was evicted by a later one, and none was refused.
	if want := uint64(flood - 7); ms.UDPEvicted != want {
		t.Errorf("udp_evicted %d, want %d", ms.UDPEvicted, want)
	}
	if n := ms.Refusals["over_limit_udp_sessions"]; n != 0 {
		t.Errorf("over_limit_udp_sessions %d, want 0 (an unassured session was always there to evict)", n)
	}
	if st := e.Snapshot(); st.UDPSessions != 8 {
		t.Errorf("UDP pool holds %d slots, want 8", st.UDPSessions)
	}

	// The real client kept its session and is still served.
	e.HandleUDP(tun, client, game, []byte("again"))
	if r := tun.next(t); r.dst != client {
		t.Fatalf("reply to %v after the flood, want %v", r.dst, client)
	}
	if got := sessionOf(); got != id {
		t.Fatalf("real client's session %d, want %d kept through the flood", got, id)
	}
	if n := mappingStatus(t, e, "game").UDPEvicted; n != 0 {
		t.Fatalf("game evicted %d sessions, want 0", n)
	}

	// TCP to another mapping: every connection is admitted and carries data.
	var open []*flow
	for i := range 20 {
		f := startTCP(t, e, tun, "203.0.113."+itoa(uint16(10+i))+":5000", "198.51.100.1:80")
		if got := f.wait(t); got != "accepted" {
			t.Fatalf("TCP connection %d %s during a UDP flood", i, got)
		}
		open = append(open, f)
	}
	for i, f := range open {
		msg := []byte("tcp " + itoa(uint16(i)))
		if _, err := f.client.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		f.client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(f.client, got); err != nil || string(got) != string(msg) {
			t.Fatalf("connection %d echoed %q, %v", i, got, err)
		}
	}
	if web := mappingStatus(t, e, "web"); web.SessionsOpened != 20 || sumRefusals(web) != 0 {
		t.Fatalf("web opened %d, refusals %v", web.SessionsOpened, web.Refusals)
	}
	for _, f := range open {
		f.client.Close()
		<-f.done
	}
}

func sumRefusals(ms MappingStatus) uint64 {
	var n uint64
	for _, v := range ms.Refusals {
		n += v
	}
	return n
}

// converse makes src's session assured the way a real client does: it sends,
// reads the target's reply, and sends again (a spoofed source, which never
// sees the reply, cannot).
func converse(t *testing.T, e *Engine, tun *fakeIngress, src, dst netip.AddrPort) {
	t.Helper()
	for _, msg := range []string{"hello", "again"} {
		e.HandleUDP(tun, src, dst, []byte(msg))
		if r := tun.next(t); r.dst != src {
			t.Fatalf("reply to %v, want %v", r.dst, src)
		}
	}
}

// echoPoolOfTwo is an engine whose UDP pool holds two sessions, with one
// mapping ("game", port 6001, probation off) to an echo that answers every
// datagram; dst is the mapping's public address.
func echoPoolOfTwo(t *testing.T) (*Engine, *fakeIngress, netip.AddrPort) {
	t.Helper()
	echo := udpEcho(t)
	cfg := config(mapping("game", conf.UDP, "6001", "127.0.0.1:"+itoa(echo)))
	cfg.Limits.MaxUDPSessions = 2
	e := newEngine(t, cfg, Options{NoUDPProbation: true})
	return e, newIngress(conf.IngressTUN), netip.MustParseAddrPort("198.51.100.1:6001")
}

// spoofAnswered sends one datagram from each of n flood sources and waits
// for the echo's answer to each.
func spoofAnswered(t *testing.T, e *Engine, tun *fakeIngress, dst netip.AddrPort, n int) {
	t.Helper()
	for i := range n {
		e.HandleUDP(tun, floodSource(i), dst, []byte("spoof"))
		if r := tun.next(t); r.dst != floodSource(i) {
			t.Fatalf("reply to %v, want %v", r.dst, floodSource(i))
		}
	}
}

// TestUDPReplyAloneDoesNotAssure: a flood against a target that answers
// every datagram (an echo, a DNS server) still evicts itself: the spoofed
// sources have their replies but never speak again, so they stay
// unassured, while the client that did converse keeps its session.
func TestUDPReplyAloneDoesNotAssure(t *testing.T) {
	t.Parallel()
	e, tun, dst := echoPoolOfTwo(t)
	real := netip.MustParseAddrPort("203.0.113.1:1000")
	converse(t, e, tun, real, dst)
	spoofAnswered(t, e, tun, dst, 3)
	ms := mappingStatus(t, e, "game")
	if ms.UDPEvicted != 2 || ms.Refusals["over_limit_udp_sessions"] != 0 {
		t.Fatalf("evicted %d, refusals %v; want 2 evicted (answered but unassured), none refused", ms.UDPEvicted, ms.Refusals)
	}
	var kept bool
	for _, s := range e.Sessions() {
		kept = kept || s.Client == real
	}
	if !kept {
		t.Fatal("the conversing client lost its session")
	}
}

// TestUDPReplyBeforeCheckDoesNotAssure: a spoofed source's one datagram
// whose reply comes back before HandleUDP returns (a fast local target,
// the caller preempted in between) must not assure its session, or a flood
// against an echo would fill the pool with sessions nothing may evict.
func TestUDPReplyBeforeCheckDoesNotAssure(t *testing.T) {
	// Not parallel: the hook is package-wide.
	hook := func(us *udpSession) { // the reply wins the race, every time
		deadline := time.Now().Add(5 * time.Second)
		for !us.replied.Load() && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
	udpDelivered.Store(&hook)
	t.Cleanup(func() { udpDelivered.Store(nil) })
	e, tun, dst := echoPoolOfTwo(t)
	spoofAnswered(t, e, tun, dst, 4)
	// Sources 2 and 3 each found the pool full of unassured sessions and
	// evicted one; an assured one would have refused them.
	ms := mappingStatus(t, e, "game")
	if ms.UDPEvicted != 2 || ms.Refusals["over_limit_udp_sessions"] != 0 {
		t.Fatalf("evicted %d, refusals %v; want 2 evicted (one datagram each, never assured), none refused", ms.UDPEvicted, ms.Refusals)
	}
}

// TestUDPPoolOfAssuredSessionsRefuses: when every session in the UDP pool
// is assured, nothing is evicted and the new client is refused.
func TestUDPPoolOfAssuredSessionsRefuses(t *testing.T) {
	t.Parallel()
	echo := udpEcho(t)
	cfg := config(mapping("game", conf.UDP, "6001", "127.0.0.1:"+itoa(echo)))
	cfg.Limits.MaxUDPSessions = 2
	e := newEngine(t, cfg, Options{})
	tun := newIngress(conf.IngressTUN)
	dst := netip.MustParseAddrPort("198.51.100.1:6001")
	for i := range 2 {
		converse(t, e, tun, netip.MustParseAddrPort("203.0.113.1:"+itoa(uint16(1000+i))), dst)
	}
	e.HandleUDP(tun, netip.MustParseAddrPort("203.0.113.1:1002"), dst, []byte("x"))
	ms := mappingStatus(t, e, "game")
	if ms.Refusals["over_limit_udp_sessions"] != 1 || ms.UDPEvicted != 0 || len(e.Sessions()) != 2 {
		t.Fatalf("refusals %v, evicted %d, %d sessions; want 1 over_limit_udp_sessions, 0, 2", ms.Refusals, ms.UDPEvicted, len(e.Sessions()))
	}
}

// TestTCPEvictsUnassuredUDP: where TCP and UDP share max_sessions (here the
// UDP pool is all of it), a TCP connection takes the slot of a UDP session
// that never had a reply rather than being refused.
func TestTCPEvictsUnassuredUDP(t *testing.T) {
	t.Parallel()
	sink, _ := udpSink(t)
	web := tcpEcho(t)
	cfg := config(mapping("flood", conf.UDP, "6000", "127.0.0.1:"+itoa(sink)), mapping("web", conf.TCP, "80", "127.0.0.1:"+itoa(web)))
	cfg.Limits.MaxSessions = 10
	cfg.Limits.MaxUDPSessions = 10
	e := newEngine(t, cfg, Options{NoUDPProbation: true})
	tun := newIngress(conf.IngressTUN)
	for i := range 50 {
		e.HandleUDP(tun, floodSource(i), netip.MustParseAddrPort("198.51.100.1:6000"), []byte("spoof"))
	}
	if n := mappingStatus(t, e, "flood").UDPEvicted; n != 40 {
		t.Fatalf("udp_evicted %d after 50 into 10, want 40", n)
	}
	f := startTCP(t, e, tun, "203.0.113.9:5000", "198.51.100.1:80")
	if got := f.wait(t); got != "accepted" {
		t.Fatalf("TCP %s while max_sessions was full of unassured UDP sessions", got)
	}
	if n := mappingStatus(t, e, "flood").UDPEvicted; n != 41 {
		t.Fatalf("udp_evicted %d, want 41", n)
	}
	if n := mappingStatus(t, e, "web").Refusals["over_limit_sessions"]; n != 0 {
		t.Fatalf("over_limit_sessions %d, want 0", n)
	}
	f.client.Close()
	<-f.done
}

// TestMappingMaxSessionsEvictsItsOwnUnassured: a full mapping evicts its
// own oldest unassured session, never another mapping's.
func TestMappingMaxSessionsEvictsItsOwnUnassured(t *testing.T) {
	t.Parallel()
	sink, _ := udpSink(t)
	a := mapping("a", conf.UDP, "6000", "127.0.0.1:"+itoa(sink))
	a.MaxSessions = 3
	e := newEngine(t, config(a, mapping("b", conf.UDP, "6001", "127.0.0.1:"+itoa(sink))), Options{NoUDPProbation: true})
	tun := newIngress(conf.IngressTUN)
	bClient := netip.MustParseAddrPort("203.0.113.200:1")
	e.HandleUDP(tun, bClient, netip.MustParseAddrPort("198.51.100.1:6001"), []byte("b")) // the oldest unassured overall
	for i := range 10 {
		e.HandleUDP(tun, floodSource(i), netip.MustParseAddrPort("198.51.100.1:6000"), []byte("a"))
	}
	if a, b := mappingStatus(t, e, "a"), mappingStatus(t, e, "b"); a.UDPEvicted != 7 || b.UDPEvicted != 0 || b.SessionsActive != 1 {
		t.Fatalf("a evicted %d, b evicted %d with %d active; want 7, 0, 1", a.UDPEvicted, b.UDPEvicted, b.SessionsActive)
	}
	// The survivors are the three newest.
	waitFor(t, "evicted sessions gone", func() bool { return len(e.Sessions()) == 4 })
	for _, s := range e.Sessions() {
		if s.Mapping == "a" && s.Client.Port() < floodSource(7).Port() {
			t.Errorf("session of %v survived; want only the 3 newest", s.Client)
		}
	}
}

// TestPerSourceSessionCap: a source (an IPv4 address, an IPv6 /64, an
// IPv4-mapped address as its IPv4 one) opens at most its cap of sessions
// on a mapping; another source is not affected, and closing a session
// gives the slot back.
func TestPerSourceSessionCap(t *testing.T) {
	t.Parallel()
	echo := udpEcho(t)
	cfg := config(mapping("game", conf.UDP, "6001", "127.0.0.1:"+itoa(echo)))
	cfg.Limits.MaxUDPSessionsPerSource = 2
	e := newEngine(t, cfg, Options{})
	tun := newIngress(conf.IngressTUN)
	dst := netip.MustParseAddrPort("198.51.100.1:6001")
	tests := []struct {
		src  string
		want bool // admitted
	}{
		{"[2001:db8:1:2::1]:1000", true},
		{"[2001:db8:1:2:ffff::9]:1000", true}, // same /64: its second
		{"[2001:db8:1:2::3]:5", false},        // same /64: over the cap
		{"[2001:db8:1:3::1]:1000", true},      // another /64
		{"203.0.113.9:1", true},
		{"[::ffff:203.0.113.9]:2", true}, // the same IPv4 source: its second
		{"203.0.113.9:3", false},
		{"203.0.113.10:3", true},
	}
	refused := uint64(0)
	for _, tt := range tests {
		src := netip.MustParseAddrPort(tt.src)
		e.HandleUDP(tun, src, dst, []byte("x"))
		if !tt.want {
			refused++
		}
		if n := mappingStatus(t, e, "game").Refusals["over_limit_sessions_per_source"]; n != refused {
			t.Fatalf("after %s: over_limit_sessions_per_source %d, want %d", tt.src, n, refused)
		}
		if tt.want && tun.next(t).dst != src {
			t.Fatalf("%s admitted but no reply to it", tt.src)
		}
	}
	if n := len(e.Sessions()); n != 6 {
		t.Fatalf("%d sessions, want 6", n)
	}
}

// TestPerSourceTCPCapOverride: a mapping's own cap overrides [limits]; the
// refused client gets a reset, and a closed session frees its slot.
func TestPerSourceTCPCapOverride(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	m := mapping("ssh", conf.TCP, "22", "127.0.0.1:"+itoa(echo))
	m.MaxTCPSessionsPerSource = 1
	cfg := config(m)
	cfg.Limits.MaxTCPSessionsPerSource = 50
	e := newEngine(t, cfg, Options{})
	tun := newIngress(conf.IngressTUN)
	first := startTCP(t, e, tun, "[2001:db8::1]:1000", "198.51.100.1:22")
	if first.wait(t) != "accepted" {
		t.Fatal("first session refused")
	}
	if f := startTCP(t, e, tun, "[2001:db8::2]:1000", "198.51.100.1:22"); f.wait(t) != "rejected" {
		t.Fatal("second session of the same /64 admitted over the mapping's cap of 1")
	}
	if n := mappingStatus(t, e, "ssh").Refusals["over_limit_sessions_per_source"]; n != 1 {
		t.Fatalf("over_limit_sessions_per_source %d, want 1", n)
	}
	if f := startTCP(t, e, tun, "[2001:db8:0:1::1]:1000", "198.51.100.1:22"); f.wait(t) != "accepted" {
		t.Fatal("another /64 refused")
	}
	first.client.Close()
	<-first.done
	if f := startTCP(t, e, tun, "[2001:db8::3]:1000", "198.51.100.1:22"); f.wait(t) != "accepted" {
		t.Fatal("the source's slot was not given back when its session closed")
	}
}

// TestInflightPerSourceCountsIPv6Per64: the in-flight dial budget per
// source groups an IPv6 /64 too.
func TestInflightPerSourceCountsIPv6Per64(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	cfg := config(mapping("dead", conf.TCP, "80", "127.0.0.1:1"), mapping("live", conf.TCP, "81", "127.0.0.1:"+itoa(echo)))
	cfg.Limits.MaxInflightPerSource = 1
	e := newEngine(t, cfg, Options{Dialer: &hangDialer{hang: map[string]bool{"127.0.0.1:1": true}}})
	tun := newIngress(conf.IngressTUN)
	stuck := startTCP(t, e, tun, "[2001:db8::1]:1000", "198.51.100.1:80")
	waitFor(t, "1 in flight", func() bool { return e.Snapshot().InflightDials == 1 })
	if f := startTCP(t, e, tun, "[2001:db8::2]:1000", "198.51.100.1:81"); f.wait(t) != "rejected" {
		t.Fatal("same /64 admitted past its in-flight budget")
	}
	if n := mappingStatus(t, e, "live").Refusals["over_limit_inflight_per_source"]; n != 1 {
		t.Fatalf("over_limit_inflight_per_source %d, want 1", n)
	}
	if f := startTCP(t, e, tun, "[2001:db8:0:1::2]:1000", "198.51.100.1:81"); f.wait(t) != "accepted" {
		t.Fatal("another /64 refused")
	}
	stuck.abandon()
	<-stuck.done
}

// TestRatePerSource drives the new-session token bucket with a fake clock:
// a burst, then one session per 1/rate, per source and mapping; datagrams
// of an open session cost nothing.
func TestRatePerSource(t *testing.T) {
	t.Parallel()
	sink, _ := udpSink(t)
	echo := tcpEcho(t)
	clock := newFakeClock()
	u := mapping("game", conf.UDP, "6000", "127.0.0.1:"+itoa(sink))
	u.NewSessionsPerSourcePerSecond = 2 // burst: twice the rate
	tcp := mapping("web", conf.TCP, "80", "127.0.0.1:"+itoa(echo))
	cfg := config(u, tcp)
	cfg.Limits.NewSessionsPerSourcePerSecond = 1
	cfg.Limits.NewSessionsPerSourceBurst = 1
	e := newEngine(t, cfg, Options{Clock: clock})
	tun := newIngress(conf.IngressTUN)
	dst := netip.MustParseAddrPort("198.51.100.1:6000")
	x := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("203.0.113.1"), port) }
	refusals := func() uint64 { return mappingStatus(t, e, "game").Refusals["over_limit_rate_per_source"] }

	for p := range uint16(4) {
		e.HandleUDP(tun, x(1000+p), dst, []byte("x"))
	}
	if n := refusals(); n != 0 {
		t.Fatalf("burst of 4: %d refused", n)
	}
	e.HandleUDP(tun, x(1004), dst, []byte("x"))
	if n := refusals(); n != 1 {
		t.Fatalf("5th new session in the same instant: %d refused, want 1", n)
	}
	e.HandleUDP(tun, x(1000), dst, []byte("old session")) // no new session: no token
	if n := refusals(); n != 1 {
		t.Fatalf("a datagram of an open session was rate limited (%d)", n)
	}
	// Another source has its own bucket.
	e.HandleUDP(tun, netip.MustParseAddrPort("203.0.113.2:1000"), dst, []byte("x"))
	if n := refusals(); n != 1 {
		t.Fatalf("another source refused (%d)", n)
	}
	clock.Advance(500 * time.Millisecond) // one token at 2/s
	e.HandleUDP(tun, x(1005), dst, []byte("x"))
	e.HandleUDP(tun, x(1006), dst, []byte("x"))
	if n := refusals(); n != 2 {
		t.Fatalf("after half a second: %d refused, want 2 (one admitted, one refused)", n)
	}
	if n := mappingStatus(t, e, "game").SessionsOpened; n != 6 {
		t.Fatalf("%d sessions opened, want 6", n)
	}

	// TCP under [limits]: 1/s, burst 1; the refused client gets a reset.
	if f := startTCP(t, e, tun, "203.0.113.1:2000", "198.51.100.1:80"); f.wait(t) != "accepted" {
		t.Fatal("first TCP connection refused")
	}
	if f := startTCP(t, e, tun, "203.0.113.1:2001", "198.51.100.1:80"); f.wait(t) != "rejected" {
		t.Fatal("second TCP connection in the same instant admitted")
	}
	if n := mappingStatus(t, e, "web").Refusals["over_limit_rate_per_source"]; n != 1 {
		t.Fatalf("web rate refusals %d, want 1", n)
	}
	clock.Advance(time.Second)
	if f := startTCP(t, e, tun, "203.0.113.1:2002", "198.51.100.1:80"); f.wait(t) != "accepted" {
		t.Fatal("TCP connection a second later refused")
	}
}

// TestRateBucketTableIsBounded: a flood from more sources than
// max_tracked_sources keeps at most that many buckets, counts every
// bucket it had to drop, and the sweep forgets refilled ones.
func TestRateBucketTableIsBounded(t *testing.T) {
	t.Parallel()
	var tab sourceTable
	tab.init()
	st := &mappingState{name: "m"}
	const perShard = 4
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	const sources = 100000
	for i := range sources {
		src := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		if !tab.allow(bucketKey{st: st, src: src}, now, 10, 20, perShard) {
			t.Fatalf("source %d refused its first session", i)
		}
	}
	kept := tab.tracked()
	if kept != sourceShards*perShard {
		t.Fatalf("%d buckets kept, want the bound %d", kept, sourceShards*perShard)
	}
	if n := st.rateEvicted.Load(); n != uint64(sources-kept) {
		t.Fatalf("%d evictions counted, want %d", n, sources-kept)
	}
	// A bucket that is still draining survives a sweep; refilled ones go.
	hot := netip.MustParseAddr("192.0.2.1")
	for range 20 {
		tab.allow(bucketKey{st: st, src: hot}, now, 10, 20, perShard)
	}
	if tab.allow(bucketKey{st: st, src: hot}, now, 10, 20, perShard) {
		t.Fatal("21st session of a burst of 20 admitted")
	}
	tab.sweep(now.Add(time.Second)) // the flood's buckets (19 of 20 tokens) refill in 0.1 s; hot's takes 2 s
	if n := tab.tracked(); n != 1 {
		t.Fatalf("%d buckets after the sweep, want only the draining one", n)
	}
	tab.sweep(now.Add(2 * time.Second))
	if n := tab.tracked(); n != 0 {
		t.Fatalf("%d buckets after it refilled, want 0", n)
	}
}

// TestTrackedSourcesThroughTheEngine: limits.max_tracked_sources reaches
// the engine, and its drops reach the mapping's counters and Snapshot.
func TestTrackedSourcesThroughTheEngine(t *testing.T) {
	t.Parallel()
	sink, _ := udpSink(t)
	cfg := config(mapping("flood", conf.UDP, "6000", "127.0.0.1:"+itoa(sink)))
	cfg.Limits.MaxUDPSessions = 16
	cfg.Limits.NewSessionsPerSourcePerSecond = 5
	cfg.Limits.MaxTrackedSources = 32
	e := newEngine(t, cfg, Options{Clock: newFakeClock(), NoUDPProbation: true})
	tun := newIngress(conf.IngressTUN)
	const flood = 1000
	for i := range flood {
		e.HandleUDP(tun, floodSource(i), netip.MustParseAddrPort("198.51.100.1:6000"), []byte("spoof"))
	}
	st := e.Snapshot()
	if st.TrackedSources > 32 {
		t.Fatalf("%d sources tracked, bound 32", st.TrackedSources)
	}
	ms := mappingStatus(t, e, "flood")
	if ms.RateSourcesEvicted != uint64(flood-st.TrackedSources) {
		t.Fatalf("rate buckets evicted %d, want %d", ms.RateSourcesEvicted, flood-st.TrackedSources)
	}
	if ms.UDPEvicted != flood-16 || st.UDPSessions != 16 {
		t.Fatalf("udp evicted %d, pool %d; want %d, 16", ms.UDPEvicted, st.UDPSessions, flood-16)
	}
}

// TestRefusedUDPDatagramDoesNotAllocate: under a flood that a full pool
// refuses, each datagram costs no allocation (once the rate table is full,
// evicted buckets are reused).
func TestRefusedUDPDatagramDoesNotAllocate(t *testing.T) {
	echo := udpEcho(t)
	cfg := config(mapping("game", conf.UDP, "6001", "127.0.0.1:"+itoa(echo)))
	cfg.Limits.MaxUDPSessions = 1
	cfg.Limits.NewSessionsPerSourcePerSecond = 100
	cfg.Limits.MaxTrackedSources = 16
	e, err := New(cfg, Options{}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	tun := newIngress(conf.IngressTUN)
	dst := netip.MustParseAddrPort("198.51.100.1:6001")
	converse(t, e, tun, netip.MustParseAddrPort("203.0.113.1:1"), dst) // assured: nothing to evict
	i := 0
	flood := func() {
		e.HandleUDP(tun, floodSource(i), dst, []byte("spoof"))
		i++
	}
	for range 1000 { // fill the rate table
		flood()
	}
	if n := testing.AllocsPerRun(1000, flood); n != 0 {
		t.Fatalf("%v allocations per refused datagram, want 0", n)
	}
	if n := mappingStatus(t, e, "game").Refusals["over_limit_udp_sessions"]; n < 2000 {
		t.Fatalf("over_limit_udp_sessions %d, want every flood datagram refused", n)
	}
}
