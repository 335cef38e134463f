package conf

import (
	"fmt"
	"net/netip"
	"path/filepath"
)

// DefaultRelayListen is where the relay's WireGuard listens by default.
const DefaultRelayListen = "0.0.0.0:51820"

// DefaultRelayAdminSocket differs from the appliance's DefaultAdminSocket so
// that both run on one host with default settings.
const DefaultRelayAdminSocket = "/run/natbox/relay.sock"

func defaultRelay() RelaySection {
	return RelaySection{
		Listen:      DefaultRelayListen,
		PublicBind:  []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()},
		MTU:         DefaultTunnelMTU,
		DialTimeout: Duration(DefaultDialTimeout),
		MaxSessions: DefaultMaxSessions,

		TCPCongestion: DefaultTCPCongestion,

		PeerMaxSessions:          DefaultPeerMaxSessions,
		PeerMaxUDPSessions:       DefaultPeerMaxUDPSessions,
		PeerMaxInflight:          DefaultPeerMaxInflight,
		PeerNewSessionsPerSecond: DefaultPeerNewSessionsRate,
		PeerMaxUDPSockets:        DefaultPeerMaxUDPSockets,
		MaxUDPSockets:            DefaultMaxUDPSockets,

		MaxSessionsPerSource:          DefaultSessionsPerSource,
		NewSessionsPerSourcePerSecond: DefaultNewSessionsRate,

		BufferMemory: DefaultRelayBufferMemory,
		MemoryLimit:  DefaultRelayMemoryLimit,
	}
}

// Defaults of the relay's per-peer quotas.
const (
	DefaultPeerMaxSessions     = 10000
	DefaultPeerMaxUDPSessions  = 4000
	DefaultPeerMaxInflight     = 256
	DefaultPeerNewSessionsRate = 1000
	// 1024 UDP ports on the default two bind addresses.
	DefaultPeerMaxUDPSockets = 2048
	DefaultMaxUDPSockets     = 8192
)

// PeerLimits are one peer's quotas and per-source budgets, resolved
// against the [relay] defaults. Zero is unlimited; a zero burst is twice
// its rate.
type PeerLimits struct {
	MaxSessions, MaxUDPSessions, MaxInflight                                       int
	NewSessionsPerSecond, NewSessionsBurst                                         int
	MaxSessionsPerSource, NewSessionsPerSourcePerSecond, NewSessionsPerSourceBurst int
	MaxUDPSockets                                                                  int
}

// PeerLimits returns p's limits: its own keys where set, [relay]'s otherwise.
func (s RelaySection) PeerLimits(p *Peer) PeerLimits {
	pick := func(own, def int) int {
		if own > 0 {
			return own
		}
		return def
	}
	return PeerLimits{
		MaxSessions:                   pick(p.MaxSessions, s.PeerMaxSessions),
		MaxUDPSessions:                pick(p.MaxUDPSessions, s.PeerMaxUDPSessions),
		MaxInflight:                   pick(p.MaxInflight, s.PeerMaxInflight),
		NewSessionsPerSecond:          pick(p.NewSessionsPerSecond, s.PeerNewSessionsPerSecond),
		NewSessionsBurst:              pick(p.NewSessionsBurst, s.PeerNewSessionsBurst),
		MaxSessionsPerSource:          pick(p.MaxSessionsPerSource, s.MaxSessionsPerSource),
		NewSessionsPerSourcePerSecond: pick(p.NewSessionsPerSourcePerSecond, s.NewSessionsPerSourcePerSecond),
		NewSessionsPerSourceBurst:     pick(p.NewSessionsPerSourceBurst, s.NewSessionsPerSourceBurst),
		MaxUDPSockets:                 pick(p.MaxUDPSockets, s.PeerMaxUDPSockets),
	}
}

