package forwarder

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/testutil"
)

func benchRuleSet(b *testing.B) *RuleSet {
	var ms []conf.Mapping
	for i := range 200 {
		p := itoa(uint16(1000 + i*10))
		ms = append(ms, mapping("single"+p, conf.TCP, p, "127.0.0.1:"+p))
		ms = append(ms, mapping("range"+p, conf.UDP, p+"-"+itoa(uint16(1000+i*10+5)), "127.0.0.1:"+p))
	}
	ms = append(ms, mapping("addr", conf.TCP, "198.51.100.7:1000", "127.0.0.1:1"))
	rs, err := Compile(config(ms...))
	if err != nil {
		b.Fatal(err)
	}
	return rs
}

func BenchmarkLookup(b *testing.B) {
	rs := benchRuleSet(b)
	now := time.Now()
	dsts := []netip.AddrPort{
		netip.MustParseAddrPort("198.51.100.7:1000"),
		netip.MustParseAddrPort("203.0.113.1:1990"),
		netip.MustParseAddrPort("[2001:db8::1]:2500"),
		netip.MustParseAddrPort("203.0.113.1:2003"),
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		d := dsts[i%len(dsts)]
		proto := conf.TCP
		if i%2 == 1 {
			proto = conf.UDP
		}
		if rs.Lookup("tun", proto, d, now) == nil {
			b.Fatalf("no match for %v", d)
		}
		i++
	}
}

func BenchmarkAllowMatch(b *testing.B) {
	m := mapping("ssh", conf.TCP, "22", "127.0.0.1:22")
	for i := range 100 {
		m.Allow = append(m.Allow, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 16))
		m.Deny = append(m.Deny, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 66, 0}), 24))
	}
	r, err := compileRule(m, 0)
	if err != nil {
		b.Fatal(err)
	}
	clients := []netip.Addr{netip.MustParseAddr("10.50.1.1"), netip.MustParseAddr("10.50.66.1"), netip.MustParseAddr("192.0.2.1")}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		r.admits(clients[i%len(clients)])
		i++
	}
}

func BenchmarkUDPTable(b *testing.B) {
	t := udpTable{m: make(map[udpKey]*udpSession)}
	keys := make([]udpKey, 4096)
	for i := range keys {
		keys[i] = udpKey{mapping: "game", client: netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}), uint16(i))}
	}
	us := &udpSession{}
	b.Run("insert", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			k := keys[i%len(keys)]
			t.mu.Lock()
			t.m[k] = us
			t.mu.Unlock()
			i++
		}
	})
	b.Run("lookup", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if t.get(keys[i%len(keys)]) == nil {
				b.Fatal("missing")
			}
			i++
		}
	})
}

// BenchmarkSpliceCopy measures the copy loop between two loopback TCP
// connections.
func BenchmarkSpliceCopy(b *testing.B) {
	aUser, a := tcpPair(b)
	bUser, bb := tcpPair(b)
	var t idleTimer
	t.clock = wallClock{}
	t.setIdle(time.Minute)
	t.touch()
	sp := newSplicer(a, bb, &t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sp.run(nil, nil)
	}()
	const chunk = 64 << 10
	buf := make([]byte, chunk)
	rbuf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ReportAllocs()
	for b.Loop() {
		go aUser.Write(buf)
		if _, err := io.ReadFull(bUser, rbuf); err != nil {
			b.Fatal(err)
		}
	}
	sp.closeBoth()
	<-done
}

// BenchmarkUDPForward pushes 1400-byte datagrams of one client through
// HandleUDP to a loopback sink as fast as the caller can, the way a TUN
// reader does, and reports the share the sink received: the UDP session's
// send path is the ceiling for a UDP flood.
func BenchmarkUDPForward(b *testing.B) {
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	defer sink.Close()
	sink.SetReadBuffer(8 << 20)
	var got atomic.Int64
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := sink.ReadFromUDPAddrPort(buf); err != nil {
				return
			}
			got.Add(1)
		}
	}()
	port := uint16(sink.LocalAddr().(*net.UDPAddr).Port)
	e, err := New(config(mapping("flood", conf.UDP, "5000", "127.0.0.1:"+itoa(port))), Options{UDPQueueLen: 512}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	in := newIngress(conf.IngressTUN)
	client := netip.MustParseAddrPort("203.0.113.7:4444")
	pub := netip.MustParseAddrPort("198.51.100.1:5000")
	payload := make([]byte, 1400)
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	cpu0 := rusageCPU()
	start := time.Now()
	for b.Loop() {
		e.HandleUDP(in, client, pub, payload)
	}
	// Let the queue drain, then count.
	for last := int64(-1); last != got.Load(); {
		last = got.Load()
		time.Sleep(20 * time.Millisecond)
	}
	b.ReportMetric(float64(got.Load())/time.Since(start).Seconds(), "delivered/s")
	// Most of what the loop pushes overflows the session's queue: the CPU
	// per datagram that reached the sink is the send path's cost.
	b.ReportMetric(float64((rusageCPU()-cpu0).Nanoseconds())/1e3/float64(got.Load()), "cpu-us/delivered")
	b.ReportMetric(100*float64(got.Load())/float64(b.N), "%delivered")
}

