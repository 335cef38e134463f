package app

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/netstack"
	"github.com/natbox/natbox/tunnel"
)

// applianceSource adapts a running Appliance to what the admin API shows.
type applianceSource struct {
	a       *Appliance
	started time.Time
	version string
}

func (s applianceSource) Status() admin.Status {
	cfg := s.a.config()
	st := engineStatus(s.a.engine.Snapshot())
	st.Time, st.Version, st.ConfigPath, st.StartedAt = time.Now(), s.version, cfg.Path, s.started
	if s.a.addressWarning != "" {
		st.Warnings = append(st.Warnings, s.a.addressWarning)
	}
	st.Netstack = make(map[string]admin.Counters, len(s.a.ingresses))
	for _, in := range s.a.ingresses {
		st.Netstack[in.statusName()] = netstackStatus(in.stack.Stats())
	}
	byName := make(map[string]*conf.Mapping, len(cfg.Mappings))
	for i := range cfg.Mappings {
		byName[cfg.Mappings[i].Name] = &cfg.Mappings[i]
	}
	if s.a.tunName != "" {
		t, err := tunStatus(s.a.tunName)
		if err != nil {
			t.Error = err.Error()
		}
		st.TUN = &t
	}
	relayRefused := make([]map[string]string, len(s.a.uplinks)) // per uplink: "tcp/22" -> reason
	for i, up := range s.a.uplinks {
		u := uplinkStatus(&cfg.Uplinks[i], up.Status())
		st.Uplinks = append(st.Uplinks, u)
		relayRefused[i] = make(map[string]string, len(u.Refused))
		for _, r := range u.Refused {
			relayRefused[i][r.Port] = r.Reason
		}
	}
	for i := range st.Mappings {
		m := &st.Mappings[i]
		cm := byName[m.Name]
		if cm == nil {
			continue
		}
		m.Ingress = cm.Ingress
		m.Description, m.Owner = cm.Description, cm.Owner
		for _, port := range cm.RiskyExposure() {
			m.RiskyExposure = append(m.RiskyExposure, fmt.Sprintf("%s (%d)", conf.RiskyPorts[port], port))
		}
		for _, p := range cm.Allow {
			m.Allow = append(m.Allow, p.String())
		}
		if reason, all := refusedByRelays(cm, cfg, relayRefused); reason != "" {
			m.RelayRefusal = reason
			if all && !cm.ServesIngress(conf.IngressTUN, cfg) && m.State == admin.StateActive {
				m.State = admin.StateRefusedByRelay
			}
		}
	}
	return st
}

// The fields of each status struct that this file shows by hand. Every other
// field is exported by admin.CountersOf (integers, bools, groups of them), so
// a counter added to one of these structs reaches natbox status and /metrics
// with no code here; export_test.go fails for a field neither covers.
var (
	engineByHand  = []string{"Mappings", "Unmatched", "InflightDials"}
	mappingByHand = []string{
		"Name", "Protocol", "Listen", "Target", "Enabled", "Expired", "ReviewOverdue", "Expires", "ReviewBy",
		"Hits", "SessionsOpened", "SessionsActive", "BytesIn", "BytesOut", "LastUsed", "Refusals",
		"UDPExpired", "UDPDropped", "DialLatency",
	}
	uplinkByHand    = []string{"State", "Relay", "Endpoint", "Peer", "LastHandshake", "RxBytes", "TxBytes", "Registered", "Refused", "Transport", "SwitchReason", "TransportError", "TCPCongestion"}
	relayByHand     = []string{"Peers", "TCPCongestion"}
	relayPeerByHand = []string{
		"Name", "PublicKey", "Address", "Endpoint", "LastHandshake", "RxBytes", "TxBytes", "Ports", "Refused",
		"SessionsActive", "SessionsOpened", "DialFailures", "ControlRefusals",
	}
)

// netstackStatus is every counter of one stack: netstack.Stats has nothing
// to show by hand.
func netstackStatus(ns netstack.Stats) admin.Counters { return admin.CountersOf(ns) }

// engineStatus is what the forwarder's snapshot says, before the config adds
// its descriptions.
func engineStatus(snap forwarder.Status) admin.Status {
	st := admin.Status{
		Refusals:      nonZero(snap.Unmatched),
		InflightDials: snap.InflightDials,
		Forwarder:     admin.CountersOf(snap, engineByHand...),
	}
	budget := map[string]uint64{}
	for _, ms := range snap.Mappings {
		st.Mappings = append(st.Mappings, mappingStatus(ms))
		for reason, n := range ms.Refusals {
			if limit, ok := budgetLimit[reason]; ok && n > 0 {
				budget[limit] += n
			}
		}
	}
	st.BudgetHits = nonZero(budget)
	return st
}

