package netstack

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.zx2c4.com/wireguard/tun"
)

// pipeBatchSize is the Pipe's BatchSize, wireguard-go's conn.IdealBatchSize.
const pipeBatchSize = 128

// ErrPacketTooBig is returned (wrapped) by a Pipe's Write for packets longer
// than its MTU; the other packets of the batch are delivered.
var ErrPacketTooBig = errors.New("netstack: packet exceeds the pipe mtu")

// Pipe returns two connected in-memory tun.Devices: what one Writes the other
// Reads, in batches of up to 128 packets of at most mtu bytes. A Write blocks
// until the other end has read its whole batch (backpressure, no drops), and
// each packet is copied exactly once, from the writer's buffer into the
// reader's, with no allocation. Close on either end closes both and unblocks
// every Read and Write with os.ErrClosed.
//
// Run a Stack on stackSide and wireguard-go's device.NewDevice on outerSide,
// or join two Stacks in tests. Joining two Stacks has one theoretical
// deadlock that wireguard-go (whose reader never waits on us) cannot cause:
// if both stacks' outward queues are full and both input pumps are blocked
// writing an inline reply (an RST or ICMP generated while delivering), each
// output pump waits in Write for the other's input pump. Queues of 2048
// packets and inline replies being rare keep tests clear of it.
func Pipe(mtu int) (stackSide, outerSide tun.Device) {
	sh := &pipeShared{closed: make(chan struct{})}
	ab, ba := newPipeDir(mtu), newPipeDir(mtu)
	a := &pipeEnd{name: "pipe-a", mtu: mtu, in: ba, out: ab, shared: sh, events: make(chan tun.Event, 1)}
	b := &pipeEnd{name: "pipe-b", mtu: mtu, in: ab, out: ba, shared: sh, events: make(chan tun.Event, 1)}
	a.events <- tun.EventUp
	b.events <- tun.EventUp
	sh.ends = [2]*pipeEnd{a, b}
	return a, b
}

type pipeShared struct {
	once   sync.Once
	closed chan struct{}
	ends   [2]*pipeEnd
}

type pipeEnd struct {
	name    string
	mtu     int
	in, out *pipeDir
	shared  *pipeShared
	events  chan tun.Event
}

// pipeDir is one direction: a rendezvous where a writer posts its batch and
// waits until readers have copied all of it out.
type pipeDir struct {
	mtu      int
	wmu      sync.Mutex // one writer posts at a time
	mu       sync.Mutex
	readable sync.Cond // a batch was posted, or closed
	consumed sync.Cond // the posted batch was consumed, or closed
	// mu guards the following fields.
	bufs   [][]byte // posted batch; nil when none
	offset int
	next   int // first packet not yet read
	tooBig int // packets skipped for exceeding mtu
	closed bool
}

func newPipeDir(mtu int) *pipeDir {
	d := &pipeDir{mtu: mtu}
	d.readable.L = &d.mu
	d.consumed.L = &d.mu
	return d
}

func (d *pipeDir) close() {
	d.mu.Lock()
	d.closed = true
	d.readable.Broadcast()
	d.consumed.Broadcast()
	d.mu.Unlock()
}

// write posts bufs and waits until they are read.
func (d *pipeDir) write(bufs [][]byte, offset int) (int, error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	d.wmu.Lock()
	defer d.wmu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, os.ErrClosed
	}
	d.bufs, d.offset, d.next, d.tooBig = bufs, offset, 0, 0
	d.readable.Signal()
	for d.bufs != nil && !d.closed {
		d.consumed.Wait()
	}
	complete, next, skipped := d.bufs == nil, d.next, d.tooBig
	d.bufs = nil // readers of a closed pipe must not touch bufs after we return
	if !complete {
		return next - skipped, os.ErrClosed
	}
	if skipped > 0 {
		return len(bufs) - skipped, fmt.Errorf("%d of %d packets dropped: %w", skipped, len(bufs), ErrPacketTooBig)
	}
	return len(bufs), nil
}

// read copies up to len(bufs) posted packets into bufs at offset.
func (d *pipeDir) read(bufs [][]byte, sizes []int, offset int) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for d.bufs == nil && !d.closed {
		d.readable.Wait()
	}
	if d.closed {
		return 0, os.ErrClosed
	}
	n := 0
	for n < len(bufs) && d.next < len(d.bufs) {
		pkt := d.bufs[d.next][d.offset:]
		d.next++
		if len(pkt) > d.mtu || len(pkt) > len(bufs[n])-offset {
			d.tooBig++
			continue
		}
		sizes[n] = copy(bufs[n][offset:], pkt)
		n++
	}
	if d.next == len(d.bufs) {
		d.bufs = nil
		d.consumed.Signal()
	} else {
		d.readable.Signal() // let another reader continue the batch
	}
	return n, nil
}

// File implements tun.Device; a Pipe has no file.
func (p *pipeEnd) File() *os.File { return nil }

// Read implements tun.Device.
func (p *pipeEnd) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	for {
		n, err := p.in.read(bufs, sizes, offset)
		if n > 0 || err != nil {
			return n, err
		}
		// Every packet of the batch was too big: wait for the next one.
	}
}

// Write implements tun.Device.
func (p *pipeEnd) Write(bufs [][]byte, offset int) (int, error) {
	return p.out.write(bufs, offset)
}

// MTU implements tun.Device.
func (p *pipeEnd) MTU() (int, error) { return p.mtu, nil }

// Name implements tun.Device.
func (p *pipeEnd) Name() (string, error) { return p.name, nil }

// Events implements tun.Device: EventUp once, closed on Close.
func (p *pipeEnd) Events() <-chan tun.Event { return p.events }

// BatchSize implements tun.Device.
func (p *pipeEnd) BatchSize() int { return pipeBatchSize }

// Close implements tun.Device: it closes both ends. Idempotent.
func (p *pipeEnd) Close() error {
	sh := p.shared
	sh.once.Do(func() {
		close(sh.closed)
		for _, e := range sh.ends {
			e.in.close()
			close(e.events)
		}
	})
	return nil
}
