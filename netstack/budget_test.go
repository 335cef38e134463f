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