func mappingStatus(ms forwarder.MappingStatus) admin.Mapping {
	m := admin.Mapping{
		Name:               ms.Name,
		State:              admin.StateActive,
		Protocol:           ms.Protocol,
		Listen:             ms.Listen,
		Target:             ms.Target,
		Hits:               ms.Hits,
		SessionsOpened:     ms.SessionsOpened,
		SessionsActive:     ms.SessionsActive,
		BytesIn:            ms.BytesIn,
		BytesOut:           ms.BytesOut,
		LastUsed:           ms.LastUsed,
		Refusals:           ms.Refusals, // every reason, zeros too: Prometheus rate() needs the series from the start
		UDPSessionsExpired: ms.UDPExpired,
		UDPDropped:         ms.UDPDropped,
		DialLatency:        histogram(ms.DialLatency),
		ReviewBy:           ms.ReviewBy,
		Expires:            ms.Expires,
		ReviewOverdue:      ms.ReviewOverdue,
		Stats:              admin.CountersOf(ms, mappingByHand...),
	}
	switch {
	case !ms.Enabled:
		m.State = admin.StateDisabled
	case ms.Expired:
		m.State = admin.StateExpired
	}
	return m
}

// budgetLimit names the shared budget behind each over-limit refusal reason,
// as the admin API and metrics label them.
var budgetLimit = map[string]string{
	"over_limit_inflight":            "total",
	"over_limit_inflight_per_source": "per_source",
	"over_limit_inflight_per_target": "per_target",
	"over_limit_mapping_sessions":    "sessions",
	"over_limit_sessions":            "sessions",
	"over_limit_tcp_sessions":        "tcp_sessions",
	"over_limit_udp_sessions":        "udp_sessions",
	"over_limit_sessions_per_source": "sessions_per_source",
	"over_limit_rate_per_source":     "rate_per_source",
}

// refusedByRelays returns the relays' reasons for refusing m's ports, each
// named by its relay when there are several, and whether every relay
// refused: one that holds the ports still serves the mapping. refused holds
// each uplink's refusals, in cfg.Uplinks order.
func refusedByRelays(m *conf.Mapping, cfg *conf.Config, refused []map[string]string) (reason string, all bool) {
	var reasons []string
	for i, r := range refused {
		if why := refusedByRelay(m, cfg, r); why != "" {
			if len(refused) > 1 {
				why = cfg.Uplinks[i].Relay + ": " + why
			}
			reasons = append(reasons, why)
		}
	}
	return strings.Join(reasons, "; "), len(reasons) > 0 && len(reasons) == len(refused)
}

// refusedByRelay returns the relay's reason for refusing any of m's ports.
func refusedByRelay(m *conf.Mapping, cfg *conf.Config, refused map[string]string) string {
	if len(refused) == 0 || !m.ServesIngress(conf.IngressUplink, cfg) {
		return ""
	}
	for _, p := range []conf.Proto{conf.TCP, conf.UDP} {
		if !m.Protocol.Has(p) {
			continue
		}
		key := conf.PortSpec{Proto: p, Ports: m.Listen.Ports}.String()
		if r, ok := refused[key]; ok {
			return r
		}
	}
	return ""
}

func (s applianceSource) Sessions(mapping string) []admin.Session {
	return adminSessions(s.a.engine.Sessions(), func(name string) bool { return mapping == "" || name == mapping })
}

// adminSessions converts the engine's sessions whose mapping keep accepts.
func adminSessions(all []forwarder.SessionInfo, keep func(mapping string) bool) []admin.Session {
	var out []admin.Session
	for _, si := range all {
		if !keep(si.Mapping) {
			continue
		}
		out = append(out, admin.Session{
			ID:         si.ID,
			Mapping:    si.Mapping,
			Protocol:   si.Protocol,
			Client:     si.Client.String(),
			Public:     si.Public.String(),
			Target:     si.Target,
			Ingress:    si.Ingress,
			Started:    si.Start,
			LastActive: si.LastActivity,
			BytesIn:    si.BytesIn,
			BytesOut:   si.BytesOut,
		})
	}
	return out
}

func (s applianceSource) Reload(context.Context) (admin.ReloadResult, error) {
	diff, err := s.a.Reload()
	if err != nil {
		return admin.ReloadResult{}, admin.InvalidConfig(err)
	}
	return admin.ReloadResult{Added: diff.Added, Changed: diff.Changed, Removed: diff.Removed, SessionsClosed: diff.SessionsClosed,
		Restart: diff.Restart}, nil
}

