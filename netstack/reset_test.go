package netstack

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// TestTCPAbort: Abort sends an RST, which the peer reads as ECONNRESET
// (errors.Is works on the stack's conns as on kernel sockets) after at most
// the bytes sent before it, also once either side has half-closed; Close
// still ends the stream with a FIN.
func TestTCPAbort(t *testing.T) {
	accepted := make(chan net.Conn, 1)
	client, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			t.Errorf("accept: %v", err)
			return
		}
		accepted <- c
	}})
	partial := bytes.Repeat([]byte("partial "), 8000)
	tests := []struct {
		name string
		// run gets the dialing end (c) and the accepting end (s).
		run func(t *testing.T, c, s net.Conn)
	}{
		{"accepted end aborts", func(t *testing.T, c, s net.Conn) {
			s.Write(partial)
			abort(t, s)
			got, err := readToError(c)
			wantReset(t, got, err, partial)
		}},
		{"dialing end aborts after the peer half-closed", func(t *testing.T, c, s net.Conn) {
			s.(TCPConn).CloseWrite()
			if got, err := readToError(c); err != io.EOF || len(got) != 0 {
				t.Fatalf("read %q, %v; want EOF", got, err)
			}
			c.Write(partial)
			abort(t, c)
			got, err := readToError(s)
			wantReset(t, got, err, partial)
		}},
		{"aborts after its own half-close", func(t *testing.T, c, s net.Conn) {
			c.(TCPConn).CloseWrite()
			if got, err := readToError(s); err != io.EOF || len(got) != 0 {
				t.Fatalf("read %q, %v; want EOF", got, err)
			}
			abort(t, c)
			// Past the FIN, reads stay at EOF (as on Linux): the reset
			// shows on the next write that meets it.
			s.SetWriteDeadline(time.Now().Add(10 * time.Second))
			var err error
			for range 1000 {
				if _, err = s.Write([]byte("answer")); err != nil {
					break
				}
				time.Sleep(time.Millisecond) // let the RST arrive; bounded
			}
			if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
				t.Fatalf("write after the peer's FIN and RST: %v, want connection reset", err)
			}
		}},
		{"close is a FIN", func(t *testing.T, c, s net.Conn) {
			s.Write(partial)
			s.Close()
			if got, err := readToError(c); err != io.EOF || !bytes.Equal(got, partial) {
				t.Fatalf("read %d of %d bytes, then %v; want all, then EOF", len(got), len(partial), err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := client.DialTCP(testContext(t), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:80"))
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			var s net.Conn
			select {
			case s = <-accepted:
			case <-time.After(10 * time.Second):
				t.Fatal("not accepted")
			}
			defer s.Close()
			tt.run(t, c, s)
		})
	}
}

func abort(t *testing.T, c net.Conn) {
	t.Helper()
	if err := c.(TCPConn).Abort(); err != nil {
		t.Fatalf("abort: %v", err)
	}
}

func readToError(c net.Conn) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var got []byte
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			return got, err
		}
	}
}

func wantReset(t *testing.T, got []byte, err error, sent []byte) {
	t.Helper()
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read %d bytes then %v, want connection reset", len(got), err)
	}
	if !bytes.HasPrefix(sent, got) {
		t.Fatalf("read %d bytes that are not a prefix of the %d sent", len(got), len(sent))
	}
}

// TestResetReportedToEveryCall: gVisor reports a reset to one call only;
// after a write got it, a read must say "reset" too, never a clean end of
// stream (a splice reading on one goroutine while another writes would pass
// the cut on as a FIN).
func TestResetReportedToEveryCall(t *testing.T) {
	client, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		c.Read(make([]byte, 1)) // the client is connected: reset it now
		c.(TCPConn).Abort()
	}})
	c, err := client.DialTCP(testContext(t), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:80"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err = c.Write([]byte("x")); err != nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("write after the peer's reset: %v, want connection reset", err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read after a write reported the reset: %v, want connection reset", err)
	}
}
