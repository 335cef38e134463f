package app

import (
	"slices"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/tunnel"
)

// TestUplinkPortsCarryUDPIdle: what the appliance registers on the relay is
// each uplink mapping's listen ports, with the UDP idle timeout of those
// that carry UDP, so the relay's sessions last as long as the appliance's.
func TestUplinkPortsCarryUDPIdle(t *testing.T) {
	ports := func(lo, hi uint16) conf.PortRange { return conf.PortRange{Lo: lo, Hi: hi} }
	cfg := &conf.Config{
		TUN:     &conf.TUN{},
		Uplinks: []conf.Uplink{{}},
		Mappings: []conf.Mapping{
			{Name: "game", Protocol: conf.TCPUDP, Listen: conf.Listen{Ports: ports(27015, 27015)}, IdleTimeout: conf.Duration(5 * time.Minute)},
			{Name: "dns", Protocol: conf.UDP, Listen: conf.Listen{Ports: ports(53, 53)}},
			{Name: "web", Protocol: conf.TCP, Listen: conf.Listen{Ports: ports(443, 443)}},
			{Name: "lan", Protocol: conf.UDP, Listen: conf.Listen{Ports: ports(5000, 5010)}, Ingress: []string{conf.IngressTUN}},
		},
	}
	got := uplinkPorts(cfg, time.Now())
	want := []tunnel.WantedPort{
		{Spec: conf.PortSpec{Proto: conf.TCPUDP, Ports: ports(27015, 27015)}, UDPIdle: 5 * time.Minute},
		{Spec: conf.PortSpec{Proto: conf.UDP, Ports: ports(53, 53)}, UDPIdle: conf.DefaultUDPIdleTimeout},
		{Spec: conf.PortSpec{Proto: conf.TCP, Ports: ports(443, 443)}},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("uplinkPorts = %+v, want %+v", got, want)
	}
}

// TestRefusedByRelays: a mapping is refused by the relay only when every
// relay refused its ports; one relay's refusal is still shown, named.
func TestRefusedByRelays(t *testing.T) {
	web := conf.Mapping{Name: "web", Protocol: conf.TCP, Listen: conf.Listen{Ports: conf.PortRange{Lo: 443, Hi: 443}}}
	one := &conf.Config{Uplinks: []conf.Uplink{{Relay: "a:51820"}}}
	two := &conf.Config{Uplinks: []conf.Uplink{{Relay: "a:51820"}, {Relay: "b:51820"}}}
	taken := map[string]string{"tcp/443": "port taken"}
	tests := []struct {
		name    string
		cfg     *conf.Config
		refused []map[string]string
		reason  string
		all     bool
	}{
		{"one relay holds it", one, []map[string]string{{}}, "", false},
		{"one relay refuses", one, []map[string]string{taken}, "port taken", true},
		{"another port refused", one, []map[string]string{{"tcp/22": "no"}}, "", false},
		{"one of two refuses", two, []map[string]string{{}, taken}, "b:51820: port taken", false},
		{"both refuse", two, []map[string]string{taken, {"tcp/443": "not in this peer's ports"}},
			"a:51820: port taken; b:51820: not in this peer's ports", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reason, all := refusedByRelays(&web, tt.cfg, tt.refused)
			if reason != tt.reason || all != tt.all {
				t.Errorf("got %q %v, want %q %v", reason, all, tt.reason, tt.all)
			}
		})
	}
}
