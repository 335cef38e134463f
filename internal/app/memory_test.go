package app_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/internal/testutil"
	"github.com/natbox/natbox/netstack"
)

// stalledSink is a TCP target on 127.0.0.1 with tiny socket buffers that
// reads nothing until release is closed, then counts every connection's
// bytes until EOF.
type stalledSink struct {
	addr    string
	release chan struct{}
	once    sync.Once
	mu      sync.Mutex
	got     []int64 // bytes per finished connection
	done    chan struct{}
	n       int
}

func newStalledSink(t testing.TB, n int) *stalledSink {
	lc := net.ListenConfig{Control: testutil.SmallSocketBuffers}
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &stalledSink{addr: ln.Addr().String(), release: make(chan struct{}), done: make(chan struct{}), n: n}
	testutil.ServeListener(t, ln, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		select {
		case <-s.release:
		case <-s.done:
			return
		}
		n, _ := io.Copy(io.Discard, c)
		s.mu.Lock()
		s.got = append(s.got, n)
		s.mu.Unlock()
	})
	// Runs before ServeListener's cleanup (the listener's close and the
	// wait for the handlers): a handler still held waits for done.
	t.Cleanup(func() {
		s.open()
		close(s.done)
	})
	return s
}

// open lets the sink read.
func (s *stalledSink) open() { s.once.Do(func() { close(s.release) }) }

func (s *stalledSink) finished() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int64(nil), s.got...)
}

// liveHeap returns the live heap after a full collection.
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC() // the second empties what sync.Pools kept from the first
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// heapPeak samples the heap's objects (live and not yet collected) every
// 5 ms until stop is called, which returns the peak.
func heapPeak() (stop func() uint64) {
	var peak atomic.Uint64
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			metrics.Read(s)
			if v := s[0].Value.Uint64(); v > peak.Load() {
				peak.Store(v)
			}
			select {
			case <-quit:
				return
			case <-tick.C:
			}
		}
	}()
	return func() uint64 { close(quit); <-done; return peak.Load() }
}

// writeBuf is each client flow's write buffer (the test's own memory).
const writeBuf = 32 << 10

// bulkResult is what driveStalledFlows measured.
type bulkResult struct {
	baseline, stalled, peak uint64 // live heap before, live heap with every flow stalled, sampled peak
	written                 int64  // bytes the clients had written when the heap was measured
	status                  admin.Status
}

// queueSettled is driveStalledFlows' backedUp for flows held by a buffer
// budget: the TUN stack holds at least 2 KiB for each flow, and that total
// has not moved for 300 ms, so every flow has stalled against its window.
// (How a flow's bytes in flight split between the client, natbox and the
// target's small socket buffers varies: a fixed 4 KiB a flow, about 10 KiB
// being what a 16 KiB window holds, once settled 3 % under it on a loaded
// host and the wait timed out.)
func queueSettled(flows int) func(admin.Status, int64) bool {
	var last int64 = -1
	var since time.Time
	return func(st admin.Status, _ int64) bool {
		q := st.Netstack["tun"].Gauges["tcp_recv_queued"]
		if q != last {
			last, since = q, time.Now()
			return false
		}
		return q >= int64(flows)*(2<<10) && time.Since(since) >= 300*time.Millisecond
	}
}

