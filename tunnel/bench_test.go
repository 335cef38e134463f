package tunnel_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/testutil"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/netstack"
)

// The relay benchmarks run everything in one process: a loopback client, the
// relay (host sockets, gVisor stack, wireguard-go), loopback UDP between two
// wireguard-go devices, the appliance (wireguard-go, gVisor stack,
// forwarder) and a target on 127.0.0.1. CPU and memory figures therefore
// cover both sides plus the kernel work of the client and the target; see
// tunnel/BENCH.md.

// benchTCPService serves one TCP behaviour on 127.0.0.1.
type benchTCPService func(c *net.TCPConn)

var (
	// serveSink discards everything and closes after EOF, which tells the
	// sender every byte arrived.
	serveSink benchTCPService = func(c *net.TCPConn) { io.Copy(io.Discard, c) }
	// serveEchoByte answers one byte with one byte, then waits for EOF.
	serveEchoByte benchTCPService = func(c *net.TCPConn) {
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return
		}
		if _, err := c.Write(b[:]); err != nil {
			return
		}
		io.Copy(io.Discard, c)
	}
)

// serveSource writes n bytes, then closes.
func serveSource(n int) benchTCPService {
	return func(c *net.TCPConn) {
		buf := make([]byte, 256<<10)
		for sent := 0; sent < n; sent += len(buf) {
			if _, err := c.Write(buf[:min(len(buf), n-sent)]); err != nil {
				return
			}
		}
	}
}

// tcpService listens on 127.0.0.1 and runs serve for each connection.
func tcpService(b testing.TB, serve benchTCPService) uint16 {
	return testutil.ServeTCP(b, "127.0.0.1:0", func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		serve(c)
	}).Port()
}

// udpCounter counts datagrams arriving on a 127.0.0.1 socket.
type udpCounter struct {
	port    uint16
	packets atomic.Uint64
	bytes   atomic.Uint64
}

func udpCountService(b *testing.B) *udpCounter {
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	pc.SetReadBuffer(4 << 20)
	u := &udpCounter{port: uint16(pc.LocalAddr().(*net.UDPAddr).Port)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64<<10)
		for {
			n, _, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			u.packets.Add(1)
			u.bytes.Add(uint64(n))
		}
	}()
	b.Cleanup(func() { pc.Close(); <-done })
	return u
}

// benchTarget is one mapping of the bench appliance: proto and the target
// port on 127.0.0.1.
type benchTarget struct {
	proto string
	port  uint16
}

// relayPath starts a relay and an appliance on loopback with one mapping
// per target and returns the relay's public address for each, in order.
func relayPath(b testing.TB, targets ...benchTarget) []string {
	public, _ := relayPathAppliance(b, targets...)
	return public
}

func relayPathAppliance(b testing.TB, targets ...benchTarget) ([]string, *appliance) {
	key := mustKey(b)
	var specs, mappings []string
	var public []string
	for i, t := range targets {
		port := freePort(b, false)
		specs = append(specs, fmt.Sprintf("%s/%d", t.proto, port))
		mappings = append(mappings, fmt.Sprintf(`
[[mapping]]
name = "m%d"
protocol = %q
listen = "%d"
target = "127.0.0.1:%d"
`, i, t.proto, port, t.port))
		public = append(public, netip.AddrPortFrom(loopback4, port).String())
	}
	relay := startRelay(b, relayConfig(mustKey(b), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: key.Public(), Address: applAddrA, Ports: mustSpecs(b, specs...)},
	), zap.NewNop())
	// One load generator is one source: the appliance's per-source budgets
	// (flood defences) would cap its connection rate, as bench/relay.sh says.
	limits := `
[limits]
max_tcp_sessions_per_source = 0
max_udp_sessions_per_source = 0
new_sessions_per_source_per_second = 0
`
	a := startAppliance(b, relay, key, applAddrA, limits+strings.Join(mappings, ""))
	waitRegistered(b, a, specs...)
	return public, a
}

// resources measures what a benchmark cost the whole process: CPU time
// (getrusage), peak RSS (VmHWM, reset at start through clear_refs) and peak
// live heap (sampled every 10 ms).
type resources struct {
	start    time.Time
	cpu      time.Duration
	stop     chan struct{}
	done     chan struct{}
	peakHeap atomic.Uint64
}

