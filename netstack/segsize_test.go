package netstack

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestWriteChunkWholeSegments sends through two Direct pairs at a 32000-byte
// MTU in writes of WriteChunk bytes and in 64 KiB writes: the chunks leave
// as full segments only (two per chunk), the 64 KiB writes as at least half
// as many packets again (gVisor cuts each at its GSO limit and sends what
// is left as a short segment of its own).
func TestWriteChunkWholeSegments(t *testing.T) {
	const mtu = 32000
	const writes = 20
	got := make(chan int64, 2)
	sink := funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}}
	client, _, br := newDirectPair(t, mtu, funcHandler{}, sink)
	dst := netip.AddrPortFrom(serverPrefix4.Addr(), 9)

	send := func(size func(c net.Conn) int) (packets uint64, chunk int) {
		t.Helper()
		c, err := client.DialTCP(testContext(t), netip.AddrPort{}, dst)
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		wc, ok := c.(interface{ WriteChunk() int })
		if !ok {
			t.Fatalf("%T has no WriteChunk", c)
		}
		if n := wc.WriteChunk(); n != 0 {
			t.Fatalf("WriteChunk %d before any data left: want 0 (unknown)", n)
		}
		if _, err := c.Write([]byte{1}); err != nil {
			t.Fatalf("write: %v", err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for chunk = wc.WriteChunk(); chunk == 0; chunk = wc.WriteChunk() {
			if time.Now().After(deadline) {
				t.Fatal("WriteChunk still 0 after the first data segment left")
			}
			time.Sleep(time.Millisecond)
		}
		n := size(c)
		before := client.Stats().PacketsOut
		buf := make([]byte, n)
		for range writes {
			if _, err := c.Write(buf); err != nil {
				t.Fatalf("write: %v", err)
			}
		}
		c.(closeWriter).CloseWrite()
		if r := <-got; r != 1+writes*int64(n) {
			t.Fatalf("server read %d bytes, want %d", r, 1+writes*n)
		}
		return client.Stats().PacketsOut - before, chunk
	}

	chunked, chunk := send(func(c net.Conn) int { return c.(interface{ WriteChunk() int }).WriteChunk() })
	// The payload of a full segment: the MTU less the IPv4 and TCP headers
	// and the options gVisor keeps room for (timestamps, SACK blocks).
	const payload = mtu - 20 - 20 - 40
	if chunk%payload != 0 || chunk > 65375 || chunk < 65375-payload {
		t.Errorf("WriteChunk %d: want the largest multiple of %d up to gVisor's GSO limit 65375", chunk, payload)
	}
	// Full segments, plus the FIN and a few pure ACKs (window updates).
	if want := uint64(writes*chunk/payload + 6); chunked > want {
		t.Errorf("%d writes of %d bytes left as %d packets, want at most %d (full segments)", writes, chunk, chunked, want)
	}
	big, _ := send(func(net.Conn) int { return 64 << 10 })
	if big*2 < chunked*3 {
		t.Errorf("64 KiB writes left as %d packets, chunks as %d: want at least half as many again (short segments)", big, chunked)
	}
	br.check(t)
}
