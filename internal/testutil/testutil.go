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
