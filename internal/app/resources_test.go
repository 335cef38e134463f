package app_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/internal/app"
)

func fdTargets() []string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var out []string
	for _, e := range ents {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out = append(out, e.Name()+"="+l)
	}
	return out
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count file descriptors: %v", err)
	}
	return len(ents)
}

// TestCloseReleasesGoroutinesAndFDs runs the whole appliance with live
// sessions, admin socket and metrics, stops it, and checks that every
// goroutine and file descriptor it took is gone. It is not parallel, so
// nothing else runs while it counts.
func TestCloseReleasesGoroutinesAndFDs(t *testing.T) {
	// Warm up what the runtime opens once per process (the netpoller).
	if ln, err := net.Listen("tcp4", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	baseline := goleak.IgnoreCurrent()
	fds := openFDs(t)

	t.Run("workload", func(t *testing.T) {
		target := serveTCP(t, echo)
		udpTarget := serveUDP(t, udpEcho)
		metricsAddr := freeLoopbackAddr(t)
		h := newHarness(t, spec{
			Admin:    fmt.Sprintf("listen = %q", metricsAddr),
			Mappings: mapping("tcp", "tcp", "8900", target.String()) + mapping("udp", "udp", "8901", udpTarget.String()),
		}, app.Options{})
		h.run()
		// Sessions left open when natbox stops: its shutdown must end them.
		for i := 0; i < 10; i++ {
			expectEcho(t, h.mustDial(ap(client4, 0), ap(public4, 8900)), "open at shutdown")
			from := ap(client4, uint16(47000+i))
			h.sendUDP(from, ap(public4, 8901), []byte("open at shutdown"))
			h.mustRecvUDP(from)
		}
		// And some that finished.
		for i := 0; i < 10; i++ {
			c := h.mustDial(ap(client4, 0), ap(public4, 8900))
			expectEcho(t, c, "done")
			c.Close()
		}
		cl, err := admin.Dial(h.socket)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if st, err := cl.Status(ctx); err != nil || len(st.Mappings) != 2 {
			t.Fatalf("status: %+v, %v", st, err)
		}
		cl.Close()
		if m := scrape(t, metricsAddr); m[`natbox_mapping_sessions_active{mapping="udp"}`] != "10" {
			t.Fatalf("udp sessions active = %q, want 10", m[`natbox_mapping_sessions_active{mapping="udp"}`])
		}
		if n := openFDs(t); n <= fds {
			t.Fatalf("%d fds open during the workload, baseline %d: the count sees nothing", n, fds)
		}
	}) // cleanups: stop Run, Close, close the client stack and the targets

	const tolerance = 2
	deadline := time.Now().Add(5 * time.Second)
	for n := openFDs(t); n > fds+tolerance; n = openFDs(t) {
		// The net package caches splice pipes (the targets' io.Copy between
		// TCP conns) in a sync.Pool; a GC empties it and closes them.
		runtime.GC()
		if time.Now().After(deadline) {
			t.Fatalf("%d file descriptors open after Close, %d before: %v", n, fds, fdTargets())
		}
		time.Sleep(10 * time.Millisecond)
	}
	goleak.VerifyNone(t, baseline)
}
