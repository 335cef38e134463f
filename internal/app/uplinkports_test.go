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
