package netstack

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
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

// TestConnBudgetBulkShares: light connections get at most lightBufMax and
// the bulk directions what all buffers at the light share leave of the
// budget, so a bulk flow beside 200 idle connections keeps a window of
// megabytes (an equal share would be 32 KiB); a one-way flow (one bulk
// direction) gets the share two directions would split; past the floor
// everyone is equal again.
func TestConnBudgetBulkShares(t *testing.T) {
	b := connBudget{total: 24 << 20, recvMax: defaultRecvBufMax, sendMax: defaultSendBufMax}
	for _, tt := range []struct{ conns, dirs, light, bulkShare int }{
		{1, 0, 1 << 20, 1 << 20},
		{2, 1, 1 << 20, 16 << 20},     // 21 MiB: the maximum
		{2, 2, 1 << 20, 10 << 20},     // 11 MiB, in quarters of 8 MiB
		{5, 4, 1 << 20, 4 << 20},      // four one-way flows: 4.5 MiB, in quarters of 4 MiB
		{5, 8, 1 << 20, 5 << 19},      // four both ways: 2.75 MiB, in quarters of 2 MiB
		{201, 1, 32 << 10, 10 << 20},  // 24 MiB - 402 * 32 KiB = 11.4 MiB
		{100, 100, 64 << 10, 5 << 15}, // 100 one-way: 181 KiB, in quarters of 128 KiB
		{100, 200, 64 << 10, 7 << 14}, // 100 both ways: 123 KiB, in quarters of 64 KiB
		{10000, 1, minConnBuf, minConnBuf},
	} {
		light := b.lightFor(tt.conns)
		bulk := b.bulkFor(tt.conns, tt.dirs, light)
		if light != tt.light || bulk != tt.bulkShare {
			t.Errorf("%d connections, %d bulk directions: shares %d / %d, want %d / %d", tt.conns, tt.dirs, light, bulk, tt.light, tt.bulkShare)
		}
		if tt.light > minConnBuf && 2*tt.conns*light+tt.dirs*(bulk-light) > b.total {
			t.Errorf("%d connections, %d bulk directions: %d / %d exceed the budget", tt.conns, tt.dirs, light, bulk)
		}
	}
}

