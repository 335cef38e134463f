package tunnel_test

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/natbox/natbox/netstack"
	"github.com/natbox/natbox/tunnel"
)

// prefixLog is a WithChecksumsOptional hook that records what it was told
// and passes it on to its stack, as natbox wires it.
type prefixLog struct {
	mu    sync.Mutex
	st    *netstack.Stack
	last  []netip.Prefix
	calls int
}

func (l *prefixLog) set(p []netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.last, l.calls = slices.Clone(p), l.calls+1
	if l.st != nil {
		l.st.SetChecksumsOptional(p)
	}
}

func (l *prefixLog) told() ([]netip.Prefix, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.last, l.calls
}

// TestChecksumsOptionalNegotiated: a relay and an appliance whose stacks
// both trust the tunnel say so in their hellos and each tells its stack
// the other's destinations (the appliance's tunnel addresses; everything);
// bulk data then crosses both ways intact, and the relay forgets the peer
// when a reload drops it. An appliance that does not say so (an older one) gets
// every checksum.
func TestChecksumsOptionalNegotiated(t *testing.T) {
	t.Parallel()
	for _, peerSays := range []bool{true, false} {
		port := freePort(t, false)
		spec := fmt.Sprintf("tcp/%d", port)
		key := mustKey(t)
		relayLog := &prefixLog{}
		cfg := onePeerRelayConfig(t, key, spec)
		relay := startRelay(t, cfg, testLogger(t), tunnel.WithChecksumsOptional(relayLog.set))
		relayLog.mu.Lock()
		relayLog.st = relay.stack
		relayLog.mu.Unlock()
		applLog := &prefixLog{}
		hook := tunnel.WithChecksumsOptional(nil) // an older appliance: no word in its hello
		if peerSays {
			hook = tunnel.WithChecksumsOptional(applLog.set)
		}
		a := runAppliance(t, applianceTOML("127.0.0.1", relay, key, applAddrA, mappingTOML("echo", "tcp", port, echoService(t), "")), applAddrA, hook)
		if peerSays {
			applLog.mu.Lock()
			applLog.st = a.stack
			applLog.mu.Unlock()
		}
		waitRegistered(t, a, spec)

		wantRelay := tunnel.TunnelPrefixes(applAddrA)
		if !peerSays {
			wantRelay = nil
		}
		if got, _ := relayLog.told(); !slices.Equal(got, wantRelay) {
			t.Fatalf("peer says %v: the relay's stack was told %v, want %v", peerSays, got, wantRelay)
		}
		if got, calls := applLog.told(); peerSays && len(got) != 2 || !peerSays && calls != 0 {
			t.Fatalf("peer says %v: the appliance's stack was told %v (%d calls)", peerSays, got, calls)
		}
		for _, n := range []int{1 << 20, 3} {
			payload := randomBytes(n)
			if _, got := tcpRoundTrip(t, netip.AddrPortFrom(loopback4, port), payload); !slices.Equal(got, payload) {
				t.Fatalf("peer says %v: %d of %d bytes came back intact", peerSays, len(got), n)
			}
		}
		if peerSays {
			// Dropped by a reload: its session ends unpublished.
			without := *cfg
			without.Peers = nil
			if err := relay.relay.Reload(&without); err != nil {
				t.Fatal(err)
			}
		} else {
			a.close()
		}
		waitFor(t, 10*time.Second, "the relay's stack to forget the peer", func() bool {
			got, _ := relayLog.told()
			return len(got) == 0
		})
	}
}
