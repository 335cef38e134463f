package forwarder

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
)

// chunkConn is a kernel TCP conn that asks for writes of chunk bytes, as a
// netstack conn does, and records the size of every write.
type chunkConn struct {
	*net.TCPConn
	chunk int
	mu    sync.Mutex
	sizes []int
}

func (c *chunkConn) WriteChunk() int { return c.chunk }

func (c *chunkConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	c.sizes = append(c.sizes, len(b))
	c.mu.Unlock()
	return c.TCPConn.Write(b)
}

// TestSpliceBulkWritesInChunks: a bulk copy towards a conn with a write
// chunk reads (and so writes) at most a chunk at a time, most writes are
// whole chunks, and every byte arrives in order; a conn without one gets
// the whole large buffer.
func TestSpliceBulkWritesInChunks(t *testing.T) {
	const chunk = 10000
	aUser, a := tcpPair(t)
	bConn, bUser := tcpPair(t)
	b := &chunkConn{TCPConn: bConn.(*net.TCPConn), chunk: chunk}
	var it idleTimer
	it.clock = wallClock{}
	it.touch()
	sp := newSplicer(a, b, &it)
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
	go func() {
		aUser.Write(want) // the socket buffers fill: reads find more than a chunk queued
		aUser.(*net.TCPConn).CloseWrite()
	}()
	bUser.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(bUser)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("received %d bytes (%v), want the %d sent, in order", len(got), err, size)
	}
	if _, err := io.ReadAll(aUser); err != nil {
		t.Fatalf("client side: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("splice: %v", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	whole, largest := 0, 0
	for _, n := range b.sizes {
		largest = max(largest, n)
		if n == chunk {
			whole++
		}
	}
	if largest > chunk {
		t.Errorf("a write of %d bytes to a conn whose chunk is %d", largest, chunk)
	}
	if whole*chunk < size/2 {
		t.Errorf("%d whole chunks in %d writes carried less than half of the %d bytes", whole, len(b.sizes), size)
	}
}

// TestBulkBuf: the chunk applies only between the small buffer's size and
// the large buffer's.
func TestBulkBuf(t *testing.T) {
	big := make([]byte, copyBufSize)
	for _, tc := range []struct {
		dst  net.Conn
		want int
	}{
		{&chunkConn{chunk: 63840}, 63840},
		{&chunkConn{chunk: 0}, copyBufSize},                    // unknown yet
		{&chunkConn{chunk: smallCopyBufSize - 1}, copyBufSize}, // smaller than the small buffer
		{&chunkConn{chunk: copyBufSize + 1}, copyBufSize},
		{&net.TCPConn{}, copyBufSize},
	} {
		if got := len(bulkBuf(big, tc.dst)); got != tc.want {
			t.Errorf("%T %+v: %d bytes, want %d", tc.dst, tc.dst, got, tc.want)
		}
	}
}
