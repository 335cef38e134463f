package tunnel_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/tunnel"
)

// TestRelayRegistersCoalesced: a burst of registers from one peer, sent
// while the relay is busy, is applied as its last register only (the others
// counted as coalesced), and another peer registering meanwhile is served.
func TestRelayRegistersCoalesced(t *testing.T) {
	t.Parallel()
	var specs []string
	for range 4 {
		specs = append(specs, fmt.Sprintf("tcp/%d", freePort(t, false)))
	}
	portB := freePort(t, false)
	keyA, keyB := mustKey(t), mustKey(t)
	relay := startRelay(t, relayConfig(mustKey(t), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA, Ports: mustSpecs(t, specs...)},
		conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB, Ports: mustSpecs(t, fmt.Sprintf("tcp/%d", portB))},
	), testLogger(t))
	// a's uplink wants what the burst ends with: when it reconnects and
	// replaces the raw connection below, the final state stays the same.
	var last uint16
	fmt.Sscanf(specs[3], "tcp/%d", &last)
	a := startAppliance(t, relay, keyA, applAddrA, tcpMapping("last", last, 1))
	waitRegistered(t, a, specs[3])

	type msg struct {
		Type, Port, Reason string
		OK                 bool
	}
	// Nine registers, each a different set of a's ports, the last one
	// only specs[3].
	const n = 9
	var burst strings.Builder
	for i := range n {
		ports := []string{specs[i%3], specs[(i+1)%3]}
		if i == n-1 {
			ports = []string{specs[3]}
		}
		b, _ := json.Marshal(map[string]any{"v": 1, "type": "register", "ports": ports})
		burst.Write(append(b, '\n'))
	}
	// attempt sends the burst on a new raw session while the relay's lock
	// is held, so none can apply yet, and reports whether the relay read
	// it: a's uplink, replaced by the raw session, reconnects within a
	// second and may replace it first. It returns with the lock released.
	var sc *bufio.Scanner
	attempt := func() bool {
		c := controlDial(t, a)
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := c.Write([]byte(`{"v":1,"type":"hello"}` + "\n")); err != nil {
			return false
		}
		sc = bufio.NewScanner(c)
		var m msg
		if !sc.Scan() || json.Unmarshal(sc.Bytes(), &m) != nil || m.Type != "hello" {
			return false
		}
		release, coalesced := tunnel.HoldRelayLock(relay.relay, "a")
		defer release()
		base := coalesced()
		if _, err := c.Write([]byte(burst.String())); err != nil {
			return false
		}
		// The applier took the first register (or none) and waits for
		// the lock; every later one replaced the one waiting.
		deadline := time.Now().Add(3 * time.Second)
		for coalesced()-base < n-2 {
			if time.Now().After(deadline) {
				return false
			}
			time.Sleep(5 * time.Millisecond)
		}
		return true
	}
	tries := 1
	for ; !attempt(); tries++ {
		if tries == 5 {
			t.Fatalf("the relay never read a burst of %d registers in %d tries", n, tries)
		}
	}
	t.Logf("burst read on try %d", tries)
	// next returns the relay's next message, or false when the connection
	// ends (a's uplink reconnected and replaced it).
	next := func() (m msg, ok bool) {
		t.Helper()
		if !sc.Scan() {
			return m, false
		}
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatal(err)
		}
		return m, true
	}
	start := time.Now()
	b := startAppliance(t, relay, keyB, applAddrB, tcpMapping("b", portB, 1))

	// At most two applies answer: the first register, if the applier had
	// it, and the last, whose result ends the answers.
	applies := 0
	for {
		m, ok := next()
		if !ok {
			t.Logf("a's uplink replaced the raw connection before the last result; %d applies seen", applies)
			break
		}
		if m.Type != "result" {
			continue
		}
		if m.Port == specs[3] {
			if !m.OK {
				t.Fatalf("last register refused: %s", m.Reason)
			}
			break
		}
		if m.Port == specs[0] { // every register but the last has two specs, one of 0..2 first
			applies++
		}
	}
	if applies > 1 {
		t.Errorf("%d registers before the last were applied, want at most 1", applies)
	}
	waitRegistered(t, b, fmt.Sprintf("tcp/%d", portB))
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("peer b registered after %v", d)
	}
	waitFor(t, 10*time.Second, "a holding only the last register's port", func() bool {
		for _, p := range relay.relay.Status().Peers {
			if p.Name == "a" {
				return slices.Equal(p.Ports, []string{specs[3]})
			}
		}
		return false
	})
	for _, p := range relay.relay.Status().Peers {
		if p.Name == "a" && p.RegistersCoalesced < n-2 {
			t.Errorf("status: %d registers coalesced, want at least %d", p.RegistersCoalesced, n-2)
		}
	}
}
