// Package testutil holds the loopback servers the packages' tests share, so
// that each test package does not grow its own copy. It is imported by tests
// only.
package testutil

import (
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// ServeTCP accepts connections on a new listener at addr ("127.0.0.1:0",
// "[::1]:0") and runs fn on each, closing the connection after fn returns.
// The listener and every handler are gone when the test's cleanup ends.
func ServeTCP(t testing.TB, addr string, fn func(c *net.TCPConn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	return ServeListener(t, ln, fn)
}

// ServeListener is ServeTCP on a listener the caller made.
func ServeListener(t testing.TB, ln net.Listener, fn func(c *net.TCPConn)) netip.AddrPort {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				fn(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// Echo copies everything back, then half-closes, so a client sees its own
// bytes and then EOF.
func Echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

// CutResponse returns a handler for a target that fails mid-response: it
// waits for the client's first bytes, writes partial, then resets the
// connection (SetLinger(0) and Close send an RST instead of a FIN).
func CutResponse(partial []byte) func(c *net.TCPConn) {
	return func(c *net.TCPConn) {
		if _, err := c.Read(make([]byte, 1)); err != nil {
			return
		}
		c.Write(partial)
		c.SetLinger(0)
		c.Close()
	}
}

// ReadToError reads c until the first error, which it returns with every
// byte read before it (io.EOF included: a clean end is an error here too).
// It gives up after d with the timeout error.
func ReadToError(c net.Conn, d time.Duration) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(d))
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