// driveStalledFlows opens n client flows through the appliance to a sink
// that reads nothing, each writing size bytes; once backedUp says the flows
// are backed up into natbox (given the status and the bytes the clients
// wrote), it measures the live heap and the status, then lets the sink
// read and checks that every flow delivered all its bytes.
func driveStalledFlows(tb testing.TB, h *harness, sink *stalledSink, port uint16, n, size int, backedUp func(st admin.Status, written int64) bool) bulkResult {
	var r bulkResult
	r.baseline = liveHeap()
	stopPeak := heapPeak()
	var wg sync.WaitGroup
	var written atomic.Int64
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := h.dial(ap(client4, 0), ap(public4, port))
			if err != nil {
				errs <- fmt.Errorf("flow %d: dial: %w", i, err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Minute))
			buf := make([]byte, writeBuf)
			for sent := 0; sent < size; sent += len(buf) {
				nw, err := c.Write(buf[:min(len(buf), size-sent)])
				written.Add(int64(nw))
				if err != nil {
					errs <- fmt.Errorf("flow %d: write after %d bytes: %w", i, sent, err)
					return
				}
			}
			c.(netstack.TCPConn).CloseWrite()
			if _, err := io.Copy(io.Discard, c); err != nil {
				errs <- fmt.Errorf("flow %d: wait for close: %w", i, err)
			}
		}()
	}
	cl, err := admin.Dial(h.socket)
	if err != nil {
		tb.Fatal(err)
	}
	defer cl.Close()
	status := func() admin.Status {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := cl.Status(ctx)
		if err != nil {
			tb.Fatalf("status: %v", err)
		}
		return st
	}
	var last admin.Status
	tb.Cleanup(func() { // what a timeout leaves to go on
		if tb.Failed() && last.Netstack != nil {
			g, c := last.Netstack["tun"].Gauges, last.Netstack["tun"].Counters
			tb.Logf("last status: tcp_conns %d of %d, tcp_recv_queued %d, tcp_buffer_cuts %d, tcp_buffer_thaws %d; clients wrote %d bytes; sink finished %d",
				g["tcp_conns"], n, g["tcp_recv_queued"], c["tcp_buffer_cuts"], c["tcp_buffer_thaws"], written.Load(), len(sink.finished()))
		}
	})
	waitFor(tb, 60*time.Second, "the flows to back up into natbox", func() bool {
		last = status()
		return last.Netstack["tun"].Gauges["tcp_conns"] == int64(n) && backedUp(last, written.Load())
	})
	r.written = written.Load()
	r.stalled = liveHeap()
	// NATBOX_TEST_HEAPPROFILE=FILE: a heap profile of the backed-up state.
	if p := os.Getenv("NATBOX_TEST_HEAPPROFILE"); p != "" {
		if f, err := os.Create(p); err == nil {
			pprof.WriteHeapProfile(f)
			f.Close()
		}
	}
	r.status = status()
	sink.open()
	wg.Wait()
	r.peak = stopPeak()
	close(errs)
	for err := range errs {
		tb.Error(err)
	}
	waitFor(tb, 30*time.Second, "every target connection to finish", func() bool { return len(sink.finished()) == n })
	for i, got := range sink.finished() {
		if got != int64(size) {
			tb.Errorf("target connection %d received %d bytes, want %d", i, got, size)
		}
	}
	return r
}

