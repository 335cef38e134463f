package netstack

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// delayLine moves packets from one Direct pair's outer side to the other's
// after oneWay, losing each with probability loss (seeded: runs repeat),
// as a WAN path does; it returns when from closes. Packets past its
// 64k-packet queue are dropped as well (a full router queue).
func delayLine(from, to tun.Device, oneWay time.Duration, loss float64, seed uint64) {
	type held struct {
		due time.Time
		p   []byte
	}
	q := make(chan held, 1<<16)
	defer close(q)
	go func() {
		for h := range q {
			if w := time.Until(h.due); w > 0 {
				time.Sleep(w)
			}
			to.Write([][]byte{h.p}, wgOffset)
		}
	}()
	rng := rand.New(rand.NewPCG(seed, seed+1))
	linePackets(from, func(framed []byte) bool {
		if rng.Float64() < loss {
			return true
		}
		select {
		case q <- held{time.Now().Add(oneWay), append([]byte(nil), framed...)}:
		default:
		}
		return true
	})
}

// linePackets reads from's packets in batches and hands each to f with
// wgOffset bytes of headroom before it, until from fails or f returns
// false. f must not keep framed.
func linePackets(from tun.Device, f func(framed []byte) bool) {
	bufs := make([][]byte, wgBatch)
	for i := range bufs {
		bufs[i] = make([]byte, wgBufLen)
	}
	sizes := make([]int, wgBatch)
	for {
		n, err := from.Read(bufs, sizes, wgOffset)
		if err != nil {
			return
		}
		for i := range n {
			if !f(bufs[i][:wgOffset+sizes[i]]) {
				return
			}
		}
	}
}

// BenchmarkLossyLine: one 64 MiB upload per op between two stacks (gVisor's
// TCP at both ends, as inside the relay's tunnel) over a line of a 20 ms
// round trip that loses one packet in 10 000, with each of gVisor's
// congestion controls and with reno's losses found by RACK as well;
// reports Mbit/s and the sender's resends. Where the
// tunnel's flows stand on a lossy path (tunnel/BENCH.md change 17):
//
//	go test -run '^$' -bench LossyLine -benchtime 1x -count 3 ./netstack
//
// (64 MiB: long enough for a flow to leave slow start and settle where the
// losses hold it; each run's line has seeds of its own.)
func BenchmarkLossyLine(b *testing.B) {
	for _, v := range []struct {
		cc   string
		rack bool
	}{{"reno", false}, {"reno", true}, {"cubic", false}} {
		for _, loss := range []float64{0, 0.0001} {
			b.Run(fmt.Sprintf("cc=%s/rack=%t/loss=%g", v.cc, v.rack, loss), func(b *testing.B) {
				benchLossyLine(b, v.cc, v.rack, loss)
			})
		}
	}
}

// lossyLineRuns numbers the runs, for their lines' seeds.
var lossyLineRuns atomic.Uint64

func benchLossyLine(b *testing.B, cc string, rack bool, loss float64) {
	const size = 64 << 20
	cs, co := Direct(1420)
	ss, so := Direct(1420)
	log := zaptest.NewLogger(b, zaptest.Level(zap.WarnLevel))
	got := make(chan int64, 1)
	c, err := New(cs, Config{MTU: 1420, Addresses: []netip.Prefix{clientPrefix4}, TCP: TCPConfig{RACK: rack}}, funcHandler{}, log.Named("client"))
	if err != nil {
		b.Fatal(err)
	}
	s, err := New(ss, Config{MTU: 1420, Addresses: []netip.Prefix{serverPrefix4}, TCP: TCPConfig{RACK: rack}}, sinkServer(got), log.Named("server"))
	if err != nil {
		c.Close()
		b.Fatal(err)
	}
	opt := tcpip.CongestionControlOption(cc)
	if terr := c.stack.SetTransportProtocolOption(tcp.ProtocolNumber, &opt); terr != nil {
		b.Fatalf("congestion control %s: %v", cc, terr)
	}
	done := make(chan struct{}, 2)
	seed := 2 * lossyLineRuns.Add(1)
	go func() { delayLine(co, so, 10*time.Millisecond, loss, seed); done <- struct{}{} }()
	go func() { delayLine(so, co, 10*time.Millisecond, loss, seed+1); done <- struct{}{} }()
	b.Cleanup(func() { s.Close(); c.Close(); <-done; <-done })
	runStack(b, c)
	runStack(b, s)
	before := c.Stats().TCPRetransmits
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if err := upload(b, c, netip.AddrPort{}, netip.AddrPortFrom(serverPrefix4.Addr(), 9), size); err != nil {
			b.Fatal(err)
		}
		waitSunk(b, got, 1, size)
	}
	secs := time.Since(start).Seconds()
	b.ReportMetric(float64(b.N)*size*8/secs/1e6, "Mbit/s")
	b.ReportMetric(float64(c.Stats().TCPRetransmits-before)/float64(b.N), "resends/op")
}
