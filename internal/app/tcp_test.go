package app_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/testutil"

	"github.com/natbox/natbox/internal/app"
)

type halfCloser interface {
	CloseWrite() error
	CloseRead() error
}

func TestTCPHalfCloseBothWays(t *testing.T) {
	t.Parallel()
	// summarizer reads to EOF, and only then answers: natbox must carry the
	// client's half-close and keep the other direction open.
	summarizer := serveTCP(t, func(c *net.TCPConn) {
		h := sha256.New()
		n, _ := io.Copy(h, c)
		fmt.Fprintf(c, "%d %x", n, h.Sum(nil))
		c.CloseWrite()
	})
	// greeter half-closes first, then reports what it got after that.
	received := make(chan []byte, 1)
	greeter := serveTCP(t, func(c *net.TCPConn) {
		c.Write([]byte("hello from the target"))
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		received <- b
	})
	h := newHarness(t, spec{Mappings: mapping("summary", "tcp", "8080", summarizer.String()) +
		mapping("greeter", "tcp", "8025", greeter.String())}, app.Options{})

	t.Run("client closes first", func(t *testing.T) {
		c := h.mustDial(ap(client4, 0), ap(public4, 8080))
		msg := bytes.Repeat([]byte("natbox "), 150_000) // ~1 MiB, many segments
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("write: %v", err)
		}
		if err := c.(halfCloser).CloseWrite(); err != nil {
			t.Fatalf("close write: %v", err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c) // the answer, then EOF
		if err != nil {
			t.Fatalf("read after half-close: %v", err)
		}
		sum := sha256.Sum256(msg)
		if want := fmt.Sprintf("%d %x", len(msg), sum); string(got) != want {
			t.Fatalf("target answered %q, want %q", got, want)
		}
	})

	t.Run("target closes first", func(t *testing.T) {
		c := h.mustDial(ap(client4, 0), ap(public4, 8025))
		c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "hello from the target" {
			t.Fatalf("read = %q, %v; want the greeting, then EOF", got, err)
		}
		// Our direction is still open after the target's FIN.
		if _, err := c.Write([]byte("still talking")); err != nil {
			t.Fatalf("write after the target half-closed: %v", err)
		}
		c.(halfCloser).CloseWrite()
		select {
		case b := <-received:
			if string(b) != "still talking" {
				t.Fatalf("target received %q, want %q", b, "still talking")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("target never saw the client's EOF")
		}
	})
}

// transferSize is per direction.
const transferSize = 32 << 20

// sendStream writes n pseudo-random bytes from seed to w and returns their
// SHA-256.
func sendStream(w io.Writer, seed byte, n int64) ([]byte, error) {
	h := sha256.New()
	src := chachaStream(seed)
	buf := make([]byte, 64<<10)
	_, err := io.CopyBuffer(io.MultiWriter(w, h), io.LimitReader(src, n), buf)
	return h.Sum(nil), err
}

func TestTCPTransfer32MiBEachWay(t *testing.T) {
	t.Parallel()
	type result struct {
		sentSum, gotSum []byte
		got             int64
		err             error
	}
	targetRes := make(chan result, 1)
	target := serveTCP(t, func(c *net.TCPConn) {
		var r result
		done := make(chan struct{})
		go func() {
			defer close(done)
			r.sentSum, r.err = sendStream(c, 2, transferSize)
			c.CloseWrite()
		}()
		h := sha256.New()
		r.got, _ = io.Copy(h, c)
		r.gotSum = h.Sum(nil)
		<-done
		targetRes <- r
	})
	h := newHarness(t, spec{Mappings: mapping("bulk", "tcp", "9000", target.String())}, app.Options{})
	c := h.mustDial(ap(client4, 0), ap(public4, 9000))
	c.SetDeadline(time.Now().Add(60 * time.Second))

	start := time.Now()
	var up result
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		up.sentSum, up.err = sendStream(c, 1, transferSize)
		c.(halfCloser).CloseWrite()
	}()
	hs := sha256.New()
	got, err := io.Copy(hs, c)
	wg.Wait()
	if err != nil || up.err != nil {
		t.Fatalf("client: read %d bytes, err %v; write err %v", got, err, up.err)
	}
	el := time.Since(start)
	var tr result
	select {
	case tr = <-targetRes:
	case <-time.After(10 * time.Second):
		t.Fatal("target did not finish")
	}
	if tr.err != nil {
		t.Fatalf("target write: %v", tr.err)
	}
	if got != transferSize || !bytes.Equal(hs.Sum(nil), tr.sentSum) {
		t.Fatalf("download: %d bytes, sha256 %x; target sent %d bytes, sha256 %x", got, hs.Sum(nil), transferSize, tr.sentSum)
	}
	if tr.got != transferSize || !bytes.Equal(tr.gotSum, up.sentSum) {
		t.Fatalf("upload: target got %d bytes, sha256 %x; client sent %d, sha256 %x", tr.got, tr.gotSum, transferSize, up.sentSum)
	}
	t.Logf("%d MiB each way in %v (%.0f Mbit/s per direction)", transferSize>>20, el.Round(time.Millisecond),
		float64(transferSize)*8/el.Seconds()/1e6)
	waitFor(t, 5*time.Second, "the session's byte counters", func() bool {
		m := h.mappingStatus("bulk")
		return m.BytesIn == transferSize && m.BytesOut == transferSize
	})
}