func histogram(h forwarder.Histogram) admin.Histogram {
	out := admin.Histogram{Count: h.Count, SumSeconds: h.Sum.Seconds()}
	for i, b := range h.Bounds {
		out.Buckets = append(out.Buckets, admin.Bucket{UpperBoundSeconds: b.Seconds(), Count: h.Buckets[i]})
	}
	return out
}

func nonZero(m map[string]uint64) map[string]uint64 {
	out := make(map[string]uint64, len(m))
	for k, v := range m {
		if v > 0 {
			out[k] = v
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

func uplinkStatus(c *conf.Uplink, us tunnel.UplinkStatus) admin.Uplink {
	return admin.Uplink{
		State:         us.State,
		Peer:          us.Peer,
		Relay:         us.Relay,
		Endpoint:      us.Endpoint,
		Address:       c.Address.String(),
		LastHandshake: us.LastHandshake,
		BytesIn:       us.RxBytes,
		BytesOut:      us.TxBytes,
		Registered:    us.Registered,
		Refused:       refusals(us.Refused),
		Stats:         admin.CountersOf(us, uplinkByHand...),

		Transport:      us.Transport,
		SwitchReason:   us.SwitchReason,
		TransportError: us.TransportError,
		TCPCongestion:  us.TCPCongestion,
	}
}

func refusals(m map[string]string) []admin.PortRefusal {
	out := make([]admin.PortRefusal, 0, len(m))
	for port, reason := range m {
		out = append(out, admin.PortRefusal{Port: port, Reason: reason})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Port < out[j].Port })
	return out
}

// relaySource adapts a RelayNode to the admin API.
type relaySource struct {
	n       *RelayNode
	started time.Time
	version string
}

func (s relaySource) Status() admin.Status {
	s.n.mu.Lock()
	cfg := s.n.cfg
	s.n.mu.Unlock()
	return admin.Status{
		Time: time.Now(), Version: s.version, ConfigPath: cfg.Path, StartedAt: s.started,
		Relay:    relayStatus(cfg, s.n.relay.Status()),
		Netstack: map[string]admin.Counters{"relay": netstackStatus(s.n.stack.Stats())},
	}
}

func relayStatus(cfg *conf.RelayConfig, rs tunnel.RelayStatus) *admin.Relay {
	allowed := make(map[string][]string, len(cfg.Peers))
	for _, p := range cfg.Peers {
		for _, spec := range p.Ports {
			allowed[p.Name] = append(allowed[p.Name], spec.String())
		}
	}
	r := &admin.Relay{Listen: cfg.Relay.Listen, TCPCongestion: rs.TCPCongestion, Stats: admin.CountersOf(rs, relayByHand...)}
	for _, p := range rs.Peers {
		r.Peers = append(r.Peers, admin.RelayPeer{
			Name:           p.Name,
			PublicKey:      p.PublicKey,
			Address:        p.Address.String(),
			Endpoint:       p.Endpoint,
			LastHandshake:  p.LastHandshake,
			BytesIn:        p.RxBytes,
			BytesOut:       p.TxBytes,
			Allowed:        allowed[p.Name],
			Registered:     p.Ports,
			Refused:        refusals(p.Refused),
			SessionsActive: p.SessionsActive,
			SessionsOpened: p.SessionsOpened,
			DialFailures:   p.DialFailures,
			Stats:          admin.CountersOf(p, relayPeerByHand...),

			ControlRefusals: p.ControlRefusals,
		})
	}
	return r
}

// Sessions lists the relay's public sessions; their mapping is
// "peer/proto/port", and a peer's name selects all of its sessions.
func (s relaySource) Sessions(mapping string) []admin.Session {
	return adminSessions(s.n.relay.Sessions(), func(name string) bool {
		return mapping == "" || name == mapping || strings.HasPrefix(name, mapping+"/")
	})
}

func (s relaySource) Reload(context.Context) (admin.ReloadResult, error) {
	res, err := s.n.Reload()
	switch {
	case errors.Is(err, tunnel.ErrPeersHalfApplied): // something did change
		return admin.ReloadResult{}, err
	case err != nil:
		return admin.ReloadResult{}, admin.InvalidConfig(err)
	}
	return admin.ReloadResult{Added: res.Added, Changed: res.Changed, Removed: res.Removed, Restart: res.Restart}, nil
}
