package forwarder

import (
	"go.uber.org/zap/zaptest"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
)

// udpEcho answers each datagram with "<port>|<source seen>|<payload>" and
// returns its port.
func udpEcho(t testing.TB) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	serveUDPEcho(t, c)
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

func serveUDPEcho(t testing.TB, c *net.UDPConn) {
	var wg sync.WaitGroup
	t.Cleanup(func() { c.Close(); wg.Wait() })
	port := itoa(uint16(c.LocalAddr().(*net.UDPAddr).Port))
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 65535)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort([]byte(port+"|"+from.String()+"|"+string(buf[:n])), from)
		}
	}()
}

// udpEchoPair opens echoes on two consecutive ports and returns the first.
func udpEchoPair(t testing.TB) uint16 {
	t.Helper()
	for range 50 {
		a, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		p := a.LocalAddr().(*net.UDPAddr).Port
		b, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p + 1})
		if err != nil {
			a.Close()
			continue
		}
		serveUDPEcho(t, a)
		serveUDPEcho(t, b)
		return uint16(p)
	}
	t.Fatal("no two consecutive free UDP ports")
	return 0
}

func TestUDPSession(t *testing.T) {
	t.Parallel()
	port := udpEchoPair(t)
	e := newEngine(t, config(mapping("game", conf.UDP, "5000-5001", "127.0.0.1:"+itoa(port))), Options{})
	tun := newIngress(conf.IngressTUN)
	client := netip.MustParseAddrPort("203.0.113.7:4444")

	e.HandleUDP(tun, client, netip.MustParseAddrPort("198.51.100.1:5000"), []byte("one"))
	r := tun.next(t)
	if r.src != netip.MustParseAddrPort("198.51.100.1:5000") || r.dst != client {
		t.Fatalf("reply %v -> %v, want from the public addr:port to the client", r.src, r.dst)
	}
	parts := strings.SplitN(r.payload, "|", 3)
	if parts[0] != itoa(port) || parts[2] != "one" {
		t.Fatalf("reply payload %q", r.payload)
	}
	firstSource := parts[1]

	// Endpoint-independent: another public address and the other port of
	// the range reuse the session (same source port toward the target), and
	// replies come from what the client used.
	e.HandleUDP(tun, client, netip.MustParseAddrPort("198.51.100.2:5001"), []byte("two"))
	r = tun.next(t)
	if r.src != netip.MustParseAddrPort("198.51.100.2:5001") {
		t.Fatalf("reply source %v, want 198.51.100.2:5001", r.src)
	}
	parts = strings.SplitN(r.payload, "|", 3)
	if parts[0] != itoa(port+1) || parts[1] != firstSource || parts[2] != "two" {
		t.Fatalf("reply payload %q, want port %d and source %s", r.payload, port+1, firstSource)
	}
	if n := len(e.Sessions()); n != 1 {
		t.Fatalf("%d sessions, want 1", n)
	}
	// Another client gets its own session.
	e.HandleUDP(tun, netip.MustParseAddrPort("203.0.113.8:4444"), netip.MustParseAddrPort("198.51.100.1:5000"), []byte("three"))
	if r := tun.next(t); r.dst != netip.MustParseAddrPort("203.0.113.8:4444") {
		t.Fatalf("reply to %v", r.dst)
	}
	// Bytes are counted just after the send, which can trail the reply.
	waitFor(t, "bytes counted", func() bool { return mappingStatus(t, e, "game").BytesIn == 11 })
	ms := mappingStatus(t, e, "game")
	if ms.SessionsOpened != 2 || ms.Hits != 2 {
		t.Fatalf("status %+v", ms)
	}
}

