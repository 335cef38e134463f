package tunnel

import (
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/device"
)

// TestGateWaitsForPacketsToLeave: a full gate holds its feeder until a
// packet leaves, and never reopens early while packets do leave.
func TestGateWaitsForPacketsToLeave(t *testing.T) {
	t.Parallel()
	g := newGate(gatePackets)
	g.stall = time.Hour // only a leave can release the feeder
	g.enter(gatePackets - 1)
	g.wait() // not full: returns at once
	g.enter(1)
	released := make(chan struct{})
	go func() {
		g.wait()
		close(released)
	}()
	// Parked in wait's select, the feeder can only leave through a leave
	// (the stall is an hour away).
	for deadline := time.Now().Add(10 * time.Second); !parked("tunnel.(*gate).wait(", "[select"); {
		select {
		case <-released:
			t.Fatal("a full gate let its feeder through with nothing leaving")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the feeder neither waits in the gate nor got through")
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case <-released:
		t.Fatal("a full gate let its feeder through with nothing leaving")
	default:
	}
	g.leave(1)
	select {
	case <-released:
	case <-time.After(10 * time.Second):
		t.Fatal("the feeder was not released after a packet left")
	}
	if n := g.held.Load(); n != gatePackets-1 {
		t.Fatalf("held %d, want %d", n, gatePackets-1)
	}
	if g.stalls.Load() != 0 {
		t.Fatal("counted a stall")
	}
}

// TestGateReopensAfterStall: packets wireguard-go dropped never leave, so a
// gate without progress for its stall time forgets them and reopens.
func TestGateReopensAfterStall(t *testing.T) {
	t.Parallel()
	g := newGate(gatePackets)
	g.stall = 20 * time.Millisecond
	g.enter(gatePackets + 10)
	start := time.Now()
	g.wait()
	if d := time.Since(start); d < g.stall {
		t.Fatalf("reopened after %v, before the stall time %v", d, g.stall)
	}
	if g.stalls.Load() != 1 || g.held.Load() != 0 {
		t.Fatalf("stalls %d, held %d; want 1 and 0", g.stalls.Load(), g.held.Load())
	}
	g.leave(5) // packets from before the reset: the count stays at zero
	if n := g.held.Load(); n != 0 {
		t.Fatalf("held %d after late leaves, want 0", n)
	}
}

func TestIsData(t *testing.T) {
	t.Parallel()
	msg := func(typ byte, size int) []byte {
		b := make([]byte, size)
		b[0] = typ
		return b
	}
	tests := []struct {
		name string
		msg  []byte
		want bool
	}{
		{"transport with a packet", msg(device.MessageTransportType, device.MessageKeepaliveSize+20), true},
		{"keepalive", msg(device.MessageTransportType, device.MessageKeepaliveSize), false},
		{"handshake initiation", msg(device.MessageInitiationType, device.MessageInitiationSize), false},
		{"handshake response", msg(device.MessageResponseType, device.MessageResponseSize), false},
		{"cookie reply", msg(device.MessageCookieReplyType, device.MessageCookieReplySize), false},
		{"type with high bytes set", append([]byte{4, 0, 0, 1}, make([]byte, 60)...), false},
		{"empty", nil, false},
	}
	for _, tt := range tests {
		if got := isData(tt.msg); got != tt.want {
			t.Errorf("%s: isData = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// parked reports whether a goroutine with fn on its stack is blocked in the
// given state ("[select", "[chan receive", ...).
func parked(fn, state string) bool {
	buf := make([]byte, 1<<20)
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if header, _, _ := strings.Cut(g, "\n"); strings.Contains(header, state) && strings.Contains(g, fn) {
			return true
		}
	}
	return false
}

// TestGateSizeFromBudget: the gates take a quarter of the side's
// buffer_memory in 64 KiB message buffers, two directions, between the
// floor and the unbudgeted size.
func TestGateSizeFromBudget(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ budget, want int }{
		{0, gatePackets},          // unbounded
		{-1, gatePackets},         // unbounded
		{1 << 20, minGatePackets}, // floor
		{32 << 20, 64},            // the default: 8 MiB of 128 KiB pairs
		{64 << 20, 128},
		{1 << 30, gatePackets}, // cap
	} {
		if got := gateSize(c.budget); got != c.want {
			t.Errorf("gateSize(%d) = %d, want %d", c.budget, got, c.want)
		}
	}
}

// TestGateLimitIsItsOwn: a gate holds its feeder at its own limit, not at
// gatePackets.
func TestGateLimitIsItsOwn(t *testing.T) {
	t.Parallel()
	g := newGate(minGatePackets)
	g.stall = time.Hour
	g.enter(minGatePackets - 1)
	g.wait() // below the limit: returns at once
	g.enter(1)
	released := make(chan struct{})
	go func() {
		g.wait()
		close(released)
	}()
	for deadline := time.Now().Add(10 * time.Second); !parked("tunnel.(*gate).wait(", "[select"); {
		select {
		case <-released:
			t.Fatal("a gate at its limit let its feeder through")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the feeder neither waits in the gate nor got through")
		}
		time.Sleep(time.Millisecond)
	}
	g.leave(1)
	select {
	case <-released:
	case <-time.After(10 * time.Second):
		t.Fatal("the feeder was not released after a packet left")
	}
}
