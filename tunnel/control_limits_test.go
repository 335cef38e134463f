package tunnel_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/tunnel"
)

// controlDial opens a raw control connection from a's tunnel address to
// the relay's control port, as a misbehaving appliance would.
func controlDial(t testing.TB, a *appliance) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := a.stack.DialTCP(ctx, netip.AddrPortFrom(applAddrA, 0), netip.AddrPortFrom(relayTunnelAddr, tunnel.ControlPort))
	if err != nil {
		t.Fatalf("dial the relay's control port: %v", err)
	}
	return c
}

func controlRefusals(r *tunnel.Relay, peer string) map[string]uint64 {
	for _, p := range r.Status().Peers {
		if p.Name == peer {
			return p.ControlRefusals
		}
	}
	return nil
}

// TestRelayControlFloodStaysBounded: one peer opening many control
// connections without a hello holds one of them at a time on the relay (a
// newer one replaces the older), each replacement counted; the relay's
// goroutines and heap do not grow with them, and another peer is served
// throughout.
// Not parallel: it counts the process's goroutines.
func TestRelayControlFloodStaysBounded(t *testing.T) {
	const n = 1000
	portA, portB := freePort(t, false), freePort(t, false)
	keyA, keyB, relayKey := mustKey(t), mustKey(t), mustKey(t)
	relay := startRelay(t, relayConfig(relayKey, "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, fmt.Sprintf("tcp/%d", portA))},
		conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB, Ports: mustSpecs(t, fmt.Sprintf("tcp/%d", portB))},
	), testLogger(t))
	svc, _ := proxyEchoService(t)
	a := startAppliance(t, relay, keyA, applAddrA, tcpMapping("a", portA, svc))
	b := startAppliance(t, relay, keyB, applAddrB, tcpMapping("b", portB, svc))
	waitRegistered(t, a, fmt.Sprintf("tcp/%d", portA))
	waitRegistered(t, b, fmt.Sprintf("tcp/%d", portB))
	before := runtime.NumGoroutine()
	var m0 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)

	peak := 0
	for i := range n {
		c := controlDial(t, a)
		defer c.Close()
		if i%100 == 99 {
			peak = max(peak, runtime.NumGoroutine())
		}
	}
	peak = max(peak, runtime.NumGoroutine())
	if grew := peak - before; grew > 100 {
		t.Fatalf("goroutines grew by %d with %d control connections open (from %d): not bounded", grew, n, before)
	}
	waitFor(t, 10*time.Second, fmt.Sprintf("%d replacements counted", n-1), func() bool {
		return controlRefusals(relay.relay, "a")["replaced"] == n-1
	})
	var m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m1)
	// Each connection waiting for a hello would hold a 64 KiB reader; both
	// sides' endpoints for the connections still open cost about 13 KiB each.
	if grew := int64(m1.HeapInuse) - int64(m0.HeapInuse); grew > n*32<<10 {
		t.Fatalf("heap in use grew by %d KiB with %d control connections open: not bounded", grew>>10, n)
	}

	// b is served, and a's own session was never touched.
	payload := randomBytes(4096)
	if _, got := tcpRoundTrip(t, netip.AddrPortFrom(loopback4, portB), payload); !bytes.Equal(got, payload) {
		t.Fatalf("b's echo through the relay: %d bytes, want %d", len(got), len(payload))
	}
	if st := a.uplink.Status(); st.State != tunnel.StateRegistered {
		t.Fatalf("a's uplink: %v", st.State)
	}
	if got := controlRefusals(relay.relay, "b"); got != nil {
		t.Fatalf("b's control refusals: %v", got)
	}
	t.Logf("%d control connections without hello: goroutines %d -> peak %d, heap in use %d -> %d KiB",
		n, before, peak, m0.HeapInuse>>10, m1.HeapInuse>>10)
}

// readError reads control messages from c until an error message and
// returns its reason ("" if the connection ends first).
func readError(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		var m struct{ Type, Reason string }
		if json.Unmarshal(sc.Bytes(), &m) == nil && m.Type == "error" {
			return m.Reason
		}
	}
	return ""
}

// TestRelayControlRefusals: a connection silent past the hello deadline,
// one that starts with something other than a hello, an oversize message and
// a message flood and a hello with a protocol version the relay does not
// speak are each refused, told why, and counted by reason; the peer's own
// uplink then registers again.
func TestRelayControlRefusals(t *testing.T) {
	t.Parallel()
	port := freePort(t, false)
	spec := fmt.Sprintf("tcp/%d", port)
	key := mustKey(t)
	relay := startRelay(t, onePeerRelayConfig(t, key, spec), testLogger(t), tunnel.WithHelloTimeout(300*time.Millisecond))
	svc, _ := proxyEchoService(t)
	a := startAppliance(t, relay, key, applAddrA, tcpMapping("web", port, svc))
	waitRegistered(t, a, spec)

	tests := []struct {
		reason string
		send   string
		detail string // after the reason in the error message
	}{
		{"hello_timeout", "", ""},
		{"bad_hello", `{"v":1,"type":"register","ports":["tcp/1"]}` + "\n", ""},
		{"too_long", strings.Repeat("x", 70<<10), ""},
		{"rate", `{"v":1,"type":"hello"}` + "\n" + strings.Repeat(`{"v":1,"type":"ping"}`+"\n", 100), ""},
		{"unsupported_version", fmt.Sprintf(`{"v":%d,"type":"hello"}`+"\n", tunnel.MaxProtocolVersion+1),
			fmt.Sprintf(": control protocol version %d, relay speaks %d to %d",
				tunnel.MaxProtocolVersion+1, tunnel.MinProtocolVersion, tunnel.MaxProtocolVersion)},
	}
	for _, tt := range tests {
		c := controlDial(t, a)
		if tt.send != "" {
			go c.Write([]byte(tt.send)) // the relay may close before taking it all
		}
		if got := readError(t, c); got != "refused: "+tt.reason+tt.detail {
			t.Errorf("%s: error message %q", tt.reason, got)
		}
		c.Close()
		waitFor(t, 5*time.Second, tt.reason+" counted", func() bool {
			return controlRefusals(relay.relay, "a")[tt.reason] == 1
		})
	}
	if got := controlRefusals(relay.relay, "a"); len(got) != len(tests) {
		t.Fatalf("control refusals %v, want one of each of %d reasons", got, len(tests))
	}
	// The flood's hello had replaced the uplink's session: it comes back.
	waitRegistered(t, a, spec)
}
