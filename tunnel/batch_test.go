package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/natbox/natbox/conf"
)

// loopbackBinds opens a receiving and a sending standard bind on loopback
// and returns the receiver's IPv4 ReceiveFunc and the endpoint to send to.
func loopbackBinds(t *testing.T) (recv conn.ReceiveFunc, full int, send conn.Bind, ep conn.Endpoint) {
	t.Helper()
	rb := conn.NewStdNetBind()
	fns, port, err := rb.Open(0)
	if err != nil {
		t.Fatal(err)
	}
	// A lost datagram would block the receive for good: closing the bind
	// turns that into an error.
	watchdog := time.AfterFunc(20*time.Second, func() { rb.Close() })
	t.Cleanup(func() { watchdog.Stop(); rb.Close() })
	sb := conn.NewStdNetBind()
	if _, _, err := sb.Open(0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() })
	ep, err = sb.ParseEndpoint(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String())
	if err != nil {
		t.Fatal(err)
	}
	return fns[0], rb.BatchSize(), sb, ep // IPv4's comes first
}

// sendNumbered sends count datagrams of size bytes in one batch, each
// carrying its number in every 4 bytes. The buffers have wireguard-go's
// capacity: the bind coalesces (GSO) into the first one's spare room.
func sendNumbered(t *testing.T, b conn.Bind, ep conn.Endpoint, first, count, size int) {
	t.Helper()
	bufs := make([][]byte, count)
	for i := range bufs {
		bufs[i] = make([]byte, size, device.MaxMessageSize)
		for j := 0; j+4 <= size; j += 4 {
			binary.BigEndian.PutUint32(bufs[i][j:], uint32(first+i))
		}
	}
	if err := b.Send(bufs, ep); err != nil {
		t.Fatal(err)
	}
}

// receiveNumbered receives count datagrams through r with callers' batches
// of batch buffers, and checks each arrives once, whole, and no call
// returns more than the batch.
func receiveNumbered(t *testing.T, r *smallBatch, batch, first, count, size int) {
	t.Helper()
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, device.MaxMessageSize)
	}
	sizes, eps := make([]int, batch), make([]conn.Endpoint, batch)
	seen := make(map[uint32]bool)
	want := make([]byte, size)
	deadline := time.Now().Add(10 * time.Second)
	for len(seen) < count {
		if time.Now().After(deadline) {
			t.Fatalf("received %d of %d datagrams", len(seen), count)
		}
		n, err := r.receive(bufs, sizes, eps)
		if err != nil {
			t.Fatal(err)
		}
		if n > batch {
			t.Fatalf("a call returned %d packets into %d buffers", n, batch)
		}
		for i := range n {
			if eps[i] == nil {
				t.Fatalf("packet %d of a batch has no endpoint", i)
			}
			p := bufs[i][:sizes[i]]
			if len(p) != size {
				t.Fatalf("datagram of %d bytes, want %d", len(p), size)
			}
			num := binary.BigEndian.Uint32(p)
			for j := 0; j+4 <= size; j += 4 {
				binary.BigEndian.PutUint32(want[j:], num)
			}
			if !bytes.Equal(p, want) || num < uint32(first) || num >= uint32(first+count) || seen[num] {
				t.Fatalf("datagram %d corrupt, out of range or repeated", num)
			}
			seen[num] = true
		}
	}
}

// TestSmallBatchDeliversWholeBatches: the standard bind reads a full batch
// (with UDP GRO, coalesced datagrams split forward) while wireguard-go
// passes 8 buffers; every datagram reaches the caller once and whole, the
// ones past its buffers on later calls.
func TestSmallBatchDeliversWholeBatches(t *testing.T) {
	t.Parallel()
	recv, full, send, ep := loopbackBinds(t)
	if full <= 8 {
		t.Skipf("the bind's batch is %d: nothing to adapt", full)
	}
	const size = 1200
	r := newSmallBatch(recv, full, size+messageOverhead)
	for round := range 3 {
		sendNumbered(t, send, ep, round*64, 64, size)
		receiveNumbered(t, r, 8, round*64, 64, size)
	}
	if r.n <= 8 {
		t.Fatalf("the bind never returned more than the caller's batch (last %d): the handover was not exercised", r.n)
	}
}

// TestSmallBatchGrowsForLargerPackets: a peer whose packets are larger than
// the MTU said loses the ones that landed in its too small buffers, and no
// more.
func TestSmallBatchGrowsForLargerPackets(t *testing.T) {
	t.Parallel()
	recv, full, send, ep := loopbackBinds(t)
	if full <= 8 {
		t.Skipf("the bind's batch is %d: nothing to adapt", full)
	}
	const size = 1200
	r := newSmallBatch(recv, full, 100)
	sendNumbered(t, send, ep, 0, 64, size)
	bufs := make([][]byte, 8)
	for i := range bufs {
		bufs[i] = make([]byte, device.MaxMessageSize)
	}
	sizes, eps := make([]int, 8), make([]conn.Endpoint, 8)
	cut := 0
	for got := 0; got < 64; {
		n, err := r.receive(bufs, sizes, eps)
		if err != nil {
			t.Fatal(err)
		}
		for i := range n {
			if sizes[i] != size {
				cut++
			}
		}
		got += n
	}
	if cut == 0 || r.slot != device.MaxMessageSize {
		t.Fatalf("%d packets cut, slot %d: want some cut and the buffers grown", cut, r.slot)
	}
	sendNumbered(t, send, ep, 64, 64, size)
	receiveNumbered(t, r, 8, 64, 64, size)
}

// TestSmallBatchClosed: a closed bind's error reaches the caller.
func TestSmallBatchClosed(t *testing.T) {
	t.Parallel()
	b := conn.NewStdNetBind()
	fns, _, err := b.Open(0)
	if err != nil {
		t.Fatal(err)
	}
	r := newSmallBatch(fns[0], b.BatchSize(), 1500)
	b.Close()
	bufs := [][]byte{make([]byte, device.MaxMessageSize)}
	if _, err := r.receive(bufs, make([]int, 1), make([]conn.Endpoint, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("receive on a closed bind: %v, want net.ErrClosed", err)
	}
}

// TestDeviceBatchSize: the device natbox builds holds deviceBatch buffers
// per receive function and TUN reader, not the standard bind's 128.
func TestDeviceBatchSize(t *testing.T) {
	t.Parallel()
	key, _ := conf.GenerateKey()
	d, _, err := newDevice(tuntest.NewChannelTUN().TUN(), conn.NewStdNetBind(), key, 0, gatePackets, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if got := d.BatchSize(); got != deviceBatch {
		t.Fatalf("device batch size %d, want %d", got, deviceBatch)
	}
}