func TestUDPIdleExpiry(t *testing.T) {
	t.Parallel()
	port := udpEcho(t)
	clock := newFakeClock()
	m := mapping("dns", conf.UDP, "53", "127.0.0.1:"+itoa(port))
	m.IdleTimeout = conf.Duration(2 * time.Minute)
	onCheck, checks := ticks[bool]()
	e := newEngine(t, config(m), Options{Clock: clock, IdleCheckInterval: 5 * time.Millisecond, onIdleCheck: onCheck})
	tun := newIngress(conf.IngressTUN)
	client := netip.MustParseAddrPort("203.0.113.7:4444")
	dst := netip.MustParseAddrPort("198.51.100.1:53")

	e.HandleUDP(tun, client, dst, []byte("q1"))
	tun.next(t)
	clock.Advance(90 * time.Second)
	e.HandleUDP(tun, client, dst, []byte("q2")) // activity moves the idle point
	tun.next(t)
	clock.Advance(90 * time.Second) // 180 s since start, 90 s since traffic
	// The second idle check after the advance began after it: it saw 90 s.
	for range 2 {
		if nextTick(t, checks, "idle check") {
			t.Fatal("idle check expired the session after 90 s idle")
		}
	}
	if n := len(e.Sessions()); n != 1 {
		t.Fatalf("%d sessions after 90 s idle, want 1", n)
	}
	clock.Advance(31 * time.Second)
	waitFor(t, "idle session to expire", func() bool { return len(e.Sessions()) == 0 })
	ms := mappingStatus(t, e, "dns")
	if ms.UDPExpired != 1 || ms.SessionsActive != 0 {
		t.Fatalf("expired %d active %d", ms.UDPExpired, ms.SessionsActive)
	}
	// The client's next datagram opens a fresh session.
	e.HandleUDP(tun, client, dst, []byte("q3"))
	if r := tun.next(t); !strings.HasSuffix(r.payload, "|q3") {
		t.Fatalf("reply %q", r.payload)
	}
	if n := mappingStatus(t, e, "dns").SessionsOpened; n != 2 {
		t.Fatalf("opened %d, want 2", n)
	}
}

func TestUDPMaxSessions(t *testing.T) {
	t.Parallel()
	port := udpEcho(t)
	m := mapping("game", conf.UDP, "5000", "127.0.0.1:"+itoa(port))
	m.MaxSessions = 2
	e := newEngine(t, config(m), Options{})
	tun := newIngress(conf.IngressTUN)
	dst := netip.MustParseAddrPort("198.51.100.1:5000")
	// Both sessions are conversations (assured), so a full mapping has
	// nothing to evict and refuses the third client at once.
	for i := range 2 {
		converse(t, e, tun, netip.MustParseAddrPort("203.0.113.1:"+itoa(uint16(1000+i))), dst)
	}
	e.HandleUDP(tun, netip.MustParseAddrPort("203.0.113.1:1002"), dst, []byte("x"))
	if n := mappingStatus(t, e, "game").Refusals["over_limit_mapping_sessions"]; n != 1 {
		t.Fatalf("refusals %d, want 1", n)
	}
	if n := mappingStatus(t, e, "game").UDPEvicted; n != 0 {
		t.Fatalf("%d evicted, want 0", n)
	}
	if n := len(e.Sessions()); n != 2 {
		t.Fatalf("%d sessions, want 2", n)
	}
}