// quotaKeys are the per-peer quota keys: in [relay] with their prefix, in
// [[peer]] as written.
func quotaKeys(s *RelaySection, p *Peer) []struct {
	key string
	n   int
} {
	if p == nil {
		return []struct {
			key string
			n   int
		}{
			{"peer_max_sessions", s.PeerMaxSessions}, {"peer_max_udp_sessions", s.PeerMaxUDPSessions},
			{"peer_max_inflight", s.PeerMaxInflight}, {"peer_new_sessions_per_second", s.PeerNewSessionsPerSecond},
			{"peer_new_sessions_burst", s.PeerNewSessionsBurst}, {"max_sessions_per_source", s.MaxSessionsPerSource},
			{"new_sessions_per_source_per_second", s.NewSessionsPerSourcePerSecond},
			{"new_sessions_per_source_burst", s.NewSessionsPerSourceBurst},
			{"peer_max_udp_sockets", s.PeerMaxUDPSockets}, {"max_udp_sockets", s.MaxUDPSockets},
		}
	}
	return []struct {
		key string
		n   int
	}{
		{"max_sessions", p.MaxSessions}, {"max_udp_sessions", p.MaxUDPSessions},
		{"max_inflight", p.MaxInflight}, {"new_sessions_per_second", p.NewSessionsPerSecond},
		{"new_sessions_burst", p.NewSessionsBurst}, {"max_sessions_per_source", p.MaxSessionsPerSource},
		{"new_sessions_per_source_per_second", p.NewSessionsPerSourcePerSecond},
		{"new_sessions_per_source_burst", p.NewSessionsPerSourceBurst},
		{"max_udp_sockets", p.MaxUDPSockets},
	}
}

func (c *RelayConfig) validate(r *report) {
	validateLog(r, c.Log)
	validateAdmin(r, c.Admin)
	s := &c.Relay
	validateRuntime(r, "relay", s.Runtime())
	if err := checkHostPort(s.Listen, true); err != nil {
		r.valueError("relay.listen", err, "")
	}
	loadPrivateKey(r, "relay", &s.PrivateKey, s.PrivateKeyFile, filepath.Dir(c.Path))
	if !s.Address.IsValid() {
		r.errorf("relay.address", `set the relay's tunnel address, e.g. address = "10.77.0.1"`, "address is required")
	} else {
		tunnelAddr(r, "relay.address", &s.Address)
	}
	if len(s.PublicBind) == 0 {
		r.errorf("relay.public_bind", `list the addresses public listeners open on, e.g. ["0.0.0.0", "::"]`, "public_bind is empty")
	}
	if s.MaxMTU == 0 {
		s.MaxMTU = max(DefaultMaxTunnelMTU, s.MTU)
	}
	validateMaxMTU(r, "relay", s.MTU, s.MaxMTU)
	if s.TCPListen != "" {
		if err := checkHostPort(s.TCPListen, true); err != nil {
			r.valueError("relay.tcp_listen", err, "")
		}
	}
	validateCongestion(r, "relay.tcp_congestion", s.TCPCongestion)
	if s.MaxSessions < 0 {
		r.errorf("relay.max_sessions", "use 0 for unlimited or a positive number", "%d is negative", s.MaxSessions)
	}
	for _, f := range quotaKeys(s, nil) {
		if f.n < 0 {
			r.errorf("relay."+f.key, "use 0 for unlimited or a positive number", "%d is negative", f.n)
		}
	}

	names := make(map[string]int)
	keys := make(map[Key]int)
	addrs := make(map[netip.Addr]int)
	line := func(j int) int { return c.Peers[j].Line }
	for i := range c.Peers {
		pe := &c.Peers[i]
		p := fmt.Sprintf("peer[%d]", i)
		validateName(r, p, pe.Name, i, names, "peer", line)
		for _, f := range quotaKeys(s, pe) {
			if f.n < 0 {
				r.errorf(p+"."+f.key, "use a positive number, or 0 for the [relay] default", "%d is negative", f.n)
			}
		}
		switch j, dup := keys[pe.PublicKey]; {
		case pe.PublicKey.IsZero():
			r.errorf(p+".public_key", "copy the appliance's public key (wg pubkey < its key file)", "public_key is required")
		case !s.PrivateKey.IsZero() && pe.PublicKey == s.PrivateKey.Public():
			r.errorf(p+".public_key", "use the appliance's public key", "public_key is the relay's own key")
		case dup:
			r.errorf(p+".public_key", "give each appliance its own key", "public_key is already used by %s", c.peerLabel(j))
		default:
			keys[pe.PublicKey] = i
		}
		written := pe.Address // as written, for messages: ::ffff:10.77.0.2 compares as 10.77.0.2
		as := written.String()
		if written.Is4In6() {
			as = fmt.Sprintf("%s (%s)", written, written.Unmap())
		}
		switch {
		case !pe.Address.IsValid():
			r.errorf(p+".address", `set the appliance's tunnel address, e.g. address = "10.77.0.2"`, "address is required")
			continue
		case !tunnelAddr(r, p+".address", &pe.Address):
			continue
		}
		switch j, dup := addrs[pe.Address]; {
		case pe.Address == s.Address:
			r.errorf(p+".address", "pick another address in the tunnel subnet", "address %s is the relay's own address", as)
		case dup:
			r.errorf(p+".address", "give each appliance its own address", "address %s is already used by %s", as, c.peerLabel(j))
		default:
			addrs[pe.Address] = i
		}
	}
	c.checkPeerPorts(r)
	c.checkUDPSockets(r)
}