// BenchmarkSourceBudgets is the per-new-flow cost of the per-source
// budgets: the rate bucket, a session slot under every pool and cap, and
// its release, for sources spread over the shards (RunParallel: the
// contention between admissions).
func BenchmarkSourceBudgets(b *testing.B) {
	cfg := config(mapping("m", conf.TCPUDP, "80", "127.0.0.1:80"))
	cfg.Limits.MaxTCPSessionsPerSource = 256
	cfg.Limits.MaxUDPSessionsPerSource = 256
	cfg.Limits.NewSessionsPerSourcePerSecond = 1 << 30 // never the limit: the cost, not the refusal
	e, err := New(cfg, Options{}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	rs := e.rules.Load()
	r := rs.rules[0]
	now := time.Now()
	var next atomic.Uint32
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		base := next.Add(1) << 16
		i := uint32(0)
		for pb.Next() {
			v := base + i%4096
			src := netip.AddrFrom4([4]byte{10, byte(v >> 16), byte(v >> 8), byte(v)})
			if e.allowNew(rs, r, src, now) != refusalNone {
				b.Fatal("rate refused")
			}
			sl, why := e.reserveSlot(rs, r, conf.UDP, src)
			if why != refusalNone {
				b.Fatalf("slot refused: %v", why)
			}
			e.releaseSlot(sl)
			i++
		}
	})
}

// BenchmarkUDPFloodChurn is a spoofed-source UDP flood as HandleUDP sees
// it: every datagram comes from a new source, to a mapping whose
// max_sessions is full of unassured sessions. With probation (the default)
// each is recorded and dropped; without, each evicts the oldest session and
// opens one of its own (a socket and two goroutines). ns/op is what the
// caller, the input pump, spends per datagram; the session goroutines' cost
// is on the other CPUs and shows in sessions/s, the rate the pump got
// through, when they compete for them.
func BenchmarkUDPFloodChurn(b *testing.B) {
	for _, bc := range []struct {
		name string
		opts Options
	}{{"probation", Options{}}, {"evict", Options{NoUDPProbation: true}}} {
		b.Run(bc.name, func(b *testing.B) { benchUDPFloodChurn(b, bc.opts) })
	}
}

func benchUDPFloodChurn(b *testing.B, opts Options) {
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	defer sink.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := sink.ReadFromUDPAddrPort(buf); err != nil {
				return
			}
		}
	}()
	port := uint16(sink.LocalAddr().(*net.UDPAddr).Port)
	m := mapping("flood", conf.UDP, "5000", "127.0.0.1:"+itoa(port))
	m.MaxSessions = 1000
	e, err := New(config(m), opts, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	in := newIngress(conf.IngressTUN)
	pub := netip.MustParseAddrPort("198.51.100.1:5000")
	payload := make([]byte, 64)
	src := func(i uint32) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(128 | i>>16&0x7f), byte(i >> 8)}), uint16(1024+i&0xff))
	}
	i := uint32(0)
	for ; i < 1000; i++ { // fill the mapping
		e.HandleUDP(in, src(i), pub, payload)
	}
	b.ReportAllocs()
	start := time.Now()
	for b.Loop() {
		e.HandleUDP(in, src(i), pub, payload)
		i++
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "datagrams/s")
}

// tcpChurnAttempt is a TCPAttempt whose client leg is already connected.
type tcpChurnAttempt struct{ conn net.Conn }

func (a tcpChurnAttempt) Accept() (net.Conn, error) { return a.conn, nil }
func (a tcpChurnAttempt) Reject()                   { a.conn.Close() }
func (a tcpChurnAttempt) Context() context.Context  { return context.Background() }

// BenchmarkTCPChurn is pmbench crr through HandleTCP: a loopback client
// leg is handed over, HandleTCP (on its own goroutine, as netstack calls it)
// dials a loopback target, the client sends one byte, the target answers it
// and closes first. cpu-us/op is the process's CPU per connection, the
// harness's own dial and accept included; allocs/op count every goroutine.
//
//	go test -run '^$' -bench TCPChurn -benchtime 5000x ./forwarder
func BenchmarkTCPChurn(b *testing.B) {
	target := testutil.ServeTCP(b, "127.0.0.1:0", func(c *net.TCPConn) {
		buf := make([]byte, 1)
		if _, err := io.ReadFull(c, buf); err == nil {
			c.Write(buf)
		}
	})
	cfg := config(mapping("crr", conf.TCP, "80", target.String()))
	cfg.Limits.NewSessionsPerSourcePerSecond = 0
	cfg.Limits.MaxTCPSessionsPerSource = 0
	e, err := New(cfg, Options{}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 64)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	in := newIngress(conf.IngressTUN)
	src := netip.MustParseAddrPort("203.0.113.7:4444")
	dst := netip.MustParseAddrPort("198.51.100.1:80")
	var handlers sync.WaitGroup
	var failed atomic.Int64
	var mu sync.Mutex // one accept per dial: pairs the two ends
	b.SetParallelism(4)
	b.ReportAllocs()
	cpu0 := rusageCPU()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			mu.Lock()
			c, err := net.Dial("tcp", ln.Addr().String())
			var server net.Conn
			if err == nil {
				server = <-accepted
			}
			mu.Unlock()
			if err != nil {
				failed.Add(1)
				continue
			}
			handlers.Go(func() { e.HandleTCP(in, src, dst, tcpChurnAttempt{server}) })
			if err := testutil.OneByteExchange(c); err != nil {
				failed.Add(1)
			}
		}
	})
	b.ReportMetric(float64((rusageCPU()-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
	handlers.Wait()
	if n := failed.Load(); n > 0 {
		b.Fatalf("%d of %d connections failed", n, b.N)
	}
}

// rusageCPU is the process's user and system CPU time so far.
func rusageCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkBatchWriter sends 1400-byte datagrams to a loopback sink in
// batches of the given size with sendmmsg alone (gso=false) or with runs
// as UDP GSO sends: a UDP session's send cost per datagram (cpu-us/dgram,
// the sink's reads included) at the batch sizes its queue hands over.
//
//	go test -run '^$' -bench BatchWriter -benchtime 200000x ./forwarder
func BenchmarkBatchWriter(b *testing.B) {
	for _, batch := range []int{1, 8, 32} {
		for _, gso := range []bool{false, true} {
			b.Run(fmt.Sprintf("batch=%d/gso=%v", batch, gso), func(b *testing.B) { benchBatchWriter(b, batch, gso) })
		}
	}
}

func benchBatchWriter(b *testing.B, batch int, gso bool) {
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	defer sink.Close()
	sink.SetReadBuffer(8 << 20)
	var got atomic.Int64
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := sink.ReadFromUDPAddrPort(buf); err != nil {
				return
			}
			got.Add(1)
		}
	}()
	conn, err := net.ListenUDP("udp4", nil)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	w := newBatchWriter(conn, netip.MustParseAddr("127.0.0.1"))
	if gso && !w.gso {
		b.Skip("no UDP GSO")
	}
	w.gso = gso
	port := uint16(sink.LocalAddr().(*net.UDPAddr).Port)
	client := netip.MustParseAddrPort("203.0.113.7:4444")
	pub := netip.MustParseAddrPort("198.51.100.1:5000")
	payload := make([]byte, 1400)
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	cpu0 := rusageCPU()
	for b.Loop() {
		w.add(payload, port, false, client, pub)
		if len(w.msgs) == batch {
			if _, err := w.flush(); err != nil {
				b.Fatal(err)
			}
		}
	}
	w.flush()
	for last := int64(-1); last != got.Load(); {
		last = got.Load()
		time.Sleep(20 * time.Millisecond)
	}
	cpu := float64((rusageCPU() - cpu0).Nanoseconds()) / 1e3
	b.ReportMetric(cpu/float64(b.N), "cpu-us/dgram")
	// A faster sender overruns the sink, whose drops cost it less than
	// reads: CPU per datagram delivered does not reward that.
	b.ReportMetric(cpu/float64(got.Load()), "cpu-us/delivered")
	b.ReportMetric(100*float64(got.Load())/float64(b.N), "%delivered")
	if gso && !w.gso {
		b.Fatal("the kernel refused UDP GSO")
	}
}
