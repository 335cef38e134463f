package netstack

import (
	"io"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkTCPThroughput pushes one TCP flow from a client Stack to a server
// Stack over a Pipe (no sockets): the netstack's own ceiling.
//
//	go test -run '^$' -bench TCPThroughput -benchtime 5s ./netstack
func BenchmarkTCPThroughput(b *testing.B) {
	for _, bc := range []struct {
		name string
		gro  bool
	}{{"gro", true}, {"nogro", false}} {
		b.Run(bc.name, func(b *testing.B) {
			old := groEnabled
			groEnabled = bc.gro
			defer func() { groEnabled = old }()
			benchmarkTCP(b)
		})
	}
}

func benchmarkTCP(b *testing.B) {
	received := make(chan int64, 1)
	client, server := newPair(b, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		n, _ := io.CopyBuffer(io.Discard, c, make([]byte, 64<<10))
		received <- n
	}})
	c, err := client.DialTCP(testContext(b), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:5201"))
	if err != nil {
		b.Fatalf("dial: %v", err)
	}
	defer c.Close()
	chunk := make([]byte, 64<<10)
	b.SetBytes(int64(len(chunk)))
	b.ReportAllocs()
	start := time.Now()
	var sent int64
	for b.Loop() {
		n, err := c.Write(chunk)
		if err != nil {
			b.Fatalf("write: %v", err)
		}
		sent += int64(n)
	}
	c.(closeWriter).CloseWrite()
	got := <-received
	el := time.Since(start)
	if got != sent {
		b.Fatalf("server received %d bytes, sent %d", got, sent)
	}
	b.ReportMetric(float64(sent)*8/el.Seconds()/1e9, "Gbit/s")
	b.ReportMetric(float64(client.Stats().TCPRetransmits+server.Stats().TCPRetransmits), "retransmits")
	st := server.Stats()
	if st.PacketsIn > 0 {
		b.ReportMetric(float64(st.GROCoalesced)/float64(st.PacketsIn), "gro-ratio")
	}
}

// BenchmarkUDP sends datagrams with WriteUDP on one Stack and counts them in
// the other's HandleUDP: the whole fast path, both pumps included. allocs/op
// must be 0.
func BenchmarkUDP(b *testing.B) {
	b.Run("pipe", func(b *testing.B) { benchmarkUDP(b, false) })
	b.Run("direct", func(b *testing.B) { benchmarkUDP(b, true) })
}

// benchmarkUDP joins the stacks with a Pipe or, direct, as two wireguard-go
// devices would see them (two Direct pairs and a bridge).
func benchmarkUDP(b *testing.B, direct bool) {
	var got atomic.Int64
	server := funcHandler{udp: func(src, dst netip.AddrPort, p []byte) {
		got.Add(1)
	}}
	var client *Stack
	if direct {
		client, _, _ = newDirectPair(b, 1500, funcHandler{}, server)
	} else {
		client, _ = newPair(b, funcHandler{}, server)
	}
	src, dst := netip.MustParseAddrPort("10.0.0.1:4000"), netip.MustParseAddrPort("10.0.0.2:5000")
	payload := make([]byte, 1400)
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	var sent int64
	for b.Loop() {
		if err := client.WriteUDP(src, dst, payload); err != nil {
			b.Fatalf("WriteUDP: %v", err)
		}
		sent++
	}
	deadline := time.Now().Add(10 * time.Second)
	for got.Load() < sent && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got.Load() != sent {
		b.Fatalf("received %d of %d datagrams", got.Load(), sent)
	}
}

// TestUDPZeroAllocs guards BenchmarkUDP's claim in the normal test run.
func TestUDPZeroAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, direct := range []bool{false, true} {
		res := testing.Benchmark(func(b *testing.B) { benchmarkUDP(b, direct) })
		if res.N == 0 {
			t.Fatal("benchmark did not run")
		}
		// Allow a stray allocation from the runtime amortised over the run.
		if a := res.AllocsPerOp(); a != 0 {
			t.Fatalf("UDP fast path (direct=%v) allocates %d times per datagram, want 0", direct, a)
		}
	}
}
