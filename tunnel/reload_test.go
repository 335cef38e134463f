package tunnel_test

import (
	"errors"
	"io"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/tunnel"
)

// TestRelayReloadRollsBackAHalfAppliedPeerUpdate: a reload whose WireGuard
// update fails after part of it was applied leaves the device's peers, and
// the relay's, as they were, and says so; the same reload then applies.
func TestRelayReloadRollsBackAHalfAppliedPeerUpdate(t *testing.T) {
	t.Parallel()
	keyA, keyB, keyC, relayKey := mustKey(t), mustKey(t), mustKey(t), mustKey(t)
	binds := []netip.Addr{loopback4}
	peerA := conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA}
	peerB := conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB}
	relay := startRelay(t, relayConfig(relayKey, "127.0.0.1:0", binds, peerA, peerB), testLogger(t))
	before := tunnel.WireGuardPeers(relay.relay)
	if len(before) != 2 {
		t.Fatalf("wireguard peers at start: %v", before)
	}

	// a moves, b leaves, c takes b's address: four peer blocks
	// (remove a, remove b, add a, add c), of which three apply.
	movedA := peerA
	movedA.Address = netip.MustParseAddr("100.96.0.9")
	peerC := conf.Peer{Name: "c", PublicKey: keyC.Public(), Address: applAddrB}
	next := relayConfig(relayKey, "127.0.0.1:0", binds, movedA, peerC)
	mid := tunnel.FailIpcSetPartway(relay.relay, 3, false)
	err := relay.relay.Reload(next)
	if err == nil || !strings.Contains(err.Error(), "injected failure") || !strings.Contains(err.Error(), "rolled back, nothing changed") ||
		errors.Is(err, tunnel.ErrPeersHalfApplied) {
		t.Fatalf("reload error = %v, want the failure and that it was rolled back", err)
	}
	if m := mid(); m == nil || maps.EqualFunc(m, before, slices.Equal) {
		t.Fatalf("the failing update applied nothing (%v): the test proves no rollback", m)
	}
	if after := tunnel.WireGuardPeers(relay.relay); !maps.EqualFunc(after, before, slices.Equal) {
		t.Fatalf("wireguard peers after the rollback:\n%v\nwant\n%v", after, before)
	}
	st := relay.relay.Status()
	if len(st.Peers) != 2 || st.Peers[0].Name != "a" || st.Peers[0].Address != applAddrA || st.Peers[1].Name != "b" {
		t.Fatalf("relay peers after a refused reload: %+v", st.Peers)
	}

	if err := relay.relay.Reload(next); err != nil {
		t.Fatalf("the same reload without the failure: %v", err)
	}
	got := tunnel.WireGuardPeers(relay.relay)
	want := map[string][]string{
		keyA.Public().Hex(): prefixStrings(tunnel.TunnelPrefixes(movedA.Address)),
		keyC.Public().Hex(): prefixStrings(tunnel.TunnelPrefixes(applAddrB)),
	}
	if !maps.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("wireguard peers after the reload:\n%v\nwant\n%v", got, want)
	}
}

// When the rollback fails too, the reload says that something did change
// and that a restart restores the peers.
func TestRelayReloadSaysWhenTheRollbackFails(t *testing.T) {
	t.Parallel()
	keyA, keyB, relayKey := mustKey(t), mustKey(t), mustKey(t)
	binds := []netip.Addr{loopback4}
	peerA := conf.Peer{Name: "a", PublicKey: keyA.Public(), Address: applAddrA}
	relay := startRelay(t, relayConfig(relayKey, "127.0.0.1:0", binds, peerA), testLogger(t))
	peerB := conf.Peer{Name: "b", PublicKey: keyB.Public(), Address: applAddrB}
	tunnel.FailIpcSetPartway(relay.relay, 1, true)
	err := relay.relay.Reload(relayConfig(relayKey, "127.0.0.1:0", binds, peerB))
	if !errors.Is(err, tunnel.ErrPeersHalfApplied) || !strings.Contains(err.Error(), "restart natbox relay") {
		t.Fatalf("reload error = %v, want ErrPeersHalfApplied and the fix", err)
	}
}

func prefixStrings(ps []netip.Prefix) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.String())
	}
	slices.Sort(out)
	return out
}

// TestRelayReloadAppliesLimits: max_sessions and dial_timeout change on
// reload; flows admitted under the old cap keep running.
func TestRelayReloadAppliesLimits(t *testing.T) {
	t.Parallel()
	relay, cfg, key, spec, publicAddr := tcpEchoThroughRelay(t, func(c *conf.RelayConfig) { c.Relay.MaxSessions = 1 })
	public := publicAddr.String()
	dial := func() net.Conn {
		t.Helper()
		c, err := net.DialTimeout("tcp", public, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c
	}
	echoes := func(c net.Conn, b byte) bool {
		if _, err := c.Write([]byte{b}); err != nil {
			return false
		}
		buf := make([]byte, 1)
		_, err := io.ReadFull(c, buf)
		return err == nil && buf[0] == b
	}

	first := dial()
	if !echoes(first, 'x') {
		t.Fatal("first flow under max_sessions = 1 failed")
	}
	// Refused: reset at connect or at the first read (see expectReset).
	expectReset(t, publicAddr)

	raised := onePeerRelayConfig(t, key, spec)
	raised.Relay.Listen, raised.Relay.PrivateKey = cfg.Relay.Listen, cfg.Relay.PrivateKey
	raised.Relay.MaxSessions, raised.Relay.DialTimeout = 2, conf.Duration(700*time.Millisecond)
	if err := relay.relay.Reload(raised); err != nil {
		t.Fatal(err)
	}
	if d, max := tunnel.Limits(relay.relay); d != 700*time.Millisecond || max != 2 {
		t.Fatalf("limits after reload: dial_timeout %v, max_sessions %d", d, max)
	}
	if !echoes(dial(), 'z') {
		t.Fatal("a flow under the raised max_sessions = 2 failed")
	}

	lowered := *raised
	lowered.Relay.MaxSessions = 1
	if err := relay.relay.Reload(&lowered); err != nil {
		t.Fatal(err)
	}
	if !echoes(first, 'w') {
		t.Fatal("a flow admitted before max_sessions was lowered was cut")
	}
	expectReset(t, publicAddr) // over the lowered max_sessions
	if st := relay.relay.Status(); st.OverLimit != 2 {
		t.Fatalf("over_limit = %d, want 2", st.OverLimit)
	}
}
