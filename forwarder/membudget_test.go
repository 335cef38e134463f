package forwarder

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net/netip"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
)

// TestSpliceBufferBudget splices 4 MiB each way through a budget that has
// room for one large buffer while another holder keeps it: the splice's
// reads stay in its small buffer (each refusal counted), every byte arrives
// in order, and once the holder gives its share back the splice may take
// it and returns it when done.
func TestSpliceBufferBudget(t *testing.T) {
	for _, held := range []bool{true, false} {
		name := "room"
		if held {
			name = "spent"
		}
		t.Run(name, func(t *testing.T) {
			b := newBufBudget(copyBufSize, zaptest.NewLogger(t))
			if held && !b.take(copyBufSize) {
				t.Fatal("an empty budget refused its whole size")
			}
			aUser, a := tcpPair(t)
			bUser, bb := tcpPair(t)
			var it idleTimer
			it.clock = wallClock{}
			it.touch()
			sp := newSplicer(a, bb, &it)
			sp.bufs = b
			done := make(chan error, 1)
			go func() {
				_, _, err := sp.run(nil, nil)
				done <- err
			}()
			const size = 4 << 20
			want := make([]byte, size)
			for i := range want {
				want[i] = byte(rand.Uint32())
			}
			send := func(w io.Writer, closeWrite func() error) {
				w.Write(want)
				closeWrite()
			}
			go send(aUser, aUser.(interface{ CloseWrite() error }).CloseWrite)
			go send(bUser, bUser.(interface{ CloseWrite() error }).CloseWrite)
			for _, r := range []io.Reader{bUser, aUser} {
				got, err := io.ReadAll(r)
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("received %d bytes (%v), want the %d sent, in order", len(got), err, size)
				}
			}
			if err := <-done; err != nil {
				t.Fatalf("splice: %v", err)
			}
			var st Status
			b.fill(&st)
			wantUsed := int64(0)
			if held {
				wantUsed = copyBufSize
			}
			if st.BufferUsedBytes != wantUsed || st.BufferBudgetBytes != copyBufSize {
				t.Errorf("after the splice: budget %d, used %d; want %d, %d (the splice gave back what it took)", st.BufferBudgetBytes, st.BufferUsedBytes, copyBufSize, wantUsed)
			}
			if held && st.BufferDenied == 0 {
				t.Error("a spent budget refused nothing: the splice took a large buffer anyway")
			}
		})
	}
}

// TestUDPQueueBufferBudget: datagrams queue while the budget has room,
// are dropped (and counted) beyond it, and taking them out frees it.
func TestUDPQueueBufferBudget(t *testing.T) {
	b := newBufBudget(3*smallDatagram, nil)
	q := newDatagramQueue(100, b)
	for i := range 3 {
		if !q.push(datagram{buf: getDatagramBuf(10), n: i}) {
			t.Fatalf("push %d refused within the budget", i)
		}
	}
	bp := getDatagramBuf(10)
	if q.push(datagram{buf: bp, n: 3}) {
		t.Fatal("push beyond the budget accepted")
	}
	putDatagramBuf(bp)
	if b.denied.Load() != 1 || b.used.Load() != 3*smallDatagram {
		t.Fatalf("budget: used %d, denied %d; want %d, 1", b.used.Load(), b.denied.Load(), 3*smallDatagram)
	}
	for _, d := range q.take(nil, 2) {
		putDatagramBuf(d.buf)
	}
	if b.used.Load() != smallDatagram {
		t.Fatalf("after taking two: used %d, want %d", b.used.Load(), smallDatagram)
	}
	if !q.push(datagram{buf: getDatagramBuf(10), n: 4}) {
		t.Fatal("push refused after the budget was freed")
	}
}

// TestEngineUDPBufferBudget floods a UDP session whose target is stuck:
// with a budget of ten datagram buffers (and a 2048-slot queue) the session
// holds at most ten in its queue plus the batch its sender took before the
// budget ran out; the rest is dropped, counted as drops and as budget
// refusals, and the budget is given back as the queue drains.
func TestEngineUDPBufferBudget(t *testing.T) {
	port := udpEcho(t)
	e, err := New(config(mapping("stuck", conf.UDP, "6000", "127.0.0.1:"+itoa(port))), Options{BufferBudget: 10 * smallDatagram}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	e.beforeUDPSend = func(string) { <-release }
	defer e.Close()
	tun := newIngress(conf.IngressTUN)
	client := netip.MustParseAddrPort("203.0.113.1:1000")
	dst := netip.MustParseAddrPort("198.51.100.1:6000")
	const n = 5000
	for range n {
		e.HandleUDP(tun, client, dst, make([]byte, 1200))
	}
	st := e.Snapshot()
	if st.BufferBudgetBytes != 10*smallDatagram || st.BufferUsedBytes > st.BufferBudgetBytes || st.BufferDenied == 0 {
		t.Errorf("status: buffer budget %d, used %d, denied %d; want %d, <= budget, > 0", st.BufferBudgetBytes, st.BufferUsedBytes, st.BufferDenied, 10*smallDatagram)
	}
	// In the queue: at most ten; taken by the stuck sender: one batch.
	if drops := mappingStatus(t, e, "stuck").UDPDropped; drops < n-(10+maxUDPBatch) {
		t.Errorf("dropped %d of %d, want all but ten and one batch", drops, n)
	}
	close(release)
	waitFor(t, "the queue to drain and give the budget back", func() bool { return e.Snapshot().BufferUsedBytes == 0 })
}
