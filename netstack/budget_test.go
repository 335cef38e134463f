package netstack

import (
	"io"
	"net/netip"
	"sync"
	"testing"
	"time"
)

func TestConnBudgetShare(t *testing.T) {
	b := connBudget{total: 6 << 20, recvMax: defaultRecvBufMax, sendMax: defaultSendBufMax}
	for _, tt := range []struct{ conns, want int }{
		{0, 2 << 20}, {1, 2 << 20}, {2, 1 << 20}, {3, 1 << 20}, {4, 512 << 10},
		{100, 16 << 10}, {10000, minConnBuf}, // the floor, not the budget
	} {
		if got := b.shareFor(tt.conns); got != tt.want {
			t.Errorf("shareFor(%d) = %d, want %d", tt.conns, got, tt.want)
		}
	}
	big := connBudget{total: 1 << 30, recvMax: defaultRecvBufMax, sendMax: defaultSendBufMax}
	if got := big.shareFor(1); got != defaultRecvBufMax {
		t.Errorf("a large budget's share = %d, want the configured maximum %d", got, defaultRecvBufMax)
	}
}

// TestBufferBudgetSharedOut: 16 connections into a stack with a 1 MiB
// budget whose handler does not read yet: as they arrive the share falls to
// 32 KiB and the buffers that grew past it are cut, so what the stack holds
// received and unread stays within 16 windows of 32 KiB while the clients
// still have data to send. Then every byte arrives, and with the
// connections closed the share is back.
func TestBufferBudgetSharedOut(t *testing.T) {
	const (
		conns = 16
		size  = 256 << 10
	)
	release := make(chan struct{})
	var once sync.Once
	open := func() { once.Do(func() { close(release) }) }
	t.Cleanup(open)
	got := make(chan int64, conns)
	client, server := newPairConfig(t, Config{TCP: TCPConfig{BufferBudget: 1 << 20}}, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		<-release
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}})
	ctx := testContext(t)
	var wg sync.WaitGroup
	for range conns {
		c, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:80"))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write(make([]byte, size)); err != nil {
				t.Errorf("write: %v", err)
			}
			c.(closeWriter).CloseWrite()
			io.Copy(io.Discard, c)
		}()
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := server.Stats()
		if st.TCPConns == conns && st.TCPRecvQueued >= conns*(4<<10) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("connections never backed up: %d conns, %d bytes queued", st.TCPConns, st.TCPRecvQueued)
		}
		time.Sleep(5 * time.Millisecond)
	}
	st := server.Stats()
	if st.TCPBufferShare != 32<<10 || st.TCPBufferCuts == 0 || st.TCPBufferLowered == 0 {
		t.Errorf("share %d, cuts %d, lowered %d; want 32 KiB (1 MiB / 2 / 16), > 0, > 0", st.TCPBufferShare, st.TCPBufferCuts, st.TCPBufferLowered)
	}
	// A window counts gVisor's overhead per segment, so data stays below it.
	if st.TCPRecvQueued > conns*(32<<10) {
		t.Errorf("%d bytes received and unread, above %d windows of 32 KiB", st.TCPRecvQueued, conns)
	}
	open()
	for range conns {
		if n := <-got; n != size {
			t.Errorf("a connection delivered %d bytes, want %d", n, size)
		}
	}
	wg.Wait()
	deadline = time.Now().Add(10 * time.Second)
	for server.Stats().TCPConns != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still counted after every one closed", server.Stats().TCPConns)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if share := server.Stats().TCPBufferShare; share != 512<<10 {
		t.Errorf("share %d with no connections, want 512 KiB (1 MiB / 2)", share)
	}
}

// TestBudgetKeepsTwoSegments: on a 9000-byte path, a budget share too small
// for two segments caps the MTU new connections use (their MSS), and a
// connection that started at the full MTU keeps two of its segments when
// the share falls under it, so that no connection is left with a window
// smaller than a segment (gVisor's sender would wait for its retransmit
// timer). Every byte still arrives.
func TestBudgetKeepsTwoSegments(t *testing.T) {
	const (
		mtu   = 9000
		later = 31 // with the first: 1 MiB / 2 / 32 = 16 KiB shares
		size  = 2 << 20
	)
	release := make(chan struct{})
	var once sync.Once
	open := func() { once.Do(func() { close(release) }) }
	t.Cleanup(open)
	type accepted struct {
		recvBuf int64
		n       int64
	}
	got := make(chan accepted, later+1)
	client, server, _ := newDirectPairConfig(t, Config{MTU: mtu}, Config{MTU: mtu, TCP: TCPConfig{BufferBudget: 1 << 20}},
		funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
			c, err := r.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			<-release
			buf := c.(*tcpConn).ep.SocketOptions().GetReceiveBufferSize()
			n, _ := io.Copy(io.Discard, c)
			got <- accepted{buf, n}
		}})
	if m := server.RouteMTU(); m != mtu {
		t.Fatalf("route mtu %d with no connections, want %d", m, mtu)
	}
	ctx := testContext(t)
	var wg sync.WaitGroup
	send := func(n int) {
		c, err := client.DialTCP(ctx, netip.AddrPort{}, netip.AddrPortFrom(serverPrefix4.Addr(), 80))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			if _, err := c.Write(make([]byte, n)); err != nil {
				t.Errorf("write: %v", err)
			}
			c.(closeWriter).CloseWrite()
			io.Copy(io.Discard, c)
		}()
	}
	send(size) // the early one, at the full MTU
	waitStats(t, server, func(st Stats) bool { return st.TCPConns == 1 })
	for range later {
		send(64 << 10)
	}
	waitStats(t, server, func(st Stats) bool { return st.TCPConns == later+1 })
	st := server.Stats()
	wantMTU := 16<<10/2 + 40
	if st.TCPBufferShare != 16<<10 || st.RouteMTU != uint64(wantMTU) || server.RouteMTU() != wantMTU {
		t.Fatalf("share %d, route mtu %d; want 16 KiB and %d (two segments of it fill the share)", st.TCPBufferShare, st.RouteMTU, wantMTU)
	}
	if server.PathMTU() != mtu {
		t.Fatalf("path mtu %d, want %d (the budget changes only the routes)", server.PathMTU(), mtu)
	}
	open()
	wg.Wait()
	floor, full := int64(2*(mtu-40)), 0
	for range later + 1 {
		a := <-got
		if a.recvBuf < 16<<10 {
			t.Errorf("a connection's receive buffer %d, below the 16 KiB share", a.recvBuf)
		}
		if a.n == size {
			full++
			if a.recvBuf < floor {
				t.Errorf("the early connection's receive buffer was cut to %d, below two %d-byte segments (%d)", a.recvBuf, mtu-40, floor)
			}
		} else if a.n != 64<<10 {
			t.Errorf("a connection delivered %d bytes", a.n)
		}
	}
	if full != 1 {
		t.Errorf("%d connections delivered %d bytes, want 1", full, size)
	}
}

// waitStats polls the stack's stats until cond holds (10 s at most).
func waitStats(t *testing.T, s *Stack, cond func(Stats) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond(s.Stats()) {
		if time.Now().After(deadline) {
			t.Fatalf("stats never got there: %+v", s.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