// identify answers every connection with the port it was accepted on.
func identify(c *net.TCPConn) {
	fmt.Fprint(c, c.LocalAddr().(*net.TCPAddr).Port)
}

func readAllString(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

func TestTCPPortRangeMapsOneToOne(t *testing.T) {
	t.Parallel()
	// Targets at T+5 and T+6 for listen 10000-10010 -> start port T.
	lns := consecutivePorts(t, 2, false)
	base := localPort(lns[0]) - 5
	if localPort(lns[0]) < 6 {
		t.Skip("free port too low for a start port 5 below it")
	}
	for _, ln := range lns {
		testutil.ServeListener(t, ln.(net.Listener), identify)
	}
	h := newHarness(t, spec{Mappings: mapping("range", "tcp", "10000-10010", "127.0.0.1:"+strconv.Itoa(int(base)))}, app.Options{})
	for _, listen := range []uint16{10005, 10006} {
		c := h.mustDial(ap(client4, 0), ap(public4, listen))
		want := strconv.Itoa(int(base + listen - 10000))
		if got := readAllString(t, c); got != want {
			t.Fatalf("public port %d reached target port %s, want %s", listen, got, want)
		}
	}
	if _, err := h.dial(ap(client4, 0), ap(public4, 10011)); !errors.Is(err, errRefused) {
		t.Fatalf("port 10011, outside the range: %v, want connection refused", err)
	}
}

func TestTCPAndUDPOnOneMapping(t *testing.T) {
	t.Parallel()
	// One port number, bound for both TCP and UDP on 127.0.0.1.
	var tcpLn net.Listener
	var udpPC *net.UDPConn
	for i := 0; i < 100 && udpPC == nil; i++ {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		pc, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(ln.Addr().(*net.TCPAddr).AddrPort()))
		if err != nil {
			ln.Close()
			continue
		}
		tcpLn, udpPC = ln, pc
	}
	if udpPC == nil {
		t.Fatal("no port free for both tcp and udp on 127.0.0.1")
	}
	target := testutil.ServeListener(t, tcpLn, echo)
	serveUDPConn(t, udpPC, func(_ netip.AddrPort, p []byte) []byte { return append([]byte("udp:"), p...) })
	h := newHarness(t, spec{Mappings: mapping("both", "tcp+udp", "5353", target.String())}, app.Options{})

	c := h.mustDial(ap(client4, 0), ap(public4, 5353))
	c.Write([]byte("over tcp"))
	c.(halfCloser).CloseWrite()
	if got := readAllString(t, c); got != "over tcp" {
		t.Fatalf("tcp echo = %q", got)
	}
	from := ap(client4, 40053)
	h.sendUDP(from, ap(public4, 5353), []byte("over udp"))
	d := h.mustRecvUDP(from)
	if string(d.payload) != "udp:over udp" || d.src != ap(public4, 5353) {
		t.Fatalf("udp reply %q from %s, want %q from %s", d.payload, d.src, "udp:over udp", ap(public4, 5353))
	}
}

func TestTCPIPv6PublicToIPv4Target(t *testing.T) {
	t.Parallel()
	target := serveTCP(t, func(c *net.TCPConn) {
		fmt.Fprintf(c, "target saw %s; ", c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr())
		echo(c)
	})
	h := newHarness(t, spec{Mappings: mapping("v6", "tcp", "["+public6.String()+"]:8443", target.String())}, app.Options{})
	c := h.mustDial(ap(client6, 0), ap(public6, 8443))
	c.Write([]byte("from v6"))
	c.(halfCloser).CloseWrite()
	if got, want := readAllString(t, c), "target saw 127.0.0.1; from v6"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	// The listen address is the v6 one only.
	if _, err := h.dial(ap(client4, 0), ap(public4, 8443)); !errors.Is(err, errRefused) {
		t.Fatalf("v4 address on a v6-only mapping: %v, want connection refused", err)
	}
}

// TestTCPIdleTimeoutThroughStack: a session through the TUN stack (whose
// splice moves bytes with the zero-copy paths, netstack/zerocopy_linux.go)
// lives while it carries traffic, and is cut with resets to both sides once
// it has been idle for its idle_timeout.
func TestTCPIdleTimeoutThroughStack(t *testing.T) {
	t.Parallel()
	targetErr := make(chan error, 1)
	target := serveTCP(t, func(c *net.TCPConn) {
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if err != nil {
				targetErr <- err
				return
			}
			c.Write(buf[:n])
		}
	})
	h := newHarness(t, spec{Mappings: mapping("idle", "tcp", "8091", target.String(), `idle_timeout = "1s"`)}, app.Options{})
	c := h.mustDial(ap(client4, 0), ap(public4, 8091))
	defer c.Close()
	buf := make([]byte, 1)
	// Traffic every 300 ms for 2 s keeps it open past two idle periods.
	for range 7 {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatalf("write while active: %v", err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("echo while active: %v", err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	start := time.Now()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(buf); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read after going idle: %v, want connection reset", err)
	}
	if idle := time.Since(start); idle < 600*time.Millisecond {
		t.Fatalf("cut %v after the last echo, before the 1 s idle timeout", idle)
	}
	select {
	case err := <-targetErr:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("target read after the idle timeout: %v, want connection reset", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("the target's connection is still open 5 s after the client's was cut")
	}
	// The session is counted once its splice returns, after both resets.
	waitFor(t, 5*time.Second, "tcp_expired to count the session", func() bool { return h.mappingStatus("idle").TCPExpired == 1 })
}