// TestBudgetBulkBesideIdle: 20 idle connections, one that streams into a
// stack with a 32 MiB budget and one it streams out of. Within a few checks
// both become bulk, each in its own direction: the upload's receive buffer
// and the download's send buffer get what the light buffers leave (5 MiB,
// where an equal share would be 512 KiB), their other buffers stay light,
// all inside the budget; the stack keeps the configured receive maximum,
// from which gVisor derives the window scale of each handshake (a scale for
// the light share would cap the bulk window at twice that share). Once
// they stop, they are light again.
func TestBudgetBulkBesideIdle(t *testing.T) {
	const (
		idle   = 20
		budget = 32 << 20
	)
	var upload, download sync.Map // *tcpConn -> struct{}
	stop := make(chan struct{})
	client, server := newPairConfig(t, Config{TCP: TCPConfig{BufferBudget: budget}}, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		switch r.Dst.Port() {
		case 80:
			upload.Store(c.(*tcpConn), struct{}{})
		case 82:
			download.Store(c.(*tcpConn), struct{}{})
			c.SetWriteDeadline(time.Now().Add(20 * time.Second))
			streamTo(c, stop)
			// Stay open (and counted) until the client closes.
		}
		io.Copy(io.Discard, c)
	}})
	ctx := testContext(t)
	for range idle {
		c, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:81"))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		t.Cleanup(func() { c.Close() })
	}
	up, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:80"))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer up.Close()
	down, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:82"))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer down.Close()
	go io.Copy(io.Discard, down)
	streamed := make(chan error, 1)
	go func() {
		up.SetWriteDeadline(time.Now().Add(20 * time.Second))
		streamed <- streamTo(up, stop)
	}()
	deadline := time.Now().Add(10 * time.Second)
	var st Stats
	for {
		st = server.Stats()
		if st.TCPBulkConns == 2 {
			break
		}
		if time.Now().After(deadline) {
			close(stop)
			t.Fatalf("the streaming connections never became bulk: %d conns, %d bulk, %d promoted", st.TCPConns, st.TCPBulkConns, st.TCPBulkPromoted)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Read while both stream: once one stops, the other's share grows.
	uc, dc := onlyConn(t, &upload), onlyConn(t, &download)
	uops, dops := uc.ep.SocketOptions(), dc.ep.SocketOptions()
	ur, us := uops.GetReceiveBufferSize(), uops.GetSendBufferSize()
	dr, ds := dops.GetReceiveBufferSize(), dops.GetSendBufferSize()
	close(stop)
	if err := <-streamed; err != nil {
		t.Fatalf("stream: %v", err)
	}
	if st.TCPConns != idle+2 || st.TCPBufferShare != 512<<10 || st.TCPBulkShare != 5<<20 || st.TCPBulkPromoted != 2 {
		t.Errorf("%d conns, light share %d, bulk share %d, %d promoted; want %d, 512 KiB, 5 MiB, 2",
			st.TCPConns, st.TCPBufferShare, st.TCPBulkShare, st.TCPBulkPromoted, idle+2)
	}
	if used := 2*st.TCPConns*st.TCPBufferShare + 2*(st.TCPBulkShare-st.TCPBufferShare); used > budget {
		t.Errorf("shares add up to %d, above the budget %d", used, budget)
	}
	if ur != 5<<20 || us > 512<<10 {
		t.Errorf("upload's buffers %d / %d, want the bulk share 5 MiB to receive, at most the light 512 KiB to send", ur, us)
	}
	if ds != 5<<20 || dr > 512<<10 {
		t.Errorf("download's buffers %d / %d, want at most the light 512 KiB to receive, the bulk share 5 MiB to send", dr, ds)
	}
	var rs tcpip.TCPReceiveBufferSizeRangeOption
	if err := server.stack.TransportProtocolOption(tcp.ProtocolNumber, &rs); err != nil || rs.Max != defaultRecvBufMax {
		t.Errorf("stack receive maximum %d (%v), want the configured %d: the window scale comes from it", rs.Max, err, defaultRecvBufMax)
	}
	deadline = time.Now().Add(10 * time.Second)
	for server.Stats().TCPBulkConns != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the connections stayed bulk after they stopped")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if r := uc.ep.SocketOptions().GetReceiveBufferSize(); r > 512<<10 {
		t.Errorf("upload's receive buffer %d once light again, want at most the light share", r)
	}
	if s := dc.ep.SocketOptions().GetSendBufferSize(); s > 512<<10 {
		t.Errorf("download's send buffer %d once light again, want at most the light share", s)
	}
}

// streamTo writes 64 KiB blocks to c until stop closes (at most 256 MiB).
func streamTo(c net.Conn, stop <-chan struct{}) error {
	buf := make([]byte, 64<<10)
	for range 4096 {
		select {
		case <-stop:
			return nil
		default:
		}
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
	return nil
}

// onlyConn returns the one connection stored in m.
func onlyConn(t *testing.T, m *sync.Map) *tcpConn {
	t.Helper()
	var c *tcpConn
	m.Range(func(k, _ any) bool { c = k.(*tcpConn); return false })
	if c == nil {
		t.Fatal("the handler never saw the streaming connection")
	}
	return c
}

// TestBudgetLightRecvFollowsShare: a light connection keeps the receive
// buffer it was accepted with while the share allows it, is cut when a
// crowd arrives, and gets it back once the crowd is gone.
func TestBudgetLightRecvFollowsShare(t *testing.T) {
	const crowd = 100
	first := make(chan *tcpConn, 1)
	client, server := newPairConfig(t, Config{TCP: TCPConfig{BufferBudget: 32 << 20}}, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if r.Dst.Port() == 80 {
			first <- c.(*tcpConn)
		}
		io.Copy(io.Discard, c)
	}})
	ctx := testContext(t)
	dial := func(port uint16) net.Conn {
		c, err := client.DialTCP(ctx, netip.AddrPort{}, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.2"), port))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		return c
	}
	defer dial(80).Close()
	a := <-first
	recv := func() int {
		server.conns.mu.Lock()
		defer server.conns.mu.Unlock()
		return int(a.ep.SocketOptions().GetReceiveBufferSize())
	}
	start := server.conns.initialWindow()
	if got := recv(); got != start {
		t.Fatalf("receive buffer %d alone, want the initial window %d", got, start)
	}
	var crowdConns []net.Conn
	for range crowd {
		crowdConns = append(crowdConns, dial(81))
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d conns, light share %d, receive buffer %d", what, server.Stats().TCPConns, server.Stats().TCPBufferShare, recv())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor("cut by the crowd", func() bool { return server.Stats().TCPConns == crowd+1 && recv() == 128<<10 })
	for _, c := range crowdConns {
		c.Close()
	}
	waitFor("back once the crowd left", func() bool { return server.Stats().TCPConns == 1 && recv() == start })
}

// TestStandbyThenCloseLeavesTheBudget: a connection closed while on standby
// (a relay's idle warm stream closed by its pool's sweep) is forgotten by the
// budget, and a Resume after the Close does not count it again. Its cut
// receive buffer once kept it watched, and referenced, for the stack's life.
func TestStandbyThenCloseLeavesTheBudget(t *testing.T) {
	const n = 20
	accepted := make(chan *tcpConn, n)
	client, server := newPairConfig(t, Config{TCP: TCPConfig{BufferBudget: 32 << 20}}, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		if c, err := r.Accept(); err == nil {
			accepted <- c.(*tcpConn)
		}
	}})
	ctx := testContext(t)
	for range n {
		c, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:81"))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		t.Cleanup(func() { c.Close() })
	}
	for range n {
		c := <-accepted
		c.Standby()
		c.Close()
		c.Resume()
	}
	time.Sleep(2 * bulkCheckEvery) // the checks must not keep them either
	b := &server.conns
	b.mu.Lock()
	watched, counted := len(b.cutRecv), len(b.conns)
	b.mu.Unlock()
	if watched != 0 || counted != 0 {
		t.Fatalf("after %d standby connections closed: %d still watched, %d counted; want none", n, watched, counted)
	}
}

