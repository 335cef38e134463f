package tunnel_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
)

// TestPathMTUProbe: on loopback (a 64 KiB path) the uplink's probe raises
// the tunnel MTU to max_mtu, and a flow through the relay then crosses the
// tunnel in packets that large; a relay whose max_mtu is its mtu (as an
// older relay) drops the probe, and the tunnel stays at mtu; an appliance
// whose max_mtu is its mtu does not probe.
func TestPathMTUProbe(t *testing.T) {
	cases := []struct {
		name                 string
		relayMax, uplinkMax  int
		wantMTU              int
		wantProbes, wantLost bool
	}{
		{"raised", conf.DefaultMaxTunnelMTU, conf.DefaultMaxTunnelMTU, conf.DefaultMaxTunnelMTU, true, false},
		{"relay keeps mtu", testMTU, conf.DefaultMaxTunnelMTU, testMTU, true, true},
		{"probe off", conf.DefaultMaxTunnelMTU, testMTU, testMTU, false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			port := freePort(t, false)
			spec := fmt.Sprintf("tcp/%d", port)
			key := mustKey(t)
			cfg := onePeerRelayConfig(t, key, spec)
			cfg.Relay.MaxMTU = tc.relayMax
			relay := startRelay(t, cfg, testLogger(t))
			a := runAppliance(t, fmt.Sprintf(`
[uplink]
relay = "127.0.0.1:%d"
relay_public_key = %q
private_key = %q
address = %q
relay_address = %q
keepalive = "1s"
mtu = %d
max_mtu = %d
%s`, relay.port, relay.key.Public(), key, applAddrA, relayTunnelAddr, testMTU, tc.uplinkMax,
				mappingTOML("echo", "tcp", port, echoService(t), "")), applAddrA)
			waitRegistered(t, a, spec)
			// The probe runs right after registration: done once the
			// counters stop moving with an answer (lost ones take 1 s each).
			waitFor(t, 20*time.Second, "the path probe", func() bool {
				st := a.uplink.Status()
				return !tc.wantProbes || int(st.MTU) == tc.wantMTU && st.PathProbes > 0 &&
					(!tc.wantLost || st.PathProbesLost == 6)
			})
			st := a.uplink.Status()
			if int(st.MTU) != tc.wantMTU || (st.PathProbes > 0) != tc.wantProbes || (st.PathProbesLost > 0) != tc.wantLost {
				t.Fatalf("uplink mtu %d, %d probes, %d lost; want mtu %d, probes %v, lost %v",
					st.MTU, st.PathProbes, st.PathProbesLost, tc.wantMTU, tc.wantProbes, tc.wantLost)
			}
			if got := a.stack.PathMTU(); got != tc.wantMTU {
				t.Fatalf("appliance stack path mtu %d, want %d", got, tc.wantMTU)
			}
			if tc.wantMTU != testMTU {
				// The warm streams opened at the old MTU are replaced.
				waitFor(t, 10*time.Second, "the relay's warm streams replaced", func() bool {
					p := relay.relay.Status().Peers[0]
					return p.WarmStreamResets > 0
				})
			}

			// 4 MiB each way through the relay: the appliance's stack
			// takes them in packets of about the MTU.
			const n = 4 << 20
			before := a.stack.Stats().PacketsIn
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			data := bytes.Repeat([]byte("natbox!\n"), n/8)
			go func() {
				c.Write(data)
				c.(*net.TCPConn).CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("echo through the relay: %d of %d bytes, %v", len(got), n, err)
			}
			packets := a.stack.Stats().PacketsIn - before
			// Data segments alone: n / (mtu - 52 bytes of IPv4, TCP and
			// timestamp headers); ACKs for the echo come on top.
			minData := uint64(n / (tc.wantMTU - 52))
			if packets < minData || packets > 3*minData+200 {
				t.Fatalf("%d packets in for %d bytes at mtu %d; want %d-%d", packets, n, tc.wantMTU, minData, 3*minData+200)
			}
			t.Logf("mtu %d: %d packets in for %d bytes each way", tc.wantMTU, packets, n)
		})
	}
}
