package tunnel_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/internal/testutil"
)

// liveHeapAfterGC returns the live heap once the collector has run twice
// (the second empties what sync.Pools kept from the first), and of it the
// bytes wireguard-go allocated (its 64 KiB message buffers: bounded by the
// gates of gate.go, not by buffer_memory), as far as the memory profile
// saw them: exactly if runtime.MemProfileRate is 1 since they were made.
func liveHeapAfterGC() (live, wireguard uint64) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	n, _ := runtime.MemProfile(nil, false)
	recs := make([]runtime.MemProfileRecord, n+64)
	n, _ = runtime.MemProfile(recs, false)
	for _, r := range recs[:n] {
		frames := runtime.CallersFrames(r.Stack())
		for {
			f, more := frames.Next()
			if strings.HasPrefix(f.Function, "golang.zx2c4.com/wireguard/") {
				wireguard += uint64(r.InUseBytes())
				break
			}
			if !more {
				break
			}
		}
	}
	return ms.HeapAlloc, wireguard
}

// TestRelayBufferBudgetHundredFlows drives 100 bulk flows from loopback
// clients through the relay to an appliance whose target stops reading, so
// every byte in flight backs up through the tunnel into the relay's send
// queues and copy buffers. Each side has buffer_memory = 8MiB: once every
// flow is backed up, the process's live heap has grown by no more than the
// two budgets and the flows' fixed costs (not the 1 MiB or more of send
// queue per flow an unbudgeted relay holds), the relay's forwarder shows
// its budget spent and refusals counted, and once the target reads, every
// flow delivers all its bytes.
func TestRelayBufferBudgetHundredFlows(t *testing.T) {
	const (
		flows   = 100
		size    = 512 << 10
		budget  = 8 << 20
		perFlow = 2 * (64 << 10) // fixed costs on both sides: endpoints, small copy buffers
	)
	// Profile every allocation, to tell wireguard-go's apart (see
	// liveHeapAfterGC); the devices start below.
	old := runtime.MemProfileRate
	runtime.MemProfileRate = 1
	t.Cleanup(func() { runtime.MemProfileRate = old })
	release := make(chan struct{})
	var releaseOnce sync.Once
	open := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(open)
	var got sync.Map // conn index -> bytes
	var finished atomic.Int32
	lc := net.ListenConfig{Control: testutil.SmallSocketBuffers}
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var sinkWG sync.WaitGroup
	t.Cleanup(func() { ln.Close(); open(); sinkWG.Wait() })
	sinkWG.Add(1)
	go func() {
		defer sinkWG.Done()
		for i := 0; ; i++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			sinkWG.Add(1)
			go func() {
				defer sinkWG.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(2 * time.Minute))
				<-release
				n, _ := io.Copy(io.Discard, c)
				got.Store(i, n)
				finished.Add(1)
			}()
		}
	}()

	key := mustKey(t)
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	cfg := relayConfig(mustKey(t), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: key.Public(), Address: applAddrA, Ports: mustSpecs(t, spec)})
	cfg.Relay.BufferMemory = budget
	relay := startRelay(t, cfg, testLogger(t))
	a := startApplianceOpts(t, "127.0.0.1", relay, key, applAddrA, fmt.Sprintf(`
[limits]
buffer_memory = "8MiB"
max_inflight_per_source = 1000
max_tcp_sessions_per_source = 0
new_sessions_per_source_per_second = 0

[[mapping]]
name = "bulk"
protocol = "tcp"
listen = "%d"
target = %q
`, port, ln.Addr().String()), forwarder.Options{Dialer: &net.Dialer{Control: testutil.SmallSocketBuffers}})
	waitRegistered(t, a, spec)

	baseline, wgBase := liveHeapAfterGC()
	var wg sync.WaitGroup
	errs := make(chan error, flows)
	for i := range flows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The clients' and the relay's public sockets are the kernel's:
			// what they buffer is not the relay's heap.
			c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", port), 10*time.Second)
			if err != nil {
				errs <- fmt.Errorf("flow %d: dial: %w", i, err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Minute))
			buf := make([]byte, 32<<10)
			for sent := 0; sent < size; sent += len(buf) {
				if _, err := c.Write(buf[:min(len(buf), size-sent)]); err != nil {
					errs <- fmt.Errorf("flow %d: write after %d bytes: %w", i, sent, err)
					return
				}
			}
			c.(*net.TCPConn).CloseWrite()
			if _, err := io.Copy(io.Discard, c); err != nil {
				errs <- fmt.Errorf("flow %d: wait for close: %w", i, err)
			}
		}()
	}
	// Backed up: the appliance's receive windows hold data, and so do the
	// relay's send buffers, which read the clients' sockets themselves
	// (netstack/zerocopy_linux.go). (The control connection and the warm
	// streams not taken are more conns on each stack.)
	waitFor(t, 60*time.Second, "the flows to back up into the relay", func() bool {
		as := a.stack.Stats()
		return as.TCPConns >= flows+1 && relay.stack.Stats().TCPConns >= flows+1 &&
			as.TCPRecvQueued >= flows*(4<<10)
	})
	stalled, wgStalled := liveHeapAfterGC()
	// NATBOX_TEST_HEAPPROFILE=FILE: a heap profile of the backed-up state.
	if p := os.Getenv("NATBOX_TEST_HEAPPROFILE"); p != "" {
		writeHeapProfile(p)
	}
	rs, rst := relay.relay.Status(), relay.stack.Stats()
	open()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	waitFor(t, 30*time.Second, "every target connection to finish", func() bool { return finished.Load() == flows })
	got.Range(func(k, v any) bool {
		if v.(int64) != size {
			t.Errorf("target connection %d received %d bytes, want %d", k, v, size)
		}
		return true
	})

	// Kernel socket to stack conn and back, the relay needs no copy
	// buffers of its own.
	if rs.BufferBudgetBytes != budget/4 || rs.BufferUsedBytes != 0 || rs.BufferDenied != 0 {
		t.Errorf("relay status: buffer_budget_bytes %d, buffer_used_bytes %d, buffer_denied %d; want %d, 0, 0",
			rs.BufferBudgetBytes, rs.BufferUsedBytes, rs.BufferDenied, budget/4)
	}
	if rst.TCPBufferShare != 16<<10 || rst.TCPBufferCuts == 0 {
		t.Errorf("relay stack: tcp_buffer_share %d, tcp_buffer_cuts %d; want 16 KiB, > 0", rst.TCPBufferShare, rst.TCPBufferCuts)
	}
	// wireguard-go's buffers are bounded by the gates, and counted apart.
	grew := (int64(stalled) - int64(wgStalled)) - (int64(baseline) - int64(wgBase))
	bound := int64(2*budget + flows*perFlow + flows*(32<<10))
	t.Logf("live heap %d -> %d MiB with %d backed-up flows, wireguard-go's %d -> %d MiB; the rest grew %.1f MiB (bound %.1f MiB)",
		baseline>>20, stalled>>20, flows, wgBase>>20, wgStalled>>20, float64(grew)/(1<<20), float64(bound)/(1<<20))
	if grew > bound {
		t.Errorf("live heap grew by %.1f MiB with %d backed-up flows, above the bound of %.1f MiB", float64(grew)/(1<<20), flows, float64(bound)/(1<<20))
	}
}

