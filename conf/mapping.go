package conf

import (
	"maps"
	"slices"
	"time"
)

// Defaults for mapping idle timeouts, per protocol.
const (
	DefaultTCPIdleTimeout = 2 * time.Hour
	DefaultUDPIdleTimeout = 2 * time.Minute
)

// RiskyPorts are well-known ports of services that are dangerous to expose
// to everyone, with the service's name. A mapping that listens on one with
// an empty allow list gets a warning unless acknowledge_risk is set;
// natbox doctor reports the same list.
var RiskyPorts = map[uint16]string{
	21:    "ftp",
	23:    "telnet",
	445:   "smb",
	1900:  "ssdp/upnp",
	3306:  "mysql",
	3389:  "rdp",
	5432:  "postgresql",
	5900:  "vnc",
	6379:  "redis",
	27017: "mongodb",
}

// OpenToEveryone reports whether the mapping's allow list admits any
// source: empty, or containing a /0.
func (m *Mapping) OpenToEveryone() bool {
	for _, p := range m.Allow {
		if p.Bits() == 0 {
			return true
		}
	}
	return len(m.Allow) == 0
}

// RiskyExposure lists, by port, the RiskyPorts the mapping opens to
// everyone on a listen or target port, unless acknowledge_risk is set. It is
// the one definition behind natbox check's warning, natbox doctor and the
// status page.
func (m *Mapping) RiskyExposure() []uint16 {
	if m.AcknowledgeRisk != "" || !m.OpenToEveryone() {
		return nil
	}
	var ports []uint16
	for _, port := range slices.Sorted(maps.Keys(RiskyPorts)) {
		if m.Listen.Ports.Contains(port) || m.Target.Ports.Contains(port) {
			ports = append(ports, port)
		}
	}
	return ports
}

// IdleTimeoutFor returns the mapping's idle timeout for protocol p: the
// configured value, or the default for p (2h for TCP, 2m for UDP). A
// tcp+udp mapping without idle_timeout has a different default per protocol,
// which is why callers ask per protocol instead of reading IdleTimeout.
func (m *Mapping) IdleTimeoutFor(p Proto) time.Duration {
	if m.IdleTimeout > 0 {
		return m.IdleTimeout.D()
	}
	if p == UDP {
		return DefaultUDPIdleTimeout
	}
	return DefaultTCPIdleTimeout
}

// ServesIngress reports whether the mapping accepts flows from the named
// ingress (IngressTUN or IngressUplink): the ingress must be configured in
// cfg and listed in the mapping's ingress (an empty list means every one).
func (m *Mapping) ServesIngress(name string, cfg *Config) bool {
	if !cfg.HasIngress(name) {
		return false
	}
	return len(m.Ingress) == 0 || slices.Contains(m.Ingress, name)
}

// ActiveAt reports whether natbox serves the mapping at now: it is enabled
// and has not expired.
func (m *Mapping) ActiveAt(now time.Time) bool {
	return m.IsEnabled() && (m.Expires.IsZero() || now.Before(m.Expires))
}

// HasIngress reports whether the named ingress is configured.
func (c *Config) HasIngress(name string) bool {
	switch name {
	case IngressTUN:
		return c.TUN != nil
	case IngressUplink:
		return len(c.Uplinks) > 0
	}
	return false
}

// Ingresses returns the names of the configured ingresses.
func (c *Config) Ingresses() []string {
	var names []string
	for _, n := range []string{IngressTUN, IngressUplink} {
		if c.HasIngress(n) {
			names = append(names, n)
		}
	}
	return names
}

// EnabledMappings returns the mappings natbox serves at now: enabled and not
// expired.
func (c *Config) EnabledMappings(now time.Time) []Mapping {
	var ms []Mapping
	for i := range c.Mappings {
		if c.Mappings[i].ActiveAt(now) {
			ms = append(ms, c.Mappings[i])
		}
	}
	return ms
}
