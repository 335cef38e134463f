//go:build linux

package netstack

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// TestCreateTUNKernelTCP passes TCP from a kernel socket through a real TUN
// (IFF_VNET_HDR, TSO: the kernel sends 64 KiB frames that wireguard-go
// splits, and receives our segments re-coalesced) into a Stack and back. It
// runs in a network namespace it creates and removes; it needs root.
func TestCreateTUNKernelTCP(t *testing.T) {
	ns, dev := kernelTUN(t)
	if dev == nil {
		return
	}
	echoed := make(chan struct{}, 4)
	var s *Stack
	s, err := New(dev, Config{MTU: 1500, Addresses: []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24"), netip.MustParsePrefix("fd99::2/64")}},
		funcHandler{tcp: func(r *TCPRequest) {
			c, err := r.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			if r.Dst.Port() == chargenPort {
				c.Write(make([]byte, chargenSize))
				return
			}
			io.Copy(c, c)
			c.(closeWriter).CloseWrite()
			echoed <- struct{}{}
		}, udp: func(src, dst netip.AddrPort, p []byte) {
			// The kernel checks our checksums: a bad one never reaches the socket.
			s.WriteUDP(dst, src, append([]byte("re:"), p...))
		}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("new stack on tun: %v", err)
	}
	runStack(t, s)

	for _, target := range []string{"10.99.0.2:7", "10.99.0.77:7", "[fd99::2]:7"} {
		t.Run(target, func(t *testing.T) {
			var c net.Conn
			if err := inNetns(ns, func() (err error) {
				c, err = net.DialTimeout("tcp", target, 10*time.Second)
				return err
			}); err != nil {
				t.Fatalf("kernel dial %s: %v", target, err)
			}
			defer c.Close()
			const size = 8 << 20
			sent, got := sha256.New(), sha256.New()
			werr := make(chan error, 1)
			go func() {
				rng := rand.NewChaCha8([32]byte{2})
				buf := make([]byte, 128<<10)
				for left := size; left > 0; left -= len(buf) {
					rng.Read(buf)
					sent.Write(buf)
					if _, err := c.Write(buf); err != nil {
						werr <- err
						return
					}
				}
				werr <- c.(*net.TCPConn).CloseWrite()
			}()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			n, err := io.Copy(got, c)
			if err != nil || n != size {
				t.Fatalf("read back %d bytes, %v; want %d", n, err, size)
			}
			if err := <-werr; err != nil {
				t.Fatalf("write: %v", err)
			}
			if !bytes.Equal(sent.Sum(nil), got.Sum(nil)) {
				t.Fatal("echoed stream differs")
			}
			<-echoed
		})
	}
	t.Run("stack to kernel as TSO frames", func(t *testing.T) {
		// A one-way bulk transfer from the Stack: gVisor's 64 KiB segments
		// must leave as TSO frames (host GSO, a virtio-net header each) that
		// the kernel segments, many MTUs per write(2).
		var c net.Conn
		if err := inNetns(ns, func() (err error) {
			c, err = net.DialTimeout("tcp", fmt.Sprintf("10.99.0.2:%d", chargenPort), 10*time.Second)
			return err
		}); err != nil {
			t.Fatalf("kernel dial: %v", err)
		}
		defer c.Close()
		st0, sysw0 := s.Stats(), writeSyscalls(t)
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if n, err := io.Copy(io.Discard, c); err != nil || n != chargenSize {
			t.Fatalf("read %d bytes, %v; want %d", n, err, chargenSize)
		}
		// syscw also counts the Go runtime's wakeup writes, so this is a
		// lower bound on bytes per write.
		st, writes := s.Stats(), writeSyscalls(t)-sysw0
		bytes, frames := st.BytesOut-st0.BytesOut, st.GSOFramesOut-st0.GSOFramesOut
		t.Logf("%d bytes out in %d write(2)s, %d TSO frames", bytes, writes, frames)
		if writes == 0 || bytes < 8*1500*writes || frames == 0 {
			t.Errorf("%d bytes out in %d write(2)s (%d TSO frames): the Stack did not write TSO frames", bytes, writes, frames)
		}
	})
	for _, target := range []string{"10.99.0.2:53", "[fd99::2]:53"} {
		t.Run("udp "+target, func(t *testing.T) {
			var c net.Conn
			if err := inNetns(ns, func() (err error) {
				c, err = net.Dial("udp", target)
				return err
			}); err != nil {
				t.Fatalf("kernel udp socket: %v", err)
			}
			defer c.Close()
			msg := bytes.Repeat([]byte("datagram"), 100)
			buf := make([]byte, 2000)
			for try := 0; try < 3; try++ { // UDP: tolerate a loss at link-up
				c.Write(msg)
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				n, err := c.Read(buf)
				if err != nil {
					continue
				}
				if want := append([]byte("re:"), msg...); !bytes.Equal(buf[:n], want) {
					t.Fatalf("reply %q, want %q", buf[:n], want)
				}
				return
			}
			t.Fatal("no UDP reply through the TUN")
		})
	}
	st := s.Stats()
	t.Logf("stack stats: %+v", st)
	if st.Invalid != (InvalidStats{}) || st.WriteErrors != 0 {
		t.Fatalf("kernel traffic counted as invalid or failed to write: %+v", st)
	}
}

// chargenPort makes TestCreateTUNKernelTCP's handler send chargenSize bytes
// and close instead of echoing.
const (
	chargenPort = 19
	chargenSize = 8 << 20
)

// kernelTUN creates a network namespace with a TUN (10.99.0.1/24,
// fd99::1/64 on the kernel side) and returns both; both are removed when the
// test ends. It skips without root, and fails under CI=true if setup fails.
func kernelTUN(tb testing.TB) (string, tun.Device) { return kernelTUNQueues(tb, 0) }

// kernelTUNQueues is kernelTUN with the given number of queues (0: the
// default).
func kernelTUNQueues(tb testing.TB, queues int) (string, tun.Device) {
	if os.Geteuid() != 0 {
		tb.Skip("needs root (CAP_NET_ADMIN) to create a TUN in a new network namespace")
	}
	setupFailed := tb.Skipf
	if os.Getenv("CI") == "true" {
		setupFailed = tb.Fatalf
	}
	if _, err := exec.LookPath("ip"); err != nil {
		setupFailed("needs iproute2: %v", err)
		return "", nil
	}
	ns := fmt.Sprintf("nstun%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		setupFailed("ip netns add: %v: %s", err, out)
		return "", nil
	}
	tb.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })

	var dev tun.Device
	if err := inNetns(ns, func() (err error) {
		dev, err = CreateTUN("nstun0", 1500, queues)
		return err
	}); err != nil {
		setupFailed("create tun in %s: %v", ns, err)
		return "", nil
	}
	for _, args := range [][]string{
		{"addr", "add", "10.99.0.1/24", "dev", "nstun0"},
		{"addr", "add", "fd99::1/64", "dev", "nstun0", "nodad"},
		{"link", "set", "nstun0", "up"},
		{"link", "set", "lo", "up"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			dev.Close()
			setupFailed("ip %v: %v: %s", args, err, out)
			return "", nil
		}
	}
	return ns, dev
}

