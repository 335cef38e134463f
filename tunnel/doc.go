// Package tunnel is natbox's WireGuard layer: keys and devices (wireguard-go
// configured through its UAPI), the appliance's Uplink to a relay, and the
// Relay itself with its per-peer port allowances, the control channel over
// which an appliance registers the ports it wants, and peer isolation.
//
// tunnel never imports netstack: cmd hands each side a tun.Device (the outer
// side of a netstack.Direct pair) and the small Originator / ControlDialer
// interfaces that a netstack.Stack implements.
//
// Addressing inside the tunnel: every side has its configured IPv4 tunnel
// address and an IPv6 ULA derived from it (TunnelAddr6), so the relay can
// originate flows of IPv6 public clients with their real address (an IPv6
// source needs an IPv6 destination). The relay's control server listens on
// its own tunnel addresses, TCP port ControlPort.
package tunnel