func startResources(b *testing.B) *resources {
	// Start from what is live now, not what earlier benchmarks left mapped.
	debug.FreeOSMemory()
	// "5" resets the peak RSS to the current RSS (Linux >= 4.0); without it
	// the figure is the process's peak since start.
	_ = os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
	r := &resources{start: time.Now(), cpu: cpuTime(b), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		profile := os.Getenv("NATBOX_BENCH_HEAPPROFILE")
		for {
			metrics.Read(sample)
			if v := sample[0].Value.Uint64(); v > r.peakHeap.Load() {
				if profile != "" && v > r.peakHeap.Load()+r.peakHeap.Load()/20 {
					writeHeapProfile(profile)
				}
				r.peakHeap.Store(v)
			}
			select {
			case <-r.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return r
}

// report stops sampling and reports Gbit/s and CPU seconds per GiB for
// bytes moved (if any), process cores used, and the memory peaks.
func (r *resources) report(b *testing.B, bytes int64) {
	elapsed := time.Since(r.start)
	cpu := cpuTime(b) - r.cpu
	close(r.stop)
	<-r.done
	b.StopTimer()
	if bytes > 0 {
		b.ReportMetric(float64(bytes)*8/elapsed.Seconds()/1e9, "Gbit/s")
		b.ReportMetric(cpu.Seconds()/(float64(bytes)/(1<<30)), "cpu-s/GiB")
	}
	b.ReportMetric(cpu.Seconds()/elapsed.Seconds(), "cores")
	b.ReportMetric(float64(r.peakHeap.Load())/(1<<20), "peak-heap-MiB")
	if hwm := vmHWM(); hwm > 0 {
		b.ReportMetric(float64(hwm)/(1<<20), "peak-RSS-MiB")
	}
}

// writeHeapProfile writes the heap profile (as of the last collection) to
// path: NATBOX_BENCH_HEAPPROFILE names it, rewritten at each new peak.
func writeHeapProfile(path string) {
	if f, err := os.Create(path); err == nil {
		pprof.WriteHeapProfile(f)
		f.Close()
	}
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// vmHWM returns the process's peak RSS in bytes, or 0 if unknown.
func vmHWM() int64 {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}

// sendAll writes n bytes to c, half-closes, and waits for the far end to
// close (the sink has read everything).
func sendAll(c *net.TCPConn, n int, buf []byte) error {
	for sent := 0; sent < n; sent += len(buf) {
		if _, err := c.Write(buf[:min(len(buf), n-sent)]); err != nil {
			return fmt.Errorf("write after %d bytes: %w", sent, err)
		}
	}
	c.CloseWrite()
	if _, err := io.Copy(io.Discard, c); err != nil {
		return fmt.Errorf("wait for the sink: %w", err)
	}
	return nil
}

func dialBench(public string) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp", public, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	return c.(*net.TCPConn), nil
}

// BenchmarkRelayTCPThroughput measures one TCP flow from a loopback client
// to the relay's public port, through wireguard-go over loopback UDP, into
// the appliance's netstack and forwarder, to a sink on 127.0.0.1. Each
// iteration moves 32 MiB on a new connection and waits until the sink has
// read all of it.
func BenchmarkRelayTCPThroughput(b *testing.B) {
	const perConn = 32 << 20
	public := relayPath(b, benchTarget{"tcp", tcpService(b, serveSink)})[0]
	buf := make([]byte, 256<<10)

	b.SetBytes(perConn)
	b.ReportAllocs()
	res := startResources(b)
	var moved int64
	for b.Loop() {
		c, err := dialBench(public)
		if err != nil {
			b.Fatal(err)
		}
		if err := sendAll(c, perConn, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
		moved += perConn
	}
	res.report(b, moved)
}

// BenchmarkRelayTCPReverse is BenchmarkRelayTCPThroughput the other way:
// the target sends 32 MiB per connection to the client.
func BenchmarkRelayTCPReverse(b *testing.B) {
	const perConn = 32 << 20
	public := relayPath(b, benchTarget{"tcp", tcpService(b, serveSource(perConn))})[0]

	b.SetBytes(perConn)
	b.ReportAllocs()
	res := startResources(b)
	var moved int64
	for b.Loop() {
		c, err := dialBench(public)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, c)
		c.Close()
		if err != nil || n != perConn {
			b.Fatalf("received %d of %d bytes: %v", n, perConn, err)
		}
		moved += n
	}
	res.report(b, moved)
}

// BenchmarkRelayTCP4Flows runs four client-to-target flows at once through
// the same tunnel; each iteration moves 4 x 16 MiB.
func BenchmarkRelayTCP4Flows(b *testing.B) {
	const flows, perFlow = 4, 16 << 20
	public := relayPath(b, benchTarget{"tcp", tcpService(b, serveSink)})[0]
	bufs := make([][]byte, flows)
	for i := range bufs {
		bufs[i] = make([]byte, 256<<10)
	}

	b.SetBytes(flows * perFlow)
	b.ReportAllocs()
	res := startResources(b)
	var moved int64
	for b.Loop() {
		var wg sync.WaitGroup
		errs := make([]error, flows)
		for i := range flows {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := dialBench(public)
				if err != nil {
					errs[i] = err
					return
				}
				defer c.Close()
				errs[i] = sendAll(c, perFlow, bufs[i])
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			b.Fatal(err)
		}
		moved += flows * perFlow
	}
	res.report(b, moved)
}

// BenchmarkRelayTCPConnRate measures connections per second through the
// relay: each operation connects, sends one byte, reads the echoed byte and
// closes, with 8 clients at once. Every failure is counted and fails the
// benchmark: none is expected.
func BenchmarkRelayTCPConnRate(b *testing.B) {
	publics, a := relayPathAppliance(b, benchTarget{"tcp", tcpService(b, serveEchoByte)})
	public := publics[0]
	var failures atomic.Int64
	var firstErr atomic.Value
	oneConn := func() error {
		c, err := net.DialTimeout("tcp", public, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte{'x'}); err != nil {
			return err
		}
		var got [1]byte
		if _, err := io.ReadFull(c, got[:]); err != nil {
			return fmt.Errorf("read echo: %w", err)
		}
		if got[0] != 'x' {
			return fmt.Errorf("echo %q, want %q", got[0], 'x')
		}
		return nil
	}

	b.SetParallelism(4) // 8 clients on 2 cores
	res := startResources(b)
	st0 := a.stack.Stats()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := oneConn(); err != nil {
				failures.Add(1)
				firstErr.CompareAndSwap(nil, fmt.Sprint(err))
			}
		}
	})
	elapsed, cpu := time.Since(res.start), cpuTime(b)-res.cpu
	res.report(b, 0)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "conn/s")
	// CPU per connection carries to an idle machine better than conn/s
	// does on a shared one: 2 cores / this = the rate 2 free cores allow.
	b.ReportMetric(cpu.Seconds()*1e3/float64(b.N), "cpu-ms/conn")
	reportTunnelPackets(b, st0, a.stack.Stats())
	b.ReportMetric(float64(failures.Load()), "failures")
	if n := failures.Load(); n > 0 {
		b.Errorf("%d of %d connections failed; first: %v", n, b.N, firstErr.Load())
	}
}