// BenchmarkKernelTUNTCP: one kernel TCP flow (in the namespace) through the
// TUN and a Stack, "in" from the kernel socket into the Stack (which
// discards), "out" from the Stack to the kernel socket (which discards). It
// reports the packets per write(2) to the TUN: above 1 means the device's
// GRO coalesced our segments into TSO frames. Needs root.
//
//	sudo go test -run '^$' -bench KernelTUNTCP -benchtime 3s ./netstack
func BenchmarkKernelTUNTCP(b *testing.B) {
	for _, dir := range []string{"in", "out"} {
		for _, direct := range []bool{true, false} {
			b.Run(fmt.Sprintf("%s/direct=%v", dir, direct), func(b *testing.B) {
				old := directWrites
				directWrites = direct
				defer func() { directWrites = old }()
				benchmarkKernelTUNTCP(b, dir == "out")
			})
		}
	}
}

func benchmarkKernelTUNTCP(b *testing.B, out bool) {
	ns, dev := kernelTUN(b)
	if dev == nil {
		return
	}
	chunk := make([]byte, 128<<10)
	// The side that writes runs b.Loop; the other counts what arrived.
	received := make(chan int64, 1)
	conns := make(chan net.Conn, 1)
	s, err := New(dev, Config{MTU: 1500, Addresses: []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24")}},
		funcHandler{tcp: func(r *TCPRequest) {
			c, err := r.Accept()
			if err != nil {
				return
			}
			if out {
				conns <- c
				return
			}
			defer c.Close()
			n, _ := io.CopyBuffer(io.Discard, c, make([]byte, 64<<10))
			received <- n
		}}, zap.NewNop())
	if err != nil {
		b.Fatalf("new stack: %v", err)
	}
	runStack(b, s)
	var kc net.Conn
	if err := inNetns(ns, func() (err error) {
		kc, err = net.DialTimeout("tcp", "10.99.0.2:5201", 10*time.Second)
		return err
	}); err != nil {
		b.Fatalf("kernel dial: %v", err)
	}
	defer kc.Close()
	w := kc
	if out {
		w = <-conns
		defer w.Close()
		go func() {
			n, _ := io.CopyBuffer(io.Discard, kc, make([]byte, 256<<10))
			received <- n
		}()
	}
	b.SetBytes(int64(len(chunk)))
	st0, sysw0, sysr0, cpu0 := s.Stats(), writeSyscalls(b), readSyscalls(b), processCPU(b)
	start := time.Now()
	var sent int64
	for b.Loop() {
		n, err := w.Write(chunk)
		if err != nil {
			b.Fatalf("write: %v", err)
		}
		sent += int64(n)
	}
	w.(interface{ CloseWrite() error }).CloseWrite()
	if got := <-received; got != sent {
		b.Fatalf("received %d of %d bytes", got, sent)
	}
	el := time.Since(start)
	st, sysw, sysr, cpu := s.Stats(), writeSyscalls(b), readSyscalls(b), processCPU(b)
	b.ReportMetric(float64(sent)*8/el.Seconds()/1e9, "Gbit/s")
	// CPU of the whole process (the kernel socket's side included) per Gbit
	// moved: comparable across runs when the wall clock is not.
	b.ReportMetric(float64((cpu-cpu0).Milliseconds())/(float64(sent)*8/1e9), "cpu-ms/Gbit")
	if !out && sysr > sysr0 {
		// The kernel socket only writes here: the reads are the Stack's
		// TUN reads (and the runtime's few wakeup reads).
		b.ReportMetric(float64(st.BytesIn-st0.BytesIn)/float64(sysr-sysr0)/1024, "KiB/read")
	}
	if out && sysw > sysw0 {
		b.ReportMetric(float64(st.BytesOut-st0.BytesOut)/float64(sysw-sysw0)/1024, "KiB/write")
	}
	b.ReportMetric(float64(st.TCPRetransmits), "retransmits")
	if out && sysw > sysw0 {
		// The kernel socket only reads here: the process's writes are the
		// Stack's TUN writes.
		b.ReportMetric(float64(st.PacketsOut-st0.PacketsOut)/float64(sysw-sysw0), "pkts/write")
	}
	if n := st.PacketsOut - st0.PacketsOut; n > 0 {
		b.ReportMetric(float64(st.DirectWrites-st0.DirectWrites)/float64(n), "direct-ratio")
	}
	if n := st.WriteBatches - st0.WriteBatches; n > 0 {
		b.ReportMetric(float64(st.PacketsOut-st0.PacketsOut)/float64(n), "pkts/batch")
	}
}

// processCPU returns the process's user+system CPU time so far (the kernel
// side of the benchmark included: compare like with like).
func processCPU(tb testing.TB) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		tb.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// writeSyscalls returns the process's write-like syscalls so far
// (/proc/self/io syscw).
func writeSyscalls(tb testing.TB) uint64 { return procIO(tb, "syscw: ") }

// readSyscalls returns the process's read-like syscalls so far (syscr).
func readSyscalls(tb testing.TB) uint64 { return procIO(tb, "syscr: ") }

func procIO(tb testing.TB, key string) uint64 {
	data, err := os.ReadFile("/proc/self/io")
	if err != nil {
		tb.Fatalf("read /proc/self/io: %v", err)
	}
	var v uint64
	for _, line := range strings.Split(string(data), "\n") {
		if n, ok := strings.CutPrefix(line, key); ok {
			v, _ = strconv.ParseUint(n, 10, 64)
		}
	}
	return v
}

// inNetns runs fn on an OS thread switched into the named network namespace:
// sockets and TUN devices it creates live there.
func inNetns(name string, fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return err
	}
	defer orig.Close()
	target, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("setns %s: %w", name, err)
	}
	ferr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// This thread is in the wrong namespace: let it die with the goroutine.
		runtime.Goexit()
	}
	return ferr
}

