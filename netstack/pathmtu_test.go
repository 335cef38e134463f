package netstack

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/netip"
	"testing"
	"time"
)

// TestProbePath probes the path between two stacks joined like two
// wireguard-go devices: a probe the far link takes comes back whole, one
// larger than the far link is lost, and SetPathMTU moves what new TCP
// connections and WriteUDP send while the link MTU stays.
func TestProbePath(t *testing.T) {
	const link, path, farSmall = 9000, 1420, 4000
	echoServer := funcHandler{tcp: echoTCP}
	client, server, br := newDirectPairConfig(t, Config{MTU: link, PathMTU: path}, Config{MTU: farSmall}, funcHandler{}, echoServer)
	src, dst := clientPrefix4.Addr(), serverPrefix4.Addr()

	// echo sends n bytes through a new connection and returns the largest
	// packet the bridge saw for it.
	echo := func(t *testing.T, n int) int64 {
		t.Helper()
		br.largest.Store(0)
		c, err := client.DialTCP(testContext(t), netip.AddrPort{}, netip.AddrPortFrom(dst, 7))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		data := bytes.Repeat([]byte("natbox"), n/6)
		go func() {
			c.Write(data)
			c.(closeWriter).CloseWrite()
		}()
		got, err := io.ReadAll(c)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("echo: %d of %d bytes back, %v", len(got), len(data), err)
		}
		return br.largest.Load()
	}
	if got := client.PathMTU(); got != path {
		t.Fatalf("PathMTU = %d, want %d", got, path)
	}
	if big := echo(t, 256<<10); big > path {
		t.Fatalf("at path mtu %d the largest packet was %d bytes", path, big)
	}

	probe := func(size int, wait time.Duration) error {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		return client.ProbePath(ctx, src, dst, size)
	}
	for _, size := range []int{28, path, farSmall} {
		if err := probe(size, 5*time.Second); err != nil {
			t.Fatalf("probe of %d bytes: %v", size, err)
		}
	}
	if err := probe(farSmall+1, 300*time.Millisecond); !errors.Is(err, ErrProbeLost) {
		t.Fatalf("probe of %d bytes past a %d-byte far link: %v, want ErrProbeLost", farSmall+1, farSmall, err)
	}
	if err := probe(link+1, time.Second); err == nil || errors.Is(err, ErrProbeLost) {
		t.Fatalf("probe larger than the link: %v, want a range error", err)
	}
	if st := server.Stats(); st.ReadErrors != 1 || br.tooBig.Load() != 1 {
		t.Errorf("server stats %+v, bridge refusals %d: want the oversized probe refused and counted once", st, br.tooBig.Load())
	}

	// UDP follows the path MTU.
	a, b := netip.AddrPortFrom(src, 53), netip.AddrPortFrom(dst, 53)
	if err := client.WriteUDP(a, b, make([]byte, 2000)); !errors.Is(err, ErrMessageTooLong) {
		t.Fatalf("2000-byte datagram at path mtu %d: %v, want ErrMessageTooLong", path, err)
	}
	if err := client.SetPathMTU(link + 1); err == nil {
		t.Fatal("SetPathMTU above the link's mtu: no error")
	}
	if err := client.SetPathMTU(farSmall); err != nil {
		t.Fatal(err)
	}
	if err := client.WriteUDP(a, b, make([]byte, 2000)); err != nil {
		t.Fatalf("2000-byte datagram at path mtu %d: %v", farSmall, err)
	}
	if big := echo(t, 256<<10); big <= path || big > farSmall {
		t.Fatalf("at path mtu %d the largest packet was %d bytes, want %d-%d", farSmall, big, path+1, farSmall)
	}
	br.check(t)
}

// TestRouteMTUSince: a handshake that began before the routes changed is
// credited with the largest MTU they had since (its MSS may come from any
// of them), and with the link's when too much changed to tell.
func TestRouteMTUSince(t *testing.T) {
	client, _, _ := newDirectPairConfig(t, Config{MTU: 9000, PathMTU: 1420}, Config{MTU: 9000}, funcHandler{}, funcHandler{})
	gen := client.routeGen()
	if got := client.routeMTUSince(gen); got != 1420 {
		t.Fatalf("no change: %d, want 1420", got)
	}
	for _, m := range []int{9000, 1500} {
		if err := client.SetPathMTU(m); err != nil {
			t.Fatal(err)
		}
	}
	if got, now := client.routeMTUSince(gen), client.RouteMTU(); got != 9000 || now != 1500 {
		t.Fatalf("after 1420 -> 9000 -> 1500: since %d (want 9000), now %d (want 1500)", got, now)
	}
	gen = client.routeGen()
	if got := client.routeMTUSince(gen); got != 1500 {
		t.Fatalf("from now: %d, want 1500", got)
	}
	for i := range 20 {
		if err := client.SetPathMTU(1300 + i); err != nil {
			t.Fatal(err)
		}
	}
	if got := client.routeMTUSince(gen); got != 9000 {
		t.Fatalf("after 20 changes, past the history's reach: %d, want the link's 9000", got)
	}
}

// TestLoopbackClientFollowsPathMTU: the relay originates a flow with its
// client's own address, 127.0.0.1 for a client on the relay's host. gVisor
// routes a loopback peer past the route table, so the MTU such a flow uses
// must come from the link's current MTU: here the server, at path MTU 1420
// on a 9000-byte link, must announce an MSS for 1420 to a client on
// 127.0.0.1 as to anyone else.
func TestLoopbackClientFollowsPathMTU(t *testing.T) {
	const link, path = 9000, 1420
	echoServer := funcHandler{tcp: echoTCP}
	client, server, br := newDirectPairConfig(t, Config{MTU: link}, Config{MTU: link, PathMTU: path}, funcHandler{}, echoServer)
	for _, src := range []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:40000"), netip.AddrPortFrom(clientPrefix4.Addr(), 40001)} {
		br.largest.Store(0)
		c, err := client.DialTCP(testContext(t), src, netip.AddrPortFrom(serverPrefix4.Addr(), 7))
		if err != nil {
			t.Fatalf("dial from %s: %v", src, err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		data := bytes.Repeat([]byte("natbox"), 40000)
		go func() {
			c.Write(data)
			c.(closeWriter).CloseWrite()
		}()
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("echo from %s: %d of %d bytes, %v", src, len(got), len(data), err)
		}
		if big := br.largest.Load(); big > path {
			t.Errorf("from %s: a %d-byte packet crossed a path of %d", src, big, path)
		}
	}
	if server.RouteMTU() != path {
		t.Errorf("server route mtu %d, want %d", server.RouteMTU(), path)
	}
	br.check(t)
}