// TestStandbyLeavesTheBudget: connections on standby (a relay's warm
// streams waiting for a flow) hold two segments' buffers and no share: 20
// of them beside one connection leave it the share of one, where counted
// they would thin it to a twenty-first; resumed, one is a light connection
// again, and bytes still cross it.
func TestStandbyLeavesTheBudget(t *testing.T) {
	const (
		idle   = 20
		budget = 32 << 20
	)
	accepted := make(chan *tcpConn, idle+1)
	client, server := newPairConfig(t, Config{TCP: TCPConfig{BufferBudget: budget}}, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		accepted <- c.(*tcpConn)
		io.Copy(c, c)
	}})
	ctx := testContext(t)
	var clients []net.Conn
	for range idle + 1 {
		c, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:81"))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		clients = append(clients, c)
	}
	var conns []*tcpConn
	for range idle + 1 {
		conns = append(conns, <-accepted)
	}
	counted := server.Stats()
	for _, c := range conns[1:] {
		c.Standby()
	}
	st := server.Stats()
	if st.TCPConns != 1 || st.TCPBufferShare <= counted.TCPBufferShare {
		t.Fatalf("%d of %d on standby: %d conns counted, light share %d (was %d with all counted); want 1, more",
			idle, idle+1, st.TCPConns, st.TCPBufferShare, counted.TCPBufferShare)
	}
	waiting := conns[1]
	ops := waiting.ep.SocketOptions()
	if r, s := int(ops.GetReceiveBufferSize()), int(ops.GetSendBufferSize()); r != waiting.floor || s != waiting.floor {
		t.Fatalf("standby buffers %d / %d, want the floor %d", r, s, waiting.floor)
	}
	waiting.Resume()
	waiting.Resume() // twice: counted once
	if st := server.Stats(); st.TCPConns != 2 {
		t.Fatalf("after resume %d conns counted, want 2", st.TCPConns)
	}
	if r := int(ops.GetReceiveBufferSize()); r <= waiting.floor {
		t.Fatalf("resumed receive buffer %d, want above the floor %d", r, waiting.floor)
	}
	// Bytes cross the resumed connection and the one never on standby.
	payload := bytes.Repeat([]byte("warm"), 64<<10)
	echoed := 0
	for _, c := range clients {
		if a := c.LocalAddr().String(); a != conns[0].RemoteAddr().String() && a != waiting.RemoteAddr().String() {
			continue
		}
		echoed++
		go c.Write(payload)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got := make([]byte, len(payload))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("echo on %s: %v", c.LocalAddr(), err)
		}
	}
	if echoed != 2 {
		t.Fatalf("found %d of the 2 connections' clients", echoed)
	}
}
