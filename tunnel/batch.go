package tunnel

import (
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
)

// wireguard-go gives every receive function (UDP over IPv4, over IPv6,
// the streams) and its TUN reader as many 64 KiB message buffers as the
// bind and the tun device report in BatchSize, all allocated up front:
// with the standard bind's 128 that is 32 MiB per device before a packet
// moves. Our bind and tun device report deviceBatch instead; the standard
// bind with UDP GRO cannot take fewer than its own batch size (it reads
// coalesced datagrams into its last messages and splits them forward into
// the others), so smallBatch hands it a full batch whose first buffers are
// wireguard-go's and the rest its own, MTU-sized, and gives what landed in
// its own to wireguard-go on the next calls. UDP GRO still coalesces, so a
// smaller batch costs few syscalls (tunnel/BENCH.md).
const deviceBatch = 32

// messageOverhead is what a transport message adds to a packet: its
// header, the tag, and padding to 16 bytes.
const messageOverhead = device.MessageTransportSize + 16

// groLanding is how many of the inner bind's last messages take whole
// coalesced datagrams: conn.StdNetBind reads into its last
// IdealBatchSize/64 (64: the most segments the kernel coalesces).
const groLanding = conn.IdealBatchSize / 64

// smallBatch adapts a ReceiveFunc that wants full buffers to callers that
// pass fewer. Each ReceiveFunc has one caller goroutine, so no locks.
type smallBatch struct {
	fn   conn.ReceiveFunc
	slot int // the size of its own buffers, but the landing ones

	bufs  [][]byte // the full batch handed to fn
	own   [][]byte // its own buffers, by slot of bufs (nil below the caller's)
	sizes []int
	eps   []conn.Endpoint
	next  int // the next of its own slots to hand over
	n     int // how many slots fn filled
}

// newSmallBatch wraps fn for a full batch of full buffers; packets up to
// slot bytes fit its own (a larger one grows them, losing that packet).
func newSmallBatch(fn conn.ReceiveFunc, full, slot int) *smallBatch {
	return &smallBatch{
		fn: fn, slot: slot,
		bufs: make([][]byte, full), own: make([][]byte, full),
		sizes: make([]int, full), eps: make([]conn.Endpoint, full),
	}
}

// ownBuf is its own buffer for slot i of a batch of which the caller fills
// the first b.
func (r *smallBatch) ownBuf(i int) []byte {
	want := r.slot
	if i >= len(r.bufs)-groLanding {
		want = device.MaxMessageSize
	}
	if len(r.own[i]) < want {
		r.own[i] = make([]byte, want)
	}
	return r.own[i]
}

func (r *smallBatch) receive(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	if r.next < r.n {
		return r.handOver(packets, sizes, eps), nil
	}
	b := len(packets)
	if b >= len(r.bufs) {
		return r.fn(packets, sizes, eps)
	}
	copy(r.bufs, packets)
	for i := b; i < len(r.bufs); i++ {
		r.bufs[i] = r.ownBuf(i)
	}
	n, err := r.fn(r.bufs, r.sizes, r.eps)
	if err != nil || n <= b {
		copy(sizes, r.sizes[:n])
		copy(eps, r.eps[:n])
		clear(r.eps[:n])
		return n, err
	}
	copy(sizes, r.sizes[:b])
	copy(eps, r.eps[:b])
	clear(r.eps[:b])
	r.next, r.n = b, n
	for i := b; i < n; i++ {
		if r.sizes[i] == len(r.bufs[i]) && r.sizes[i] < device.MaxMessageSize {
			// It filled the buffer: maybe cut. A peer's packets are larger
			// than the MTU said; take whole ones from now on.
			r.slot = device.MaxMessageSize
		}
	}
	return b, nil
}

// handOver copies what landed in its own buffers into the caller's.
func (r *smallBatch) handOver(packets [][]byte, sizes []int, eps []conn.Endpoint) int {
	k := 0
	for ; k < len(packets) && r.next < r.n; k++ {
		sizes[k] = copy(packets[k], r.bufs[r.next][:r.sizes[r.next]])
		eps[k] = r.eps[r.next]
		r.eps[r.next] = nil
		r.next++
	}
	return k
}