// BenchmarkKernelTUNRR: 64-byte ping-pong between a kernel socket (in the
// namespace) and an echo on a Stack, through the TUN: the round-trip latency
// the netstack adds (ns/op is one round trip). Needs root.
//
//	sudo go test -run '^$' -bench KernelTUNRR/direct=true -benchtime 20000x ./netstack
//
// Run the variants in separate, alternating invocations: whichever runs first
// in one process measured up to 30% slower (warm-up), which once passed for
// an effect of direct writes.
func BenchmarkKernelTUNRR(b *testing.B) {
	for _, direct := range []bool{true, false} {
		b.Run(fmt.Sprintf("direct=%v", direct), func(b *testing.B) {
			old := directWrites
			directWrites = direct
			defer func() { directWrites = old }()
			benchmarkKernelTUNRR(b)
		})
	}
}

func benchmarkKernelTUNRR(b *testing.B) {
	ns, dev := kernelTUN(b)
	if dev == nil {
		return
	}
	s, err := New(dev, Config{MTU: 1500, Addresses: []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24")}},
		funcHandler{tcp: func(r *TCPRequest) {
			c, err := r.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			io.Copy(c, c)
		}}, zap.NewNop())
	if err != nil {
		b.Fatalf("new stack: %v", err)
	}
	runStack(b, s)
	var c net.Conn
	if err := inNetns(ns, func() (err error) {
		c, err = net.DialTimeout("tcp", "10.99.0.2:7", 10*time.Second)
		return err
	}); err != nil {
		b.Fatalf("kernel dial: %v", err)
	}
	defer c.Close()
	msg, buf := make([]byte, 64), make([]byte, 64)
	c.SetDeadline(time.Now().Add(time.Minute))
	b.ReportAllocs()
	cpu0, sysr0 := processCPU(b), readSyscalls(b)
	for b.Loop() {
		if _, err := c.Write(msg); err != nil {
			b.Fatalf("write: %v", err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatalf("read: %v", err)
		}
	}
	b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
	// Read syscalls per round trip: the kernel socket's, the input pump's
	// and the runtime's.
	b.ReportMetric(float64(readSyscalls(b)-sysr0)/float64(b.N), "reads/op")
	st := s.Stats()
	if st.PacketsOut > 0 {
		b.ReportMetric(float64(st.DirectWrites)/float64(st.PacketsOut), "direct-ratio")
	}
}

// churnParallelism is BenchmarkKernelTUNChurn's clients per GOMAXPROCS.
var churnParallelism = 8

// BenchmarkKernelTUNChurn: kernel clients (in the namespace, 8 per CPU)
// connect through the TUN to a Stack whose handler accepts, sends one byte
// and closes, the shape of pmbench crr without the target leg: the Stack's
// per-connection cost. ns/op is one connection. Needs root.
//
//	sudo go test -run '^$' -bench KernelTUNChurn/direct=true -benchtime 5000x ./netstack
//
// As for BenchmarkKernelTUNRR, alternate the variants across invocations.
func BenchmarkKernelTUNChurn(b *testing.B) {
	for _, direct := range []bool{false, true} {
		b.Run(fmt.Sprintf("direct=%v", direct), func(b *testing.B) {
			old := directWrites
			directWrites = direct
			defer func() { directWrites = old }()
			benchmarkKernelTUNChurn(b)
		})
	}
}

func benchmarkKernelTUNChurn(b *testing.B) {
	ns, dev := kernelTUN(b)
	if dev == nil {
		return
	}
	s, err := New(dev, Config{MTU: 1500, Addresses: []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24")}, TCP: TCPConfig{TimeWait: time.Second}},
		funcHandler{tcp: func(r *TCPRequest) {
			c, err := r.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			c.Write([]byte{'x'})
		}}, zap.NewNop())
	if err != nil {
		b.Fatalf("new stack: %v", err)
	}
	runStack(b, s)
	var dialer *net.Dialer
	// A socket created on a thread in the namespace stays there: dial from
	// goroutines that switch in for the dial only.
	dialOne := func() error {
		var c net.Conn
		if err := inNetns(ns, func() (err error) {
			dialer = &net.Dialer{Timeout: 5 * time.Second}
			c, err = dialer.Dial("tcp", "10.99.0.2:80")
			return err
		}); err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 1)
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		return nil
	}
	b.ReportAllocs()
	b.SetParallelism(churnParallelism)
	var failed atomic.Int64
	cpu0 := processCPU(b)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := dialOne(); err != nil {
				failed.Add(1)
			}
		}
	})
	b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
	if f := failed.Load(); f > 0 {
		b.Fatalf("%d connections failed", f)
	}
}

