package rawsock_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	rtrace "runtime/trace"
	"syscall"
	"testing"
	"time"

	"golang.org/x/exp/trace"

	"github.com/natbox/natbox/internal/rawsock"
)

// tcpPair is a connected pair of kernel TCP sockets on loopback.
func tcpPair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		got <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-got
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func fd(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	rc.Control(func(f uintptr) { n = int(f) })
	return n
}

// The Reader reads as the conn's own Read does: the bytes, a timeout at the
// read deadline, EOF after the peer's FIN, and the errors net would give.
func TestReaderReadsLikeTheConn(t *testing.T) {
	a, b := tcpPair(t)
	r := rawsock.NewReader(b)
	if r == nil {
		t.Fatal("no Reader for a kernel TCP conn")
	}
	if rawsock.NewReader(struct{ net.Conn }{b}) != nil {
		t.Fatal("a Reader for a conn that hides its socket")
	}

	go a.Write([]byte("hello"))
	buf := make([]byte, 64)
	n, err := r.Read(buf)
	if err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("Read = %q, %v; want hello", buf[:n], err)
	}

	b.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err = r.Read(buf)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past the deadline = %v; want a timeout", err)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "read" {
		t.Fatalf("deadline error %v: want a *net.OpError with Op read", err)
	}
	b.SetReadDeadline(time.Time{})

	if _, err := rawsock.Write(fd(t, a), []byte("world")); err != nil {
		t.Fatalf("Write: %v", err)
	}
	a.CloseWrite()
	got, err := io.ReadAll(r)
	if err != nil || string(got) != "world" {
		t.Fatalf("ReadAll = %q, %v; want world then EOF", got, err)
	}

	b.Close()
	if _, err := r.Read(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read after Close = %v; want net.ErrClosed", err)
	}
}

func TestReaderReportsAReset(t *testing.T) {
	a, b := tcpPair(t)
	a.SetLinger(0)
	a.Close() // an RST
	r := rawsock.NewReader(b)
	_, err := r.Read(make([]byte, 8))
	var oe *net.OpError
	if !errors.Is(err, syscall.ECONNRESET) || !errors.As(err, &oe) || oe.Op != "read" || oe.Addr == nil {
		t.Fatalf("Read after the peer's RST = %#v; want a read OpError wrapping ECONNRESET, with addresses", err)
	}
}

func TestWriteAndInQueue(t *testing.T) {
	a, b := tcpPair(t)
	fa, fb := fd(t, a), fd(t, b)
	msg := bytes.Repeat([]byte("x"), 1000)
	if n, err := rawsock.Write(fa, msg); n != len(msg) || err != nil {
		t.Fatalf("Write = %d, %v", n, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		q, err := rawsock.InQueue(fb)
		if err != nil {
			t.Fatal(err)
		}
		if q == len(msg) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("InQueue = %d; want %d", q, len(msg))
		}
		time.Sleep(time.Millisecond)
	}
	buf := make([]byte, 4096)
	if n, err := rawsock.Read(fb, buf); n != len(msg) || err != nil {
		t.Fatalf("Read = %d, %v", n, err)
	}
	if _, err := rawsock.Read(fb, buf); err != syscall.EAGAIN {
		t.Fatalf("Read of an empty socket = %v; want EAGAIN", err)
	}
	if _, err := rawsock.InQueue(-1); err != syscall.EBADF {
		t.Fatalf("InQueue(-1) = %v; want EBADF", err)
	}
}

// logStart marks the calling goroutine as the one syscallEntries watches.
func logStart() { rtrace.Log(context.Background(), "rawsock-test", "start") }

// syscallEntries counts the times f's goroutine (the one that logs
// "rawsock-test" first) entered the scheduler's system-call state, the
// transitions a runtime trace records for syscall.Syscall (which wake a
// sleeping sysmon), while f ran.
func syscallEntries(t *testing.T, f func()) int {
	t.Helper()
	var out bytes.Buffer
	if err := rtrace.Start(&out); err != nil {
		t.Skipf("runtime trace: %v", err)
	}
	f()
	rtrace.Stop()
	tr, err := trace.NewReader(&out)
	if err != nil {
		t.Fatal(err)
	}
	var me trace.GoID = trace.NoGoroutine
	n := 0
	for {
		ev, err := tr.ReadEvent()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if ev.Kind() == trace.EventLog && ev.Log().Category == "rawsock-test" {
			me = ev.Goroutine()
		}
		if ev.Kind() != trace.EventStateTransition {
			continue
		}
		st := ev.StateTransition()
		if st.Resource.Kind != trace.ResourceGoroutine {
			continue
		}
		if _, to := st.Goroutine(); to == trace.GoSyscall && me != trace.NoGoroutine && st.Resource.Goroutine() == me {
			n++
		}
	}
	return n
}

// The point of the package: its reads and writes never enter the
// scheduler's system-call state, where the conn's own Read and Write do
// (which is what makes this test able to fail).
func TestNoSchedulerSyscalls(t *testing.T) {
	a, b := tcpPair(t)
	fa := fd(t, a)
	r := rawsock.NewReader(b)
	buf := make([]byte, 64)
	const rounds = 50
	exchange := func(write func([]byte) (int, error), read func([]byte) (int, error)) func() {
		return func() {
			logStart()
			for range rounds {
				if _, err := write([]byte("ping")); err != nil {
					t.Error(err)
					return
				}
				if _, err := read(buf); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}
	if n := syscallEntries(t, exchange(a.Write, b.Read)); n < rounds {
		t.Fatalf("the conn's own Read and Write entered the syscall state %d times in %d rounds; the trace cannot tell", n, rounds)
	}
	raw := func(p []byte) (int, error) { return rawsock.Write(fa, p) }
	if n := syscallEntries(t, exchange(raw, r.Read)); n != 0 {
		t.Fatalf("rawsock's Write and Reader entered the syscall state %d times in %d rounds; want 0", n, rounds)
	}
}