// BenchmarkRelayRR is a 64-byte ping-pong through the relay to an echo
// target, one connection: ns/op is one round trip.
//
//	go test -run '^$' -bench RelayRR -benchtime 20000x ./tunnel
func BenchmarkRelayRR(b *testing.B) {
	publics, a := relayPathAppliance(b, benchTarget{"tcp", tcpService(b, func(c *net.TCPConn) { io.Copy(c, c) })})
	c, err := net.DialTimeout("tcp", publics[0], 5*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	msg, buf := make([]byte, 64), make([]byte, 64)
	roundTrip := func() {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
	roundTrip() // the relayed connection is up end to end
	st0, cpu0 := a.stack.Stats(), cpuTime(b)
	b.ResetTimer()
	for range b.N {
		roundTrip()
	}
	b.StopTimer()
	b.ReportMetric(float64((cpuTime(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
	reportTunnelPackets(b, st0, a.stack.Stats())
}

// reportTunnelPackets reports the packets the appliance's tunnel stack
// sent and received per operation: each one is encrypted, sent, received
// and decrypted once, and handled by both stacks.
func reportTunnelPackets(b *testing.B, before, after netstack.Stats) {
	b.ReportMetric(float64(after.PacketsIn-before.PacketsIn)/float64(b.N), "tunnel-pkts-in/op")
	b.ReportMetric(float64(after.PacketsOut-before.PacketsOut)/float64(b.N), "tunnel-pkts-out/op")
}

// BenchmarkRelayUDP200Mbit offers 200 Mbit/s of 1200-byte datagrams from one
// client through the relay to a counting target for 3 s per iteration, then
// waits up to 1 s for stragglers, and reports what was delivered and lost.
func BenchmarkRelayUDP200Mbit(b *testing.B) {
	const (
		size     = 1200
		rate     = 200e6 / 8 / size // datagrams per second
		duration = 3 * time.Second
	)
	sink := udpCountService(b)
	addrs, appl := relayPathAppliance(b, benchTarget{"udp", sink.port})
	public := addrs[0]
	c, err := net.Dial("udp4", public)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	payload := bytes.Repeat([]byte{'u'}, size)
	// The first datagram opens the sessions on both sides; wait for it.
	c.Write(payload)
	waitFor(b, 10*time.Second, "first datagram through the relay", func() bool { return sink.packets.Load() > 0 })

	var sent, delivered uint64
	var sending time.Duration
	sockDrops, fwdDrops := udpSocketDrops(), forwarderUDPDrops(appl)
	res := startResources(b)
	for b.Loop() {
		before := sink.packets.Load()
		start := time.Now()
		n := uint64(0)
		for elapsed := time.Duration(0); elapsed < duration; elapsed = time.Since(start) {
			for due := uint64(elapsed.Seconds() * rate); n < due; n++ {
				if _, err := c.Write(payload); err != nil {
					b.Fatalf("send: %v", err) // loopback UDP does not fail; a failure is a bug
				}
			}
			time.Sleep(500 * time.Microsecond)
		}
		sending += time.Since(start)
		last, stable := sink.packets.Load(), time.Now()
		for deadline := time.Now().Add(time.Second); time.Now().Before(deadline) && time.Since(stable) < 100*time.Millisecond; {
			time.Sleep(10 * time.Millisecond)
			if cur := sink.packets.Load(); cur != last {
				last, stable = cur, time.Now()
			}
		}
		sent += n
		delivered += last - before
	}
	res.report(b, 0)
	b.ReportMetric(float64(delivered)*size*8/sending.Seconds()/1e6, "delivered-Mbit/s")
	b.ReportMetric(100*(1-float64(delivered)/float64(sent)), "loss-%")
	// Where the loss happened: kernel socket buffers of this process (the
	// relay's public socket, both WireGuard sockets, the target's), or the
	// appliance forwarder's per-session queue.
	b.ReportMetric(100*float64(udpSocketDrops()-sockDrops)/float64(sent), "sock-drop-%")
	b.ReportMetric(100*float64(forwarderUDPDrops(appl)-fwdDrops)/float64(sent), "fwd-drop-%")
}

func forwarderUDPDrops(a *appliance) uint64 {
	var n uint64
	for _, m := range a.engine.Snapshot().Mappings {
		n += m.UDPDropped
	}
	return n
}

// udpSocketDrops sums the kernel's drop counters of this process's UDP
// sockets (the last column of /proc/net/udp and udp6, matched by inode).
func udpSocketDrops() uint64 {
	inodes := make(map[string]bool)
	fds, _ := os.ReadDir("/proc/self/fd")
	for _, fd := range fds {
		if l, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil {
			if inode, ok := strings.CutPrefix(l, "socket:["); ok {
				inodes[strings.TrimSuffix(inode, "]")] = true
			}
		}
	}
	var n uint64
	for _, table := range []string{"/proc/net/udp", "/proc/net/udp6"} {
		text, _ := os.ReadFile(table)
		for line := range strings.Lines(string(text)) {
			f := strings.Fields(line)
			if len(f) < 13 || !inodes[f[9]] {
				continue
			}
			d, _ := strconv.ParseUint(f[len(f)-1], 10, 64)
			n += d
		}
	}
	return n
}