// BenchmarkKernelTUNUDP: four kernel UDP sockets (in the namespace) send
// 1400-byte datagrams as fast as they can through the TUN to a Stack whose
// Handler counts them: the UDP fast path's read side. It reports the share
// delivered (the rest overflowed the TUN's queue while no pump read it) and
// process CPU per datagram sent. queues=N opens the TUN with N queues, one
// input pump each. Needs root.
//
//	sudo go test -run '^$' -bench KernelTUNUDP/queues=2 -benchtime 200000x ./netstack
func BenchmarkKernelTUNUDP(b *testing.B) {
	for _, queues := range []int{1, 2} {
		b.Run(fmt.Sprintf("queues=%d", queues), func(b *testing.B) { benchmarkKernelTUNUDP(b, queues) })
	}
}

func benchmarkKernelTUNUDP(b *testing.B, queues int) {
	ns, dev := kernelTUNQueues(b, queues)
	if dev == nil {
		return
	}
	var got atomic.Int64
	s, err := New(dev, Config{MTU: 1500, Addresses: []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24")}},
		funcHandler{udp: func(src, dst netip.AddrPort, p []byte) { got.Add(1) }}, zap.NewNop())
	if err != nil {
		b.Fatalf("new stack: %v", err)
	}
	defer s.Close()
	runStack(b, s)
	const senders = 4
	conns := make([]net.Conn, senders)
	for i := range conns {
		if err := inNetns(ns, func() (err error) {
			conns[i], err = net.Dial("udp", "10.99.0.2:5000")
			return err
		}); err != nil {
			b.Fatalf("udp socket: %v", err)
		}
		defer conns[i].Close()
	}
	msg := make([]byte, 1400)
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs() // the senders' writes allocate nothing: this is the pumps'
	st0, sysr0, cpu0 := s.Stats(), readSyscalls(b), processCPU(b)
	var sent atomic.Int64
	b.ResetTimer()
	var wg sync.WaitGroup
	for i := range conns {
		n := b.N / senders
		if i == 0 {
			n += b.N % senders
		}
		wg.Go(func() {
			for range n {
				if _, err := conns[i].Write(msg); err == nil {
					sent.Add(1)
				}
			}
		})
	}
	wg.Wait()
	// Wait for the pumps to drain what the TUN queued.
	for last, deadline := int64(-1), time.Now().Add(5*time.Second); got.Load() != last && time.Now().Before(deadline); {
		last = got.Load()
		time.Sleep(20 * time.Millisecond)
	}
	b.StopTimer()
	st, sysr, cpu := s.Stats(), readSyscalls(b), processCPU(b)
	b.ReportMetric(float64(got.Load())/b.Elapsed().Seconds()/1e3, "kdgram/s")
	b.ReportMetric(100*float64(got.Load())/float64(b.N), "%delivered")
	b.ReportMetric(float64((cpu-cpu0).Nanoseconds())/1e3/float64(b.N), "cpu-us/dgram")
	if sysr > sysr0 {
		b.ReportMetric(float64(st.PacketsIn-st0.PacketsIn)/float64(sysr-sysr0), "pkts/read")
	}
}

// BenchmarkKernelTUNTCP4: four kernel TCP flows into the Stack at once
// (iperf3 -P4's shape), with the TUN's queues=1 or 2: what one input pump
// per queue buys when flows hash to different queues. Needs root.
//
//	sudo go test -run '^$' -bench KernelTUNTCP4/queues=2 -benchtime 3s ./netstack
func BenchmarkKernelTUNTCP4(b *testing.B) {
	for _, queues := range []int{1, 2} {
		b.Run(fmt.Sprintf("queues=%d", queues), func(b *testing.B) { benchmarkKernelTUNTCP4(b, queues) })
	}
}

func benchmarkKernelTUNTCP4(b *testing.B, queues int) {
	ns, dev := kernelTUNQueues(b, queues)
	if dev == nil {
		return
	}
	const flows = 4
	var received atomic.Int64
	s, err := New(dev, Config{MTU: 1500, Addresses: []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24")}},
		funcHandler{tcp: func(r *TCPRequest) {
			c, err := r.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			n, _ := io.CopyBuffer(io.Discard, c, make([]byte, 64<<10))
			received.Add(n)
		}}, zap.NewNop())
	if err != nil {
		b.Fatalf("new stack: %v", err)
	}
	defer s.Close()
	runStack(b, s)
	conns := make([]net.Conn, flows)
	for i := range conns {
		if err := inNetns(ns, func() (err error) {
			conns[i], err = net.DialTimeout("tcp", "10.99.0.2:5201", 10*time.Second)
			return err
		}); err != nil {
			b.Fatalf("kernel dial: %v", err)
		}
		defer conns[i].Close()
	}
	chunk := make([]byte, 128<<10)
	b.SetBytes(int64(len(chunk)))
	cpu0 := processCPU(b)
	start := time.Now()
	var sent atomic.Int64
	var next atomic.Int64
	b.SetParallelism(flows) // with GOMAXPROCS 1 too: one goroutine per flow
	b.RunParallel(func(pb *testing.PB) {
		c := conns[int(next.Add(1)-1)%flows]
		for pb.Next() {
			n, err := c.Write(chunk)
			if err != nil {
				b.Errorf("write: %v", err)
				return
			}
			sent.Add(int64(n))
		}
	})
	for _, c := range conns {
		c.(*net.TCPConn).CloseWrite()
	}
	deadline := time.Now().Add(30 * time.Second)
	for received.Load() < sent.Load() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	el := time.Since(start)
	if got := received.Load(); got != sent.Load() {
		b.Fatalf("received %d of %d bytes", got, sent.Load())
	}
	b.ReportMetric(float64(sent.Load())*8/el.Seconds()/1e9, "Gbit/s")
	b.ReportMetric(float64((processCPU(b)-cpu0).Milliseconds())/(float64(sent.Load())*8/1e9), "cpu-ms/Gbit")
	// The busiest queue's share of the frames read: 1/queues when the
	// flows spread evenly, 1 when one input pump did all the work.
	var total, busiest uint64
	for i := range s.queueFrames {
		n := s.queueFrames[i].Load()
		total += n
		busiest = max(busiest, n)
	}
	b.ReportMetric(float64(busiest)/float64(max(total, 1)), "busiest-queue-share")
}

// BenchmarkKernelTUNMemory: flows kernel TCP flows (in the namespace)
// through the TUN into a Stack whose handler copies each to a slow reader
// (in: kernel to Stack) or from a fast writer (out: Stack to kernel), with
// and without a TCP buffer budget. It reports Gbit/s and the heap the
// Stack held: the sampled peak of live and uncollected objects and the
// peak of what the collector found live. Needs root.
//
//	sudo go test -run '^$' -bench KernelTUNMemory -benchtime 64x ./netstack
func BenchmarkKernelTUNMemory(b *testing.B) {
	for _, dir := range []string{"in", "out"} {
		for _, flows := range []int{1, 4} {
			for _, budget := range []int{0, 36 << 20, 12 << 20} {
				b.Run(fmt.Sprintf("%s/flows=%d/budget=%dMiB", dir, flows, budget>>20), func(b *testing.B) {
					benchmarkKernelTUNMemory(b, dir == "out", flows, budget)
				})
			}
		}
	}
}

func benchmarkKernelTUNMemory(b *testing.B, out bool, flows, budget int) {
	ns, dev := kernelTUN(b)
	if dev == nil {
		return
	}
	const chunk = 1 << 20 // per flow and iteration
	received := make(chan int64, flows)
	conns := make(chan net.Conn, flows)
	s, err := New(dev, Config{MTU: 1500, Addresses: []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24")}, TCP: TCPConfig{BufferBudget: budget}},
		funcHandler{tcp: func(r *TCPRequest) {
			c, err := r.Accept()
			if err != nil {
				return
			}
			if out {
				conns <- c
				return
			}
			defer c.Close()
			n, _ := io.CopyBuffer(io.Discard, c, make([]byte, 64<<10))
			received <- n
		}}, zap.NewNop())
	if err != nil {
		b.Fatalf("new stack: %v", err)
	}
	defer s.Close()
	runStack(b, s)
	writers := make([]net.Conn, flows)
	for i := range flows {
		var kc net.Conn
		if err := inNetns(ns, func() (err error) {
			kc, err = net.DialTimeout("tcp", "10.99.0.2:5201", 10*time.Second)
			return err
		}); err != nil {
			b.Fatalf("kernel dial: %v", err)
		}
		defer kc.Close()
		writers[i] = kc
		if out {
			writers[i] = <-conns
			defer writers[i].Close()
			go func() {
				n, _ := io.CopyBuffer(io.Discard, kc, make([]byte, 256<<10))
				received <- n
			}()
		}
	}
	runtime.GC()
	var peak, live atomic.Uint64
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		sm := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/gc/heap/live:bytes"}}
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			metrics.Read(sm)
			if v := sm[0].Value.Uint64(); v > peak.Load() {
				peak.Store(v)
			}
			if v := sm[1].Value.Uint64(); v > live.Load() {
				live.Store(v)
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	b.SetBytes(int64(flows * chunk))
	start := time.Now()
	var sent atomic.Int64
	var wg sync.WaitGroup
	for _, w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 128<<10)
			for range b.N {
				for n := 0; n < chunk; n += len(buf) {
					m, err := w.Write(buf)
					sent.Add(int64(m))
					if err != nil {
						b.Errorf("write: %v", err)
						return
					}
				}
			}
			w.(interface{ CloseWrite() error }).CloseWrite()
		}()
	}
	wg.Wait()
	var got int64
	for range flows {
		got += <-received
	}
	el := time.Since(start)
	close(stop)
	<-done
	if got != sent.Load() {
		b.Fatalf("received %d of %d bytes", got, sent.Load())
	}
	b.ReportMetric(float64(got)*8/el.Seconds()/1e9, "Gbit/s")
	b.ReportMetric(float64(peak.Load())/(1<<20), "peak-heap-MiB")
	b.ReportMetric(float64(live.Load())/(1<<20), "peak-live-MiB")
}
