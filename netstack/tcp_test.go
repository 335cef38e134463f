package netstack

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestTCPEchoHalfClose(t *testing.T) {
	echoAddr := loopbackServer(t, echo)
	// greeter closes its write side first, then reports what it received.
	received := make(chan []byte, 1)
	greeterAddr := loopbackServer(t, func(c *net.TCPConn) {
		c.Write([]byte("greeting"))
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		received <- b
	})
	targets := map[uint16]string{7: echoAddr, 25: greeterAddr}
	client, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		spliceTo(targets[r.Dst.Port()])(r)
	}})
	ctx := testContext(t)

	for _, dst := range []string{"10.0.0.2:7", "[fd00::2]:7"} {
		t.Run("client closes first "+dst, func(t *testing.T) {
			c, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort(dst))
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			msg := []byte("hello through two gVisor stacks")
			if _, err := c.Write(msg); err != nil {
				t.Fatalf("write: %v", err)
			}
			if err := c.(closeWriter).CloseWrite(); err != nil {
				t.Fatalf("close write: %v", err)
			}
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if !bytes.Equal(got, msg) {
				t.Fatalf("echo = %q, want %q", got, msg)
			}
		})
	}

	t.Run("server closes first", func(t *testing.T) {
		c, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:25"))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		got, err := io.ReadAll(c) // EOF after the greeting: the target half-closed
		if err != nil || string(got) != "greeting" {
			t.Fatalf("read = %q, %v; want greeting, EOF", got, err)
		}
		// Our direction is still open.
		if _, err := c.Write([]byte("still talking")); err != nil {
			t.Fatalf("write after peer half-close: %v", err)
		}
		c.(closeWriter).CloseWrite()
		select {
		case b := <-received:
			if string(b) != "still talking" {
				t.Fatalf("target received %q", b)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("target never saw EOF")
		}
	})
}

func TestTCPTransfer64MiB(t *testing.T) {
	size := 64 << 20
	if testing.Short() {
		size = 8 << 20
	}
	echoAddr := loopbackServer(t, echo)
	client, server := newPair(t, funcHandler{}, funcHandler{tcp: spliceTo(echoAddr)})
	c, err := client.DialTCP(testContext(t), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:7"))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()

	start := time.Now()
	sent := sha256.New()
	var werr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.NewChaCha8([32]byte{1})
		buf := make([]byte, 256<<10)
		for left := size; left > 0; left -= len(buf) {
			b := buf[:min(len(buf), left)]
			rng.Read(b)
			sent.Write(b)
			if _, werr = c.Write(b); werr != nil {
				return
			}
		}
		werr = c.(closeWriter).CloseWrite()
	}()
	got := sha256.New()
	n, err := io.Copy(got, c)
	wg.Wait()
	if werr != nil {
		t.Fatalf("write: %v", werr)
	}
	if err != nil || n != int64(size) {
		t.Fatalf("read %d bytes, %v; want %d", n, err, size)
	}
	if !bytes.Equal(sent.Sum(nil), got.Sum(nil)) {
		t.Fatal("sha-256 of the echoed stream differs from what was sent")
	}
	el := time.Since(start)
	t.Logf("%d MiB each way in %v (%.2f Gbit/s each way); server stats %+v", size>>20, el,
		float64(size)*8/el.Seconds()/1e9, server.Stats())
}

func TestTCPReject(t *testing.T) {
	client, server := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) { r.Reject() }})
	_, err := client.DialTCP(testContext(t), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:80"))
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial error = %v, want connection refused", err)
	}
	if st := server.Stats(); st.TCPRejected != 1 {
		t.Fatalf("TCPRejected = %d, want 1", st.TCPRejected)
	}
}

func TestTCPHandlerAnswersNeither(t *testing.T) {
	client, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {}})
	_, err := client.DialTCP(testContext(t), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:80"))
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial error = %v, want connection refused", err)
	}
}