// UDPSockets is how many public UDP sockets holding every UDP port in
// specs costs: one per port per public_bind address.
func (c *RelayConfig) UDPSockets(specs []PortSpec) int {
	n := 0
	for _, s := range specs {
		if s.Proto.Has(UDP) {
			n += s.Ports.Size()
		}
	}
	return n * max(1, len(c.Relay.PublicBind))
}

// checkUDPSockets warns about a UDP allowance the socket caps can never
// grant whole: registering it would always be refused.
func (c *RelayConfig) checkUDPSockets(r *report) {
	s := &c.Relay
	for j := range c.Peers {
		pe := &c.Peers[j]
		limit := s.PeerLimits(pe).MaxUDPSockets
		for k, ps := range pe.Ports {
			n := c.UDPSockets([]PortSpec{ps})
			switch {
			case limit > 0 && n > limit:
				r.warnf(fmt.Sprintf("peer[%d].ports[%d]", j, k),
					"%s needs %d public UDP sockets (%d bind addresses), more than the peer's %d (max_udp_sockets); it will be refused: narrow it or raise the cap",
					ps, n, max(1, len(s.PublicBind)), limit)
			case s.MaxUDPSockets > 0 && n > s.MaxUDPSockets:
				r.warnf(fmt.Sprintf("peer[%d].ports[%d]", j, k),
					"%s needs %d public UDP sockets (%d bind addresses), more than the relay's %d (relay.max_udp_sockets); it will be refused: narrow it or raise the cap",
					ps, n, max(1, len(s.PublicBind)), s.MaxUDPSockets)
			}
		}
	}
}

// checkPeerPorts rejects two peers allowed to hold the same public port:
// the relay could not tell whose listener a client meant. Overlaps within one
// peer's list are harmless but usually a typo, so they are warnings.
func (c *RelayConfig) checkPeerPorts(r *report) {
	for j := range c.Peers {
		ports := c.Peers[j].Ports
		for k, b := range ports {
			for i, a := range ports[:k] {
				if shared := a.Proto & b.Proto; shared != 0 && a.Ports.Overlaps(b.Ports) {
					r.warnf(fmt.Sprintf("peer[%d].ports[%d]", j, k), "%s/%s is already in this peer's ports (%s); list each port once",
						shared, a.Ports.Intersect(b.Ports), ports[i])
					break
				}
			}
		}
	next:
		for k, b := range c.Peers[j].Ports {
			for i := range j {
				for _, a := range c.Peers[i].Ports {
					if shared := a.Proto & b.Proto; shared != 0 && a.Ports.Overlaps(b.Ports) {
						r.errorf(fmt.Sprintf("peer[%d].ports[%d]", j, k), "give each port to one peer",
							"%s/%s is already allowed to %s", shared, a.Ports.Intersect(b.Ports), c.peerLabel(i))
						continue next
					}
				}
			}
		}
	}
}

func (c *RelayConfig) peerLabel(i int) string {
	return label("peer", i, c.Peers[i].Name, c.Peers[i].Line)
}

// PeerByKey returns the peer with public key k.
func (c *RelayConfig) PeerByKey(k Key) (*Peer, bool) {
	for i := range c.Peers {
		if c.Peers[i].PublicKey == k {
			return &c.Peers[i], true
		}
	}
	return nil, false
}