// TestUplinkGateFromBufferMemory: an uplink's device holds what its
// side's buffer_memory allows (a quarter of it in 64 KiB buffers, two
// directions), and carries traffic with it.
func TestUplinkGateFromBufferMemory(t *testing.T) {
	t.Parallel()
	portA, portB := freePort(t, false), freePort(t, false)
	keyA, keyB := mustKey(t), mustKey(t)
	relay := startRelay(t, relayConfig(mustKey(t), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, fmt.Sprintf("tcp/%d", portA))},
		conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB, Ports: mustSpecs(t, fmt.Sprintf("tcp/%d", portB))},
	), testLogger(t))
	svc, _ := proxyEchoService(t)
	a := startAppliance(t, relay, keyA, applAddrA, tcpMapping("a", portA, svc)) // the 32 MiB default
	b := startAppliance(t, relay, keyB, applAddrB, "[limits]\nbuffer_memory = \"64MiB\"\n"+tcpMapping("b", portB, svc))
	waitRegistered(t, a, fmt.Sprintf("tcp/%d", portA))
	waitRegistered(t, b, fmt.Sprintf("tcp/%d", portB))
	// The bound reaches status (and so /metrics) as gate_packets.
	if got := a.uplink.Status().GatePackets; got != 64 {
		t.Errorf("default buffer_memory: uplink gate %d, want 64", got)
	}
	if got := b.uplink.Status().GatePackets; got != 128 {
		t.Errorf("buffer_memory 64MiB: uplink gate %d, want 128", got)
	}
	if got := relay.relay.Status().GatePackets; got != 64 {
		t.Errorf("relay's default buffer_memory: gate %d, want 64", got)
	}
}