func TestDialTCPSpoofedSource(t *testing.T) {
	for _, tc := range []struct{ src, dst string }{
		{"192.0.2.77:40000", "203.0.113.9:443"},
		{"[2001:db8::77]:40001", "[2001:db8:1::9]:443"},
	} {
		t.Run(tc.src, func(t *testing.T) {
			seen := make(chan [2]netip.AddrPort, 1)
			client, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
				seen <- [2]netip.AddrPort{r.Src, r.Dst}
				c, err := r.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				// Report the addresses the accepted conn carries too.
				c.Write([]byte(c.RemoteAddr().String() + " " + c.LocalAddr().String()))
			}})
			src, dst := netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst)
			c, err := client.DialTCP(testContext(t), src, dst)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			if got := c.LocalAddr().String(); got != src.String() {
				t.Errorf("client local address %s, want %s", got, src)
			}
			got := <-seen
			if got[0] != src || got[1] != dst {
				t.Fatalf("handler saw %s -> %s, want %s -> %s", got[0], got[1], src, dst)
			}
			b, _ := io.ReadAll(c)
			if want := src.String() + " " + dst.String(); string(b) != want {
				t.Fatalf("accepted conn addresses %q, want %q", b, want)
			}
		})
	}
}

func TestDialTCPContextCancel(t *testing.T) {
	// The server never answers: its handler blocks until the test ends.
	release := make(chan struct{})
	client, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		<-release
		r.Reject()
	}})
	defer close(release)
	ctx, cancel := contextWithTimeout(t, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:80"))
	if err == nil || time.Since(start) > 5*time.Second {
		t.Fatalf("dial = %v after %v, want a prompt context error", err, time.Since(start))
	}
}

func TestCloseWithLiveConnections(t *testing.T) {
	echoAddr := loopbackServer(t, echo)
	client, server := newPair(t, funcHandler{}, funcHandler{tcp: spliceTo(echoAddr)})
	var conns []net.Conn
	for i := 0; i < 8; i++ {
		c, err := client.DialTCP(testContext(t), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:7"))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatalf("write: %v", err)
		}
		b := make([]byte, 4)
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatalf("read: %v", err)
		}
		conns = append(conns, c)
	}
	done := make(chan error, 1)
	go func() { done <- server.Close() }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("server Close hung with live connections")
	}
	if err := server.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("read from a conn whose server stack closed succeeded")
		}
		c.Close()
	}
	client.Close()
	if _, err := client.DialTCP(testContext(t), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:7")); !errors.Is(err, ErrClosed) {
		t.Fatalf("dial on closed stack = %v, want ErrClosed", err)
	}
	// goleak in TestMain checks that no pump, handler or splice survived.
}

// TestClosedConnToAStalledReaderEnds: natbox closes a connection with data
// still queued for a client that never reads (its window stays shut while
// its kernel answers every zero-window probe). The closed endpoint, its
// send queue outside the buffer budget, must go within OrphanTimeout, not
// live for as long as the client answers.
func TestClosedConnToAStalledReaderEnds(t *testing.T) {
	const n, orphan = 4, 2 * time.Second
	closed := make(chan struct{}, n)
	client, server := newPairConfig(t, Config{TCP: TCPConfig{OrphanTimeout: orphan}}, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		buf := make([]byte, 64<<10)
		c.SetWriteDeadline(time.Now().Add(time.Second))
		for {
			if _, err := c.Write(buf); err != nil {
				break
			}
		}
		c.Close() // as the splice does once both sides ended: a FIN behind unsent data
		closed <- struct{}{}
	}})
	ctx := testContext(t)
	for range n {
		c, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:81"))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		t.Cleanup(func() { c.Close() }) // never read before the end
	}
	for range n {
		<-closed
	}
	if st := server.Stats(); st.TCPClosing != n {
		t.Fatalf("%d closing right after the closes, want %d (stalled behind the client's window)", st.TCPClosing, n)
	}
	start := time.Now()
	waitUntil(t, "the closed connections to give up", func() bool { return server.Stats().TCPClosing == 0 })
	if took := time.Since(start); took > orphan+3*time.Second {
		t.Fatalf("closed connections went after %v, want within about %v", took, orphan)
	}
}
