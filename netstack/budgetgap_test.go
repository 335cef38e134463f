package netstack

import (
	"encoding/binary"
	"io"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.zx2c4.com/wireguard/tun"
)

// gapLine copies packets from one Direct device to another, dropping those
// drop says to.
func gapLine(from, to tun.Device, drop func(p []byte) bool) {
	linePackets(from, func(framed []byte) bool {
		if drop != nil && drop(framed[wgOffset:]) {
			return true
		}
		_, err := to.Write([][]byte{framed}, wgOffset)
		return err == nil
	})
}

// tcpData returns an IPv4 TCP packet's sequence number and payload length.
func tcpData(p []byte) (seq uint32, payload int, ok bool) {
	if len(p) < 20 || p[0]>>4 != 4 || p[9] != 6 {
		return 0, 0, false
	}
	ihl := int(p[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(p[2:4]))
	if len(p) < ihl+20 || total > len(p) {
		return 0, 0, false
	}
	tcp := p[ihl:]
	return binary.BigEndian.Uint32(tcp[4:8]), total - ihl - int(tcp[12]>>4)*4, true
}

// TestBudgetThawsAStuckGap: the line withholds one segment of a bulk
// upload (and its resends) while the receiver piles up the segments after
// it; the budget then cuts the receiver's buffer below them (as a crowd of
// new connections would). gVisor refuses the resent segment that fills the
// gap while what it holds passes the buffer, and its share alone would
// never give it room: without the thaw the upload stalls for good. With
// it, the buffer gets its size back once the refusals show, the gap fills,
// and every byte arrives (budget.go, thawStuckLocked).
func TestBudgetThawsAStuckGap(t *testing.T) {
	cs, co := Direct(1500)
	ss, so := Direct(1500)
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	got := make(chan int64, 1)
	accepted := make(chan *tcpConn, 1)
	c, err := New(cs, Config{Addresses: []netip.Prefix{clientPrefix4}}, funcHandler{}, log.Named("client"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(ss, Config{Addresses: []netip.Prefix{serverPrefix4}, TCP: TCPConfig{BufferBudget: 64 << 20}},
		funcHandler{tcp: func(r *TCPRequest) {
			conn, err := r.Accept()
			if err != nil {
				return
			}
			defer conn.Close()
			accepted <- conn.(*tcpConn)
			n, _ := io.Copy(io.Discard, conn)
			got <- n
		}}, log.Named("server"))
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	var (
		arm    atomic.Bool   // withhold the next data segment
		gapSeq atomic.Uint64 // its sequence number + 1 (0: none yet)
		hold   atomic.Bool   // drop it, and every resend of it
		held   atomic.Int64  // copies of it dropped
	)
	hold.Store(true)
	drop := func(p []byte) bool {
		seq, n, ok := tcpData(p)
		if !ok || n == 0 {
			return false
		}
		if arm.Load() && gapSeq.CompareAndSwap(0, uint64(seq)+1) {
			arm.Store(false)
		}
		if hold.Load() && gapSeq.Load() == uint64(seq)+1 {
			held.Add(1)
			return true
		}
		return false
	}
	done := make(chan struct{}, 2)
	go func() { gapLine(co, so, drop); done <- struct{}{} }()
	go func() { gapLine(so, co, nil); done <- struct{}{} }()
	t.Cleanup(func() { s.Close(); c.Close(); <-done; <-done })
	runStack(t, c)
	runStack(t, s)

	// The client writes until told to stop, then closes: what it wrote is
	// what the server must read.
	var stop atomic.Bool
	written := make(chan int64, 1)
	go func() {
		var n int64
		defer func() { written <- n }()
		conn, err := c.DialTCP(testContext(t), netip.AddrPort{}, netip.AddrPortFrom(serverPrefix4.Addr(), 9))
		if err != nil {
			t.Errorf("dial: %v", err)
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(40 * time.Second))
		buf := make([]byte, 256<<10)
		for !stop.Load() {
			m, err := conn.Write(buf)
			n += int64(m)
			if err != nil {
				t.Errorf("write: %v", err)
				return
			}
		}
	}()
	sc := <-accepted
	waitUntil := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: server %+v", what, s.Stats())
			}
		}
	}
	// Bulk first, so its window is far above what a light share gives back.
	waitUntil("the upload bulk", func() bool { return s.Stats().TCPBulkConns == 1 })
	arm.Store(true)
	waitUntil("a segment withheld", func() bool { return held.Load() >= 2 }) // the segment and a resend
	in := sc.movedIn.Load()
	time.Sleep(100 * time.Millisecond)
	if sc.movedIn.Load() != in {
		t.Fatal("the reader got data past the withheld segment")
	}
	s.conns.mu.Lock()
	before := int(sc.ep.SocketOptions().GetReceiveBufferSize())
	sc.fitBuffers(0, 0) // cut to the floor: below the held segments
	s.conns.mu.Unlock()
	hold.Store(false)
	// The reader gets data again, well past the gap.
	for deadline := time.Now().Add(20 * time.Second); sc.movedIn.Load() < in+4<<20; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("stalled after the cut from %d bytes: read %d, %d then; %d copies of the gap withheld; server %+v",
				before, sc.movedIn.Load(), in, held.Load(), s.Stats())
		}
	}
	stop.Store(true)
	n := <-written
	select {
	case got := <-got:
		if got != n {
			t.Fatalf("server read %d of %d bytes", got, n)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("the upload's end never arrived: read %d of %d", sc.movedIn.Load(), n)
	}
	if st := s.Stats(); st.TCPBufferThaws == 0 {
		t.Errorf("no thaw counted (the gap filled without one?): %+v", st)
	}
}
