package tunnel

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/natbox/natbox/conf"
)

func TestParsePeerStats(t *testing.T) {
	t.Parallel()
	k1, k2 := conf.Key{1}, conf.Key{2}
	text := fmt.Sprintf(`private_key=%s
listen_port=51820
public_key=%s
preshared_key=%s
protocol_version=1
endpoint=127.0.0.1:40000
last_handshake_time_sec=1700000000
last_handshake_time_nsec=500
tx_bytes=10
rx_bytes=20
persistent_keepalive_interval=25
allowed_ip=100.96.0.2/32
public_key=%s
protocol_version=1
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
`, conf.Key{9}.Hex(), k1.Hex(), conf.Key{}.Hex(), k2.Hex())
	got, err := parsePeerStats(text)
	if err != nil {
		t.Fatal(err)
	}
	want := map[conf.Key]peerStats{
		k1: {Endpoint: "127.0.0.1:40000", LastHandshake: time.Unix(1700000000, 500), RxBytes: 20, TxBytes: 10},
		k2: {},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d peers, want %d", len(got), len(want))
	}
	for k, w := range want {
		g := got[k]
		if g.Endpoint != w.Endpoint || !g.LastHandshake.Equal(w.LastHandshake) || g.RxBytes != w.RxBytes || g.TxBytes != w.TxBytes {
			t.Errorf("peer %s: got %+v, want %+v", k.Hex()[:8], g, w)
		}
	}
	if _, err := parsePeerStats("public_key=zz\n"); err == nil {
		t.Error("bad key accepted")
	}
}

func TestWGLoggerLevels(t *testing.T) {
	t.Parallel()
	core, logs := observer.New(zap.DebugLevel)
	wl := &wgLog{log: zap.New(core)}
	l := wl.logger()
	l.Verbosef("peer %d handshake", 1)
	l.Errorf("send failed: %s", "boom")
	entries := logs.All()
	if len(entries) != 2 || entries[0].Level != zap.DebugLevel || entries[1].Level != zap.WarnLevel ||
		entries[1].ContextMap()["event"] != "send failed: boom" {
		t.Fatalf("entries = %+v", entries)
	}
	wl.mute()
	l.Errorf("a worker still running after Close: %s", "late")
	if n := logs.Len(); n != 2 {
		t.Fatalf("%d entries after mute; want the 2 from before", n)
	}
}

// A closed device's logger is muted: wireguard-go's workers may outlive its
// Close and must not write into a logger its owner is done with.
func TestDeviceCloseMutesItsLogger(t *testing.T) {
	t.Parallel()
	core, logs := observer.New(zap.DebugLevel)
	key, _ := conf.GenerateKey()
	d, _, err := newDevice(tuntest.NewChannelTUN().TUN(), newUDPBind(), key, 0, gatePackets, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	n := logs.Len()
	if n == 0 {
		t.Fatal("the device logged nothing at debug level; the test cannot tell")
	}
	d.log.logger().Errorf("late")
	if logs.Len() != n {
		t.Fatal("a line was written after Close")
	}
}

// TestDevicePairAllowedIPs checks the UAPI plumbing with real devices: a
// handshake over loopback, packets in both directions, stats from IpcGet,
// and that the relay drops a peer's packet claiming another source address.
func TestDevicePairAllowedIPs(t *testing.T) {
	t.Parallel()
	log := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	relayKey, _ := conf.GenerateKey()
	applKey, _ := conf.GenerateKey()
	relayAddr := netip.MustParseAddr("100.96.0.1")
	applAddr := netip.MustParseAddr("100.96.0.2")

	relayTUN, applTUN := tuntest.NewChannelTUN(), tuntest.NewChannelTUN()
	relayDev, _, err := newDevice(relayTUN.TUN(), newUDPBind(), relayKey, 0, gatePackets, log)
	if err != nil {
		t.Fatal(err)
	}
	defer relayDev.Close()
	if err := relayDev.IpcSet(peerUAPI(applKey.Public(), netip.AddrPort{}, 0, TunnelPrefixes(applAddr))); err != nil {
		t.Fatal(err)
	}
	port, err := boundPort(relayDev)
	if err != nil || port == 0 {
		t.Fatalf("relay port %d, %v", port, err)
	}
	applDev, _, err := newDevice(applTUN.TUN(), newUDPBind(), applKey, 0, gatePackets, log)
	if err != nil {
		t.Fatal(err)
	}
	defer applDev.Close()
	everything := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
	ep := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	if err := applDev.IpcSet(peerUAPI(relayKey.Public(), ep, 0, everything)); err != nil {
		t.Fatal(err)
	}

	recv := func(ch chan []byte) []byte {
		t.Helper()
		select {
		case p := <-ch:
			return p
		case <-time.After(10 * time.Second):
			t.Fatal("no packet within 10 s")
			return nil
		}
	}
	// appliance -> relay from its own address: delivered.
	ping := tuntest.Ping(relayAddr, applAddr)
	applTUN.Outbound <- ping
	if got := recv(relayTUN.Inbound); !bytes.Equal(got, ping) {
		t.Fatalf("relay got %x, want %x", got, ping)
	}
	// relay -> appliance with a public client's address as source: delivered
	// (the appliance allows everything).
	client := netip.MustParseAddr("198.51.100.7")
	back := tuntest.Ping(applAddr, client)
	relayTUN.Outbound <- back
	if got := recv(applTUN.Inbound); !bytes.Equal(got, back) {
		t.Fatalf("appliance got %x, want %x", got, back)
	}
	// appliance -> relay claiming another peer's address: dropped; the next
	// honest packet is the first to arrive.
	applTUN.Outbound <- tuntest.Ping(relayAddr, netip.MustParseAddr("100.96.0.3"))
	applTUN.Outbound <- ping
	if got := recv(relayTUN.Inbound); !bytes.Equal(got, ping) {
		t.Fatalf("spoofed packet delivered: %x", got)
	}

	stats, err := readPeerStats(applDev)
	if err != nil {
		t.Fatal(err)
	}
	st := stats[relayKey.Public()]
	if st.LastHandshake.IsZero() || st.TxBytes == 0 || st.RxBytes == 0 || st.Endpoint != ep.String() {
		t.Fatalf("appliance stats %+v", st)
	}
}