// TestUDPFloodDoesNotBlock: a session whose target is stuck drops excess
// datagrams without ever blocking HandleUDP, and other mappings keep going.
func TestUDPFloodDoesNotBlock(t *testing.T) {
	t.Parallel()
	port := udpEcho(t)
	cfg := config(mapping("stuck", conf.UDP, "6000", "127.0.0.1:"+itoa(port)), mapping("fine", conf.UDP, "6001", "127.0.0.1:"+itoa(port)))
	e, err := New(cfg, Options{UDPQueueLen: 8}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	e.beforeUDPSend = func(mapping string) {
		if mapping == "stuck" {
			<-release
		}
	}
	defer e.Close()
	defer close(release)
	tun := newIngress(conf.IngressTUN)
	client := netip.MustParseAddrPort("203.0.113.1:1000")
	stuck := netip.MustParseAddrPort("198.51.100.1:6000")
	payload := make([]byte, 1200)

	const n = 20000
	var worst time.Duration
	start := time.Now()
	for range n {
		t0 := time.Now()
		e.HandleUDP(tun, client, stuck, payload)
		worst = max(worst, time.Since(t0))
	}
	total := time.Since(start)
	// A blocking call would hang on the stuck sender for good; the bound
	// only has to survive -race and GC pauses on a loaded CI machine.
	if worst > time.Second || total > 15*time.Second {
		t.Fatalf("HandleUDP blocked: worst call %v, %d calls in %v", worst, n, total)
	}
	// At most the queue plus the batch the stuck sender holds got in.
	if drops := mappingStatus(t, e, "stuck").UDPDropped; drops < n-(8+min(8, maxUDPBatch)+1) {
		t.Fatalf("dropped %d of %d, want all but the queue and one batch", drops, n)
	}
	e.HandleUDP(tun, client, netip.MustParseAddrPort("198.51.100.1:6001"), []byte("ok"))
	if r := tun.next(t); !strings.HasSuffix(r.payload, "|ok") {
		t.Fatalf("other mapping reply %q", r.payload)
	}
	t.Logf("%d datagrams, worst HandleUDP %v, mean %v", n, worst, total/n)
}

// TestUDPLargeReplyWhole: replies longer than a session's 2 KiB read buffer
// (a large DNS answer, a jumbo datagram, UDP's largest) reach the client
// whole from the first one, none dropped (one was once dropped per session
// to learn its size).
func TestUDPLargeReplyWhole(t *testing.T) {
	t.Parallel()
	port := udpEcho(t)
	e := newEngine(t, config(mapping("big", conf.UDP, "5000", "127.0.0.1:"+itoa(port))), Options{})
	tun := newIngress(conf.IngressTUN)
	client := netip.MustParseAddrPort("203.0.113.7:4444")
	pub := netip.MustParseAddrPort("198.51.100.1:5000")
	for _, n := range []int{100, 3000, 8000, 100, 65000} {
		msg := strings.Repeat(string(rune('a'+n%26)), n)
		e.HandleUDP(tun, client, pub, []byte(msg))
		if r := tun.next(t); !strings.HasSuffix(r.payload, "|"+msg) {
			t.Fatalf("reply to %d bytes: %d bytes, want the whole echo", n, len(r.payload))
		}
	}
	if d := mappingStatus(t, e, "big").UDPDropped; d != 0 {
		t.Fatalf("UDPDropped = %d, want 0", d)
	}
}

// TestUDPLargeRepliesPinNoBuffers: a session that got a large reply keeps
// its 2 KiB read buffer, not a 64 KiB one, while it waits: a flood of
// sources answered with large replies must not pin 64 KiB per session
// outside every budget (it once did, for the rest of the session's life).
func TestUDPLargeRepliesPinNoBuffers(t *testing.T) {
	port := udpEcho(t)
	e := newEngine(t, config(mapping("dns", conf.UDP, "53", "127.0.0.1:"+itoa(port))), Options{NoUDPProbation: true})
	tun := newIngress(conf.IngressTUN)
	dst := netip.MustParseAddrPort("198.51.100.1:53")
	query := strings.Repeat("q", 3000) // echoed: a 3 KiB answer
	const n = 300
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range n {
		e.HandleUDP(tun, floodSource(i), dst, []byte(query))
		if r := tun.next(t); !strings.HasSuffix(r.payload, "|"+query) {
			t.Fatalf("session %d: a %d-byte reply, want the whole echo", i, len(r.payload))
		}
	}
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&after)
	perSession := (int64(after.HeapAlloc) - int64(before.HeapAlloc)) / n
	t.Logf("%d sessions after a 3 KiB reply each: %d KiB of heap each", n, perSession>>10)
	if raceEnabled {
		t.Skip("the race detector's heap figures are not comparable")
	}
	if perSession > 40<<10 {
		t.Fatalf("%d KiB of heap per idle session, want well under a 64 KiB buffer", perSession>>10)
	}
}