// TestBufferBudgetBoundsStalledFlows drives 100 bulk flows through the
// gateway into targets that stop reading, so every byte in flight backs up
// into natbox: without a budget each flow would hold its 1 MiB receive
// window plus a 64 KiB copy buffer (over 100 MiB). With buffer_memory =
// 8MiB the stack shares 6 MiB (16 KiB windows each way per flow) and the
// forwarder 2 MiB of copy buffers, so the live heap grows by the budget
// plus the flows' fixed costs and the client stack's buffers; the
// budget's counters show in status, and once the targets read, every flow
// delivers every byte.
func TestBufferBudgetBoundsStalledFlows(t *testing.T) {
	const (
		flows = 100
		size  = 512 << 10
	)
	sink := newStalledSink(t, flows)
	h := newHarness(t, spec{
		Limits:    `buffer_memory = "8MiB"` + "\nmax_inflight_per_source = 1000\nmax_tcp_sessions_per_source = 0\nnew_sessions_per_source_per_second = 0",
		Mappings:  mapping("bulk", "tcp", "9100", sink.addr),
		clientTCP: netstack.TCPConfig{BufferBudget: 4 << 20},
	}, app.Options{Dialer: &net.Dialer{Control: testutil.SmallSocketBuffers}})
	h.run()
	r := driveStalledFlows(t, h, sink, 9100, flows, size, queueSettled(flows))

	tun, fwd := r.status.Netstack["tun"], r.status.Forwarder
	if share := tun.Gauges["tcp_buffer_share"]; share != 16<<10 {
		t.Errorf("status: tcp_buffer_share = %d, want 16 KiB (6 MiB / 2 / 100, a power of two)", share)
	}
	if tun.Counters["tcp_buffer_cuts"] == 0 || tun.Counters["tcp_buffer_lowered"] == 0 {
		t.Errorf("status: tcp_buffer_cuts %d, tcp_buffer_lowered %d; want both > 0", tun.Counters["tcp_buffer_cuts"], tun.Counters["tcp_buffer_lowered"])
	}
	if q := uint64(tun.Gauges["tcp_recv_queued"]); q > flows*2*(16<<10) {
		t.Errorf("status: tcp_recv_queued = %d, above 100 windows of 16 KiB (with slack for the last segment)", q)
	}
	// Stack conn to kernel socket, the forwarder needs no copy buffers of
	// its own (netstack/zerocopy_linux.go).
	if b, used, denied := fwd.Gauges["buffer_budget_bytes"], fwd.Gauges["buffer_used_bytes"], fwd.Counters["buffer_denied"]; b != 2<<20 || used != 0 || denied != 0 {
		t.Errorf("status: forwarder buffer_budget_bytes %d, buffer_used_bytes %d, buffer_denied %d; want 2 MiB, 0, 0", b, used, denied)
	}
	// The flows were held back, not buffered: the clients could write only
	// a small part of their data.
	if r.written > flows*size/4 {
		t.Errorf("clients wrote %d of %d bytes before the flows stalled; the budget should have held them back", r.written, flows*size)
	}
	// The bound: the budget (8 MiB), the client stack's (4 MiB), the
	// clients' write buffers, and per flow its fixed costs on both stacks
	// and in the forwarder (endpoints, small copy buffers: under 64 KiB).
	grew := int64(r.stalled) - int64(r.baseline)
	bound := int64(8<<20 + 4<<20 + flows*writeBuf + flows*(64<<10))
	t.Logf("live heap %d -> %d MiB with %d stalled flows (grew %.1f MiB, bound %.1f MiB), sampled peak %d MiB",
		r.baseline>>20, r.stalled>>20, flows, float64(grew)/(1<<20), float64(bound)/(1<<20), r.peak>>20)
	if grew > bound {
		t.Errorf("live heap grew by %.1f MiB with %d stalled flows, above the bound of %.1f MiB", float64(grew)/(1<<20), flows, float64(bound)/(1<<20))
	}
	// Over the whole run, garbage included: the collector lets the heap
	// reach twice what was live.
	if limit := 2 * (r.baseline + uint64(bound)); r.peak > limit {
		t.Errorf("heap peaked at %d MiB, above twice the live bound (%d MiB)", r.peak>>20, limit>>20)
	}
}

// BenchmarkGatewayStalledFlows is TestBufferBudgetBoundsStalledFlows
// without and with a budget, reporting how much the live heap grew with
// 100 flows of 512 KiB backed up into natbox. Without a budget the data
// fits the 1 MiB windows, so the flows are backed up once the clients
// wrote everything; with one, once the windows hold 4 KiB per flow.
//
//	go test -run '^$' -bench GatewayStalledFlows -benchtime 1x ./internal/app
func BenchmarkGatewayStalledFlows(b *testing.B) {
	const flows, size = 100, 512 << 10
	for _, budget := range []string{"0", "8MiB", "32MiB"} {
		b.Run("buffer_memory="+budget, func(b *testing.B) {
			var grew, peak float64
			for b.Loop() {
				sink := newStalledSink(b, flows)
				h := newHarness(b, spec{
					Limits:    fmt.Sprintf("buffer_memory = %q\nmax_inflight_per_source = 1000\nmax_tcp_sessions_per_source = 0\nnew_sessions_per_source_per_second = 0", budget),
					Mappings:  mapping("bulk", "tcp", "9100", sink.addr),
					clientTCP: netstack.TCPConfig{BufferBudget: 4 << 20},
				}, app.Options{Dialer: &net.Dialer{Control: testutil.SmallSocketBuffers}})
				h.run()
				settled := queueSettled(flows)
				r := driveStalledFlows(b, h, sink, 9100, flows, size, func(st admin.Status, written int64) bool {
					if budget == "0" {
						return written == flows*size
					}
					return settled(st, written)
				})
				grew += float64(int64(r.stalled)-int64(r.baseline)) / (1 << 20)
				peak += float64(r.peak) / (1 << 20)
			}
			b.ReportMetric(grew/float64(b.N), "live-grew-MiB")
			b.ReportMetric(peak/float64(b.N), "peak-heap-MiB")
		})
	}
}

