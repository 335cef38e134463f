package conf

import (
	"net/netip"
	"time"
)

// Proto is a mapping's protocol set. TCP and UDP are bits; TCPUDP is both.
type Proto uint8

const (
	TCP    Proto = 1 << 0
	UDP    Proto = 1 << 1
	TCPUDP       = TCP | UDP
)

// Has reports whether p includes every protocol in q.
func (p Proto) Has(q Proto) bool { return q != 0 && p&q == q }

// PortRange is an inclusive range of ports; a single port has Lo == Hi.
type PortRange struct{ Lo, Hi uint16 }

// Size is the number of ports in r.
func (r PortRange) Size() int { return int(r.Hi) - int(r.Lo) + 1 }

// Contains reports whether port p lies in r.
func (r PortRange) Contains(p uint16) bool { return p >= r.Lo && p <= r.Hi }

// Overlaps reports whether r and o share a port.
func (r PortRange) Overlaps(o PortRange) bool { return r.Lo <= o.Hi && o.Lo <= r.Hi }

// Intersect returns the ports r and o share; only meaningful when they
// overlap.
func (r PortRange) Intersect(o PortRange) PortRange {
	return PortRange{max(r.Lo, o.Lo), min(r.Hi, o.Hi)}
}

// Listen is where a mapping accepts flows: an optional public address (the
// zero Addr means every address of the ingress) and a port range.
type Listen struct {
	Addr  netip.Addr
	Ports PortRange
}

// Target is where a mapping's flows go: a host (an IP literal or a DNS name
// resolved at dial time) and a port range. A target range of size 1 under a
// larger Listen range is a start port: listen port Lo+i maps to target Lo+i.
type Target struct {
	Host  string
	Ports PortRange
}

// Port returns the target port for a listen port under a 1:1 range mapping.
func (t Target) Port(l Listen, listenPort uint16) uint16 {
	return t.Ports.Lo + (listenPort - l.Ports.Lo)
}

// PortSpec is a protocol and port range, written "tcp/443" or "udp/10000-10100".
type PortSpec struct {
	Proto Proto
	Ports PortRange
}

// Key is a WireGuard key (Curve25519), written in standard base64 as by wg genkey.
type Key [32]byte

// IsZero reports whether k is unset.
func (k Key) IsZero() bool { return k == Key{} }

// Duration is a time.Duration written as a Go duration string ("5s", "2h").
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }
