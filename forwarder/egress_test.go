package forwarder

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
)

// fakeEgress records what the engine originates; TCP dials go to the
// target on loopback, or hang while hangTCP is set.
type fakeEgress struct {
	hangTCP bool
	mu      sync.Mutex
	dials   [][2]netip.AddrPort // src, dst
	sent    chan [2]netip.AddrPort
}

func newEgress() *fakeEgress { return &fakeEgress{sent: make(chan [2]netip.AddrPort, 4096)} }

func (f *fakeEgress) DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error) {
	f.mu.Lock()
	f.dials = append(f.dials, [2]netip.AddrPort{src, dst})
	f.mu.Unlock()
	if f.hangTCP {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", dst.String())
}

func (f *fakeEgress) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	f.sent <- [2]netip.AddrPort{src, dst}
	return nil
}

// blockingIngress is a public side whose socket blocks until released.
type blockingIngress struct {
	entered chan struct{} // closed at the first write
	release chan struct{}
	once    sync.Once
	mu      sync.Mutex
	writes  int
}

func (b *blockingIngress) Name() string { return "relay" }

func (b *blockingIngress) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	b.once.Do(func() { close(b.entered) })
	<-b.release
	b.mu.Lock()
	b.writes++
	b.mu.Unlock()
	return nil
}

// TestEgressTCPDialsFromTheClient: with an egress, the target leg is
// originated from the client's own address toward the rule's target.
func TestEgressTCPDialsFromTheClient(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	eg := newEgress()
	e := newEngine(t, config(mapping("web", conf.TCP, "80", "127.0.0.1:"+itoa(echo))), Options{Egress: eg})
	f := startTCP(t, e, newIngress("relay"), "203.0.113.7:5555", "198.51.100.1:80")
	if got := f.wait(t); got != "accepted" {
		t.Fatalf("flow %s, want accepted", got)
	}
	expectEcho(t, f.client, "hello")
	eg.mu.Lock()
	defer eg.mu.Unlock()
	want := [2]netip.AddrPort{netip.MustParseAddrPort("203.0.113.7:5555"), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), echo)}
	if len(eg.dials) != 1 || eg.dials[0] != want {
		t.Fatalf("egress dials %v, want %v", eg.dials, want)
	}
}

// TestEgressUDPRepliesNeverBlock: replies handed over by the packet path
// (HandleUDPReply) are queued for the session's goroutine; while the public
// socket blocks, the queue fills and the rest are dropped and counted, and
// the handing over never waits. Released, the queued replies go out.
func TestEgressUDPRepliesNeverBlock(t *testing.T) {
	t.Parallel()
	eg := newEgress()
	e := newEngine(t, config(mapping("game", conf.UDP, "9000", "10.0.0.2:9000")), Options{Egress: eg})
	in := &blockingIngress{entered: make(chan struct{}), release: make(chan struct{})}
	client := netip.MustParseAddrPort("203.0.113.7:5555")
	target := netip.MustParseAddrPort("10.0.0.2:9000")
	e.HandleUDP(in, client, netip.MustParseAddrPort("198.51.100.1:9000"), []byte("q"))
	select {
	case got := <-eg.sent:
		if got != [2]netip.AddrPort{client, target} {
			t.Fatalf("sent %v -> %v, want %v -> %v", got[0], got[1], client, target)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the client's datagram never reached the egress")
	}
	if e.HandleUDPReply(target, netip.MustParseAddrPort("203.0.113.8:5555"), []byte("x")) {
		t.Fatal("a reply toward a client with no session was taken")
	}
	if e.HandleUDPReply(netip.MustParseAddrPort("10.0.0.3:9000"), client, []byte("x")) {
		t.Fatal("a reply from another address than the target was taken")
	}

	if !e.HandleUDPReply(target, client, []byte("r")) {
		t.Fatal("the session's reply was not taken")
	}
	<-in.entered // the session's goroutine now blocks on the public socket
	const extra = 100
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range defaultReplyQueueLen + extra {
			e.HandleUDPReply(target, client, []byte("r"))
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("HandleUDPReply blocked behind a blocked public socket")
	}
	if got := mappingStatus(t, e, "game").UDPDropped; got != extra {
		t.Fatalf("udp dropped %d, want %d (the replies past the queue)", got, extra)
	}
	close(in.release)
	waitFor(t, "the queued replies written", func() bool {
		in.mu.Lock()
		defer in.mu.Unlock()
		return in.writes == 1+defaultReplyQueueLen
	})
	if got := mappingStatus(t, e, "game").BytesOut; got != 1+defaultReplyQueueLen {
		t.Fatalf("bytes out %d, want %d", got, 1+defaultReplyQueueLen)
	}
}

// TestGroupQuotas: mappings in one group share its session, UDP session,
// in-flight and rate quotas; a mapping outside the group is unaffected;
// each refusal is counted on the refused mapping.
func TestGroupQuotas(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	eg := newEgress()
	eg.hangTCP = true
	cfg := config(
		mapping("p/udp/1", conf.UDP, "1", "10.0.0.2:1"),
		mapping("p/udp/2", conf.UDP, "2", "10.0.0.2:2"),
		mapping("p/tcp/3", conf.TCP, "3", "10.0.0.2:3"),
		mapping("q/udp/4", conf.UDP, "4", "10.0.0.3:4"),
	)
	g := Groups{
		Quotas: map[string]Quota{"p": {MaxSessions: 3, MaxUDPSessions: 2, MaxInflight: 1, RatePerSecond: 1, Burst: 5}},
		Of:     map[string]string{"p/udp/1": "p", "p/udp/2": "p", "p/tcp/3": "p"},
	}
	e := newEngine(t, config(), Options{Egress: eg, Clock: clock})
	if _, err := e.ReloadGroups(cfg, g); err != nil {
		t.Fatal(err)
	}
	in := newIngress("relay")
	udp := func(src string, port uint16) {
		e.HandleUDP(in, netip.MustParseAddrPort(src), netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), port), []byte("x"))
	}
	udp("203.0.113.1:1000", 1)
	udp("203.0.113.2:1000", 2)
	// Answered and spoken to again (assured), so they are not evicted for
	// the next (TestGroupQuotaEvictsUnassured).
	e.HandleUDPReply(netip.MustParseAddrPort("10.0.0.2:1"), netip.MustParseAddrPort("203.0.113.1:1000"), []byte("r"))
	e.HandleUDPReply(netip.MustParseAddrPort("10.0.0.2:2"), netip.MustParseAddrPort("203.0.113.2:1000"), []byte("r"))
	udp("203.0.113.1:1000", 1) // and the clients spoke again: conversations
	udp("203.0.113.2:1000", 2)
	udp("203.0.113.3:1000", 2) // the group's third UDP session: over max_udp_sessions
	if r := mappingStatus(t, e, "p/udp/2").Refusals; r["over_limit_peer_udp_sessions"] != 1 {
		t.Fatalf("p/udp/2 refusals %v, want over_limit_peer_udp_sessions 1", r)
	}
	for i := range 5 { // outside the group: neither quota nor rate applies
		udp("203.0.113."+itoa(uint16(10+i))+":1000", 4)
	}
	if st := mappingStatus(t, e, "q/udp/4"); st.SessionsOpened != 5 {
		t.Fatalf("q/udp/4 opened %d sessions (refusals %v), want 5", st.SessionsOpened, st.Refusals)
	}

	first := startTCP(t, e, in, "203.0.113.4:1000", "198.51.100.1:3") // its dial hangs
	waitFor(t, "the first dial in flight", func() bool { return e.Snapshot().InflightDials == 1 })
	second := startTCP(t, e, in, "203.0.113.5:1000", "198.51.100.1:3")
	if got := second.wait(t); got != "rejected" {
		t.Fatalf("second tcp flow %s, want rejected", got)
	}
	if r := mappingStatus(t, e, "p/tcp/3").Refusals; r["over_limit_peer_inflight"] != 1 {
		t.Fatalf("p/tcp/3 refusals %v, want over_limit_peer_inflight 1", r)
	}
	// Five tokens were spent (three UDP admissions, the refused one
	// included, and two dials): the bucket is empty until a second passes.
	third := startTCP(t, e, in, "203.0.113.6:1000", "198.51.100.1:3")
	if got := third.wait(t); got != "rejected" {
		t.Fatalf("third tcp flow %s, want rejected", got)
	}
	if r := mappingStatus(t, e, "p/tcp/3").Refusals; r["over_limit_peer_rate"] != 1 {
		t.Fatalf("p/tcp/3 refusals %v, want over_limit_peer_rate 1", r)
	}
	first.abandon()
	if got := first.wait(t); got != "rejected" {
		t.Fatalf("first tcp flow %s, want rejected once abandoned", got)
	}
	clock.Advance(time.Second)
	udp("203.0.113.7:1000", 1) // a token again, but the UDP quota is still full
	if r := mappingStatus(t, e, "p/udp/1").Refusals; r["over_limit_peer_udp_sessions"] != 1 {
		t.Fatalf("p/udp/1 refusals %v, want over_limit_peer_udp_sessions 1", r)
	}
}

// TestGroupSessionQuotaEvictsUnassuredForTCP: a relay peer's session quota
// is shared by TCP and UDP; UDP sessions that never had a reply (a spoofed
// flood's) give way to a TCP flow there, as they do at the global and the
// mapping bounds, instead of locking the peer's TCP out.
func TestGroupSessionQuotaEvictsUnassuredForTCP(t *testing.T) {
	t.Parallel()
	cfg := config(mapping("p/udp/1", conf.UDP, "1", "10.0.0.2:1"), mapping("p/tcp/3", conf.TCP, "3", "10.0.0.2:3"))
	g := Groups{Quotas: map[string]Quota{"p": {MaxSessions: 2}}, Of: map[string]string{"p/udp/1": "p", "p/tcp/3": "p"}}
	e := newEngine(t, config(), Options{Egress: newEgress(), NoUDPProbation: true})
	if _, err := e.ReloadGroups(cfg, g); err != nil {
		t.Fatal(err)
	}
	in := newIngress("relay")
	for i := range 2 {
		e.HandleUDP(in, floodSource(i), netip.MustParseAddrPort("198.51.100.1:1"), []byte("spoof"))
	}
	if got := startTCP(t, e, in, "203.0.113.4:1000", "198.51.100.1:3").wait(t); got != "accepted" {
		t.Fatalf("tcp flow with the quota full of unanswered UDP: %s, want accepted (refusals %v)", got, mappingStatus(t, e, "p/tcp/3").Refusals)
	}
	if ev := mappingStatus(t, e, "p/udp/1").UDPEvicted; ev != 1 {
		t.Fatalf("udp_evicted %d, want 1", ev)
	}
}

// TestGroupQuotaEvictsUnassured: when a group's UDP quota is full, a new
// client is on probation (its first datagram dropped and counted), then
// its retransmission evicts the group's oldest session that never had a
// reply (a spoofed flood's), counted as evicted; answered sessions are
// kept, and with only those left the new client is refused.
func TestGroupQuotaEvictsUnassured(t *testing.T) {
	t.Parallel()
	eg := newEgress()
	cfg := config(mapping("p/udp/1", conf.UDP, "1", "10.0.0.2:1"), mapping("p/udp/2", conf.UDP, "2", "10.0.0.2:2"))
	g := Groups{Quotas: map[string]Quota{"p": {MaxUDPSessions: 2}}, Of: map[string]string{"p/udp/1": "p", "p/udp/2": "p"}}
	e := newEngine(t, config(), Options{Egress: eg})
	if _, err := e.ReloadGroups(cfg, g); err != nil {
		t.Fatal(err)
	}
	in := newIngress("relay")
	pub := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), port) }
	answered := netip.MustParseAddrPort("203.0.113.1:1000")
	e.HandleUDP(in, answered, pub(1), []byte("x"))
	if !e.HandleUDPReply(netip.MustParseAddrPort("10.0.0.2:1"), answered, []byte("r")) {
		t.Fatal("the reply found no session")
	}
	e.HandleUDP(in, answered, pub(1), []byte("y"))                                    // a conversation now: assured
	e.HandleUDP(in, netip.MustParseAddrPort("203.0.113.2:1000"), pub(2), []byte("x")) // never answered
	e.HandleUDP(in, netip.MustParseAddrPort("203.0.113.3:1000"), pub(2), []byte("x")) // on probation
	if st := mappingStatus(t, e, "p/udp/2"); st.UDPEvicted != 0 || st.Refusals["udp_probation"] != 1 {
		t.Fatalf("p/udp/2: evicted %d, refusals %v; want none evicted and one udp_probation", st.UDPEvicted, st.Refusals)
	}
	e.HandleUDP(in, netip.MustParseAddrPort("203.0.113.3:1000"), pub(2), []byte("x")) // retransmitted: evicts .2
	if st := mappingStatus(t, e, "p/udp/2"); st.UDPEvicted != 1 || st.Refusals["over_limit_peer_udp_sessions"] != 0 {
		t.Fatalf("p/udp/2: evicted %d, refusals %v; want 1 eviction and no refusal", st.UDPEvicted, st.Refusals)
	}
	if !e.HandleUDPReply(netip.MustParseAddrPort("10.0.0.2:2"), netip.MustParseAddrPort("203.0.113.3:1000"), []byte("r")) {
		t.Fatal("the newest session is not in the table")
	}
	e.HandleUDP(in, netip.MustParseAddrPort("203.0.113.3:1000"), pub(2), []byte("y"))
	e.HandleUDP(in, netip.MustParseAddrPort("203.0.113.4:1000"), pub(1), []byte("x")) // both answered: refused, no probation
	if st := mappingStatus(t, e, "p/udp/1"); st.Refusals["over_limit_peer_udp_sessions"] != 1 || st.Refusals["udp_probation"] != 0 || st.UDPEvicted != 0 {
		t.Fatalf("p/udp/1: refusals %v, evicted %d; want one refusal and no eviction", st.Refusals, st.UDPEvicted)
	}
	if e.HandleUDPReply(netip.MustParseAddrPort("10.0.0.2:2"), netip.MustParseAddrPort("203.0.113.2:1000"), []byte("r")) {
		t.Fatal("the evicted session still takes replies")
	}
}