// BenchmarkGatewayBulk moves flows x 32 MiB per iteration through the whole
// appliance (client stack, TUN stack, forwarder, a loopback target), in (to
// the target) or out (from it), with the default buffer_memory, and reports
// Gbit/s, CPU seconds per GiB and the heap: the sampled peak of objects and
// of what the collector found live. The client stack has a 4 MiB budget of
// its own, so the figures are mostly the appliance's. NATBOX_BENCH_MEMLIMIT
// (bytes) sets a soft memory limit for the run, to compare.
//
//	go test -run '^$' -bench GatewayBulk -benchtime 4x ./internal/app
func BenchmarkGatewayBulk(b *testing.B) {
	for _, dir := range []string{"in", "out"} {
		for _, flows := range []int{1, 4} {
			b.Run(fmt.Sprintf("%s/flows=%d", dir, flows), func(b *testing.B) {
				benchmarkGatewayBulk(b, dir == "out", flows)
			})
		}
	}
}

func benchmarkGatewayBulk(b *testing.B, out bool, flows int) {
	const perFlow = 32 << 20
	if v := os.Getenv("NATBOX_BENCH_MEMLIMIT"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			b.Fatal(err)
		}
		old := debug.SetMemoryLimit(n)
		defer debug.SetMemoryLimit(old)
	}
	target := serveTCP(b, func(c *net.TCPConn) {
		if out {
			buf := make([]byte, 64<<10)
			for sent := 0; sent < perFlow; sent += len(buf) {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
			return
		}
		io.Copy(io.Discard, c)
	})
	h := newHarness(b, spec{
		Limits:    "max_inflight_per_source = 1000\nmax_tcp_sessions_per_source = 0\nnew_sessions_per_source_per_second = 0",
		Mappings:  mapping("bulk", "tcp", "9200", target.String()),
		clientTCP: netstack.TCPConfig{BufferBudget: 4 << 20},
	}, app.Options{})
	liveHeap()
	stopPeak := heapPeak()
	var live atomic.Uint64
	quit := make(chan struct{})
	go func() {
		s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
		for {
			metrics.Read(s)
			if v := s[0].Value.Uint64(); v > live.Load() {
				live.Store(v)
			}
			select {
			case <-quit:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	cpu0 := processCPU(b)
	start := time.Now()
	var moved atomic.Int64
	for b.Loop() {
		var wg sync.WaitGroup
		for range flows {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := h.dial(ap(client4, 0), ap(public4, 9200))
				if err != nil {
					b.Error(err)
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(2 * time.Minute))
				if out {
					n, err := io.Copy(io.Discard, c)
					moved.Add(n)
					if err != nil || n != perFlow {
						b.Errorf("received %d of %d bytes: %v", n, perFlow, err)
					}
					return
				}
				buf := make([]byte, 64<<10)
				for sent := 0; sent < perFlow; sent += len(buf) {
					n, err := c.Write(buf)
					moved.Add(int64(n))
					if err != nil {
						b.Error(err)
						return
					}
				}
				c.(netstack.TCPConn).CloseWrite()
				io.Copy(io.Discard, c)
			}()
		}
		wg.Wait()
	}
	el, cpu := time.Since(start), processCPU(b)-cpu0
	close(quit)
	peak := stopPeak()
	b.ReportMetric(float64(moved.Load())*8/el.Seconds()/1e9, "Gbit/s")
	b.ReportMetric(cpu.Seconds()/(float64(moved.Load())/(1<<30)), "cpu-s/GiB")
	b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
	b.ReportMetric(float64(live.Load())/(1<<20), "peak-live-MiB")
}

// processCPU returns the process's user and system CPU time so far.
func processCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
