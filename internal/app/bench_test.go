package app_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/internal/testutil"
)

// Whole-appliance benchmarks on the harness: a client Stack, the pipe
// link, natbox (netstack + forwarder) and a loopback target, all in this
// process, so cpu-us figures include the client stack's and the target's
// share. They compare a change before and after, not natbox with anything.

// BenchmarkGatewayUDP offers 1400-byte datagrams from one client at
// 1 Gbit/s (bursts of 9 every 100 µs) to a UDP mapping whose target counts
// them: %delivered, and process CPU per datagram offered.
//
//	go test -run '^$' -bench GatewayUDP -benchtime 90000x ./internal/app
func BenchmarkGatewayUDP(b *testing.B) {
	var got atomic.Int64
	target := serveUDP(b, func(_ netip.AddrPort, p []byte) []byte { got.Add(1); return nil })
	h := newHarness(b, spec{Mappings: mapping("u", "udp", "5300", target.String())}, app.Options{})
	from, to := ap(client4, 40000), ap(public4, 5300)
	payload := make([]byte, 1400)
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	cpu0 := processCPU(b)
	start := time.Now()
	i := 0
	for b.Loop() {
		h.client.WriteUDP(from, to, payload)
		if i++; i%9 == 0 {
			for time.Since(start) < time.Duration(i/9)*100*time.Microsecond {
				time.Sleep(20 * time.Microsecond)
			}
		}
	}
	for last := int64(-1); last != got.Load(); {
		last = got.Load()
		time.Sleep(50 * time.Millisecond)
	}
	b.ReportMetric(float64((processCPU(b)-cpu0).Nanoseconds())/1e3/float64(b.N), "cpu-us/dgram")
	b.ReportMetric(100*float64(got.Load())/float64(b.N), "%delivered")
	// The part of the loss at the forwarder's session queue (the rest is
	// the link's and the target socket's).
	b.ReportMetric(100*float64(h.mappingStatus("u").UDPDropped)/float64(b.N), "%dropped-forwarder")
}

// BenchmarkGatewayUDPRR is a 64-byte UDP ping-pong through a UDP mapping to
// an echo target, a game's or a call's traffic: ns/op is one round trip.
//
//	go test -run '^$' -bench GatewayUDPRR -benchtime 20000x ./internal/app
func BenchmarkGatewayUDPRR(b *testing.B) {
	target := serveUDP(b, func(_ netip.AddrPort, p []byte) []byte { return p })
	h := newHarness(b, spec{Mappings: mapping("urr", "udp", "5301", target.String())}, app.Options{})
	from, to := ap(client4, 40001), ap(public4, 5301)
	inbox := h.inbox.of(from)
	msg := make([]byte, 64)
	b.ReportAllocs()
	cpu0 := processCPU(b)
	for b.Loop() {
		if err := h.client.WriteUDP(from, to, msg); err != nil {
			b.Fatal(err)
		}
		select {
		case <-inbox:
		case <-time.After(5 * time.Second):
			b.Fatal("no reply within 5 s")
		}
	}
	b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
}

// BenchmarkGatewayRR is a 64-byte ping-pong through a TCP mapping to an
// echo target: ns/op is one round trip.
//
//	go test -run '^$' -bench GatewayRR -benchtime 20000x ./internal/app
func BenchmarkGatewayRR(b *testing.B) {
	target := serveTCP(b, func(c *net.TCPConn) { io.Copy(c, c) })
	h := newHarness(b, spec{Mappings: mapping("rr", "tcp", "8300", target.String())}, app.Options{})
	c, err := h.client.DialTCP(context.Background(), ap(client4, 0), ap(public4, 8300))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	msg, buf := make([]byte, 64), make([]byte, 64)
	c.SetDeadline(time.Now().Add(time.Minute))
	b.ReportAllocs()
	st0, cpu0 := h.client.Stats(), processCPU(b)
	for b.Loop() {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
	// Packets natbox sent the client per round trip: the reply, and a
	// pure ACK of the request when natbox acknowledged it on its own.
	b.ReportMetric(float64(h.client.Stats().PacketsIn-st0.PacketsIn)/float64(b.N), "pkts-to-client/op")
}

// BenchmarkGatewayChurn is pmbench crr through a TCP mapping: connect,
// one byte each way, the target closes first; 32 clients at once. ns/op is
// one connection.
//
//	go test -run '^$' -bench GatewayChurn -benchtime 10000x ./internal/app
func BenchmarkGatewayChurn(b *testing.B) {
	target := serveTCP(b, func(c *net.TCPConn) {
		buf := make([]byte, 1)
		if _, err := io.ReadFull(c, buf); err == nil {
			c.Write(buf)
		}
	})
	h := newHarness(b, spec{
		Limits:   "new_sessions_per_source_per_second = 0\nmax_tcp_sessions_per_source = 0",
		Mappings: mapping("crr", "tcp", "8200", target.String()),
	}, app.Options{})
	var port atomic.Uint32
	var failed atomic.Int64
	b.SetParallelism(16)
	b.ReportAllocs()
	st0, cpu0 := h.client.Stats(), processCPU(b)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			// 2000 source ports, reused as TestConnectionChurn does.
			src := ap(client4, uint16(20000+port.Add(1)%2000))
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			c, err := h.client.DialTCP(ctx, src, ap(public4, 8200))
			cancel()
			if err == nil {
				err = testutil.OneByteExchange(c)
			}
			if err != nil {
				failed.Add(1)
			}
		}
	})
	b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
	// Packets each way per connection: what natbox's link writes and reads
	// (on a kernel TUN, one system call each).
	st := h.client.Stats()
	b.ReportMetric(float64(st.PacketsIn-st0.PacketsIn)/float64(b.N), "pkts-to-client/op")
	b.ReportMetric(float64(st.PacketsOut-st0.PacketsOut)/float64(b.N), "pkts-from-client/op")
	if n := failed.Load(); n > 0 {
		b.Fatalf("%d of %d connections failed", n, b.N)
	}
}

// processCPU is the process's user and system CPU time so far.
