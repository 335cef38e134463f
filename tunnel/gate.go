package tunnel

import (
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
)

// wireguard-go keeps every packet it holds in a 64 KiB message buffer and
// queues up to 1024 batches of 128 per stage (device.QueueOutboundSize,
// PreallocatedBuffersPerPool = 0: unbounded pools). Everything around it
// applies backpressure instead of dropping, so when its goroutines fall
// behind (encryption, the UDP syscalls) a TCP sender's whole window ends up
// inside those queues: in BenchmarkRelayTCPThroughput, 8 MiB windows meant
// thousands of packets and ~360 MiB of live heap, and refilling its pools
// with fresh 64 KiB buffers (page faults, zeroing, GC) took a large share
// of the CPU. The gates below bound how many data packets one direction of
// a device holds, so the backlog waits upstream instead, in MTU-sized
// buffers (the netstack's outward queue, the UDP socket buffer), and
// wireguard-go's pools stay small and warm: CPU per GiB -52 %, peak heap
// -62 %, allocated bytes -85 % (tunnel/BENCH.md). TCP windows are left
// alone: they must cover the real path's bandwidth-delay product.
//
// The counts cannot see packets wireguard-go drops internally (no session
// key yet, replayed or unauthenticated packets, no route), so a gate that
// made no progress for gateStall assumes such a leak and reopens.
const (
	// gatePackets is the most data packets one direction may hold, and
	// the size without a buffer budget: two of the standard bind's
	// 128-packet batches. 512 held more heap for no CPU gain (BENCH.md).
	gatePackets = 256
	// minGatePackets is the floor of a gate sized from a small budget: 32
	// still moved as much in-process, but with less slack for a loaded host.
	minGatePackets = 64
	// gateStall is how long a full gate waits without any packet leaving
	// before it reopens (10 ms measured better than 50 ms: a loaded host
	// stalls wireguard-go's goroutines that long more often than it leaks).
	gateStall = 10 * time.Millisecond
)

// gate counts the data packets inside one direction of a wireguard-go
// device. enter and leave may be called concurrently; wait is called by the
// goroutines that feed the direction.
type gate struct {
	limit  int64 // data packets the direction may hold
	held   atomic.Int64
	space  chan struct{} // capacity 1: a leave happened
	stall  time.Duration
	stalls atomic.Uint64 // reopened after stall without progress
}

func newGate(limit int) *gate {
	return &gate{limit: int64(limit), space: make(chan struct{}, 1), stall: gateStall}
}

// gateSize is how many data packets each direction of a device may hold
// when it has budget bytes of buffer memory (0: unbounded; set at start,
// a reload keeps it): the two
// directions' 64 KiB message buffers take at most a quarter of it, between
// minGatePackets and gatePackets. 64 (the 32 MiB default) moved as much as
// 256 in BenchmarkRelayTCP* for a quarter of the buffers (BENCH.md).
func gateSize(budget int) int {
	if budget <= 0 {
		return gatePackets
	}
	return min(max(budget/4/(2*device.MaxMessageSize), minGatePackets), gatePackets)
}

// wait blocks while the gate holds g.limit packets or more, for at most
// g.stall without progress.
func (g *gate) wait() {
	if g.held.Load() < g.limit {
		return
	}
	t := time.NewTimer(g.stall)
	defer t.Stop()
	for g.held.Load() >= g.limit {
		select {
		case <-g.space:
			t.Reset(g.stall)
		case <-t.C:
			g.stalls.Add(1)
			g.held.Store(0)
			return
		}
	}
}

func (g *gate) enter(n int) {
	if n > 0 {
		g.held.Add(int64(n))
	}
}

func (g *gate) leave(n int) {
	if n <= 0 {
		return
	}
	if g.held.Add(-int64(n)) < 0 {
		// Keepalives and packets that entered before a stall reset; an
		// undercount only makes the gate more permissive.
		g.held.Store(0)
	}
	select {
	case g.space <- struct{}{}:
	default:
	}
}

// gates are the two directions of one device: out is read from the tun
// device and leaves through the bind's Send; in is received by the bind
// and leaves through the tun device's Write. loss estimates the messages the
// path lost on the way in (lossmeter.go).
type gates struct {
	out, in *gate
	loss    *lossMeter
}

func newGates(limit int) gates {
	return gates{out: newGate(limit), in: newGate(limit), loss: newLossMeter()}
}

// status reports, for UplinkStatus and RelayStatus, the packets each
// direction may hold (the bound), how many both hold now, and how often a
// full gate reopened after gateStall without progress.
func (g gates) status() (limit, held int64, stalls uint64) {
	return g.out.limit, g.out.held.Load() + g.in.held.Load(), g.out.stalls.Load() + g.in.stalls.Load()
}

// gatedTUN is the tun.Device wireguard-go sees.
type gatedTUN struct {
	tun.Device
	g     gates
	batch int // BatchSize: how many buffers the TUN reader holds
}

func (t *gatedTUN) BatchSize() int { return min(t.Device.BatchSize(), t.batch) }

func (t *gatedTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	t.g.out.wait()
	n, err := t.Device.Read(bufs, sizes, offset)
	t.g.out.enter(n)
	return n, err
}

func (t *gatedTUN) Write(bufs [][]byte, offset int) (int, error) {
	n, err := t.Device.Write(bufs, offset)
	t.g.in.leave(len(bufs)) // written or refused, they left wireguard-go
	return n, err
}

// gatedBind is the conn.Bind wireguard-go sees. Wrapping the bind costs
// one thing: wireguard-go starts its route listener only for a bare
// *conn.StdNetBind (device/sticky_linux.go), which forgets a peer's cached
// source address when the host's routes change; without it the source is
// corrected by the peer's next packet instead. (natbox's own UDP bind,
// udpbind_linux.go, is not one either.)
type gatedBind struct {
	conn.Bind
	g     gates
	batch int // BatchSize, at most
}

func (b *gatedBind) BatchSize() int { return min(b.Bind.BatchSize(), b.batch) }

func (b *gatedBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.Bind.Open(port)
	for i, fn := range fns {
		fns[i] = func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
			b.g.in.wait()
			n, err := fn(packets, sizes, eps)
			b.g.in.enter(b.g.loss.observe(packets, sizes, n)) // one pass: counts for the loss meter, data messages for the gate
			return n, err
		}
	}
	return fns, actual, err
}

func (b *gatedBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	err := b.Bind.Send(bufs, ep)
	k := 0
	for _, p := range bufs {
		if isData(p) {
			k++
		}
	}
	b.g.out.leave(k)
	b.g.loss.sent.Add(uint64(k))
	return err
}

// isData reports whether msg is a WireGuard transport message carrying a
// packet (keepalives are empty ones; handshakes have other types).
func isData(msg []byte) bool {
	return len(msg) > device.MessageKeepaliveSize && msg[0] == device.MessageTransportType &&
		msg[1] == 0 && msg[2] == 0 && msg[3] == 0
}