// TestUDPRepliesFollowTheClientsPath: one client reaching a mapping through
// two ingresses of the same kind (two relays' uplinks) keeps one session,
// and its replies go back the way its latest datagram came, from the
// address it used there: a client that moves to the second relay after the
// first went away gets its answers through the second.
func TestUDPRepliesFollowTheClientsPath(t *testing.T) {
	t.Parallel()
	port := udpEcho(t)
	e := newEngine(t, config(mapping("game", conf.UDP, "5000", "127.0.0.1:"+itoa(port))), Options{})
	a, b := newIngress(conf.IngressUplink), newIngress(conf.IngressUplink)
	client := netip.MustParseAddrPort("203.0.113.7:4444")
	viaA, viaB := netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("100.97.0.2:5000")

	for i, step := range []struct {
		in, other *fakeIngress
		dst       netip.AddrPort
		msg       string
	}{{a, b, viaA, "one"}, {b, a, viaB, "two"}, {a, b, viaA, "three"}} {
		e.HandleUDP(step.in, client, step.dst, []byte(step.msg))
		r := step.in.next(t)
		if r.src != step.dst || r.dst != client || !strings.HasSuffix(r.payload, "|"+step.msg) {
			t.Fatalf("step %d: reply %v -> %v %q, want from %v to the client with %q", i, r.src, r.dst, r.payload, step.dst, step.msg)
		}
		select {
		case r := <-step.other.replies:
			t.Fatalf("step %d: a reply went the other way: %+v", i, r)
		default:
		}
	}
	if n := len(e.Sessions()); n != 1 {
		t.Fatalf("%d sessions, want the client's one", n)
	}
}

// TestUDPDeliverAfterSessionEndedFreesBudget: HandleUDP finds a session, the
// session ends (here evicted by another source) and drains its queue, and
// only then is the datagram queued. It must be refused and counted: queued,
// it held its buffer and the budget's bytes for good (eviction churn under a
// flood spent a quarter of the default budget in seconds).
func TestUDPDeliverAfterSessionEndedFreesBudget(t *testing.T) {
	sink, _ := udpSink(t)
	cfg := config(mapping("m", conf.UDP, "6000", "127.0.0.1:"+itoa(sink)))
	cfg.Limits.MaxUDPSessions = 1
	e := newEngine(t, cfg, Options{NoUDPProbation: true, BufferBudget: 1 << 20})
	tun := newIngress(conf.IngressTUN)
	dst := netip.MustParseAddrPort("198.51.100.1:6000")
	a := netip.MustParseAddrPort("203.0.113.1:1000")
	b := netip.MustParseAddrPort("203.0.113.2:1000")
	e.HandleUDP(tun, a, dst, []byte("a1"))
	us := e.udp.get(udpKey{mapping: "m", client: a}) // HandleUDP's lookup for a's next datagram
	if us == nil {
		t.Fatal("no session for a")
	}
	e.HandleUDP(tun, b, dst, []byte("b1")) // evicts a
	waitFor(t, "a's session to end", func() bool {
		for _, s := range e.Sessions() {
			if s.Client == a {
				return false
			}
		}
		return true
	})
	dropped := mappingStatus(t, e, "m").UDPDropped
	us.deliver(tun, []byte("a2"), dst, time.Now()) // ... and its delivery, late
	if got := mappingStatus(t, e, "m").UDPDropped; got != dropped+1 {
		t.Fatalf("late datagram: dropped %d -> %d, want one more", dropped, got)
	}
	e.Close()
	if used := e.Snapshot().BufferUsedBytes; used != 0 {
		t.Fatalf("buffer budget used %d bytes after every session ended; want 0", used)
	}
}
