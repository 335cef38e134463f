package tunnel

import (
	"fmt"

	"github.com/natbox/natbox/conf"
)

// Refusal reasons sent back to an appliance (and shown in its status).
const (
	reasonNotAllowed = "not in this peer's ports"
	reasonHeldBy     = "held by peer %q"
)

// allows reports whether every port of want (a single protocol) is covered
// by the allowances in specs.
func allows(specs []conf.PortSpec, want conf.PortSpec) bool {
	for p := int(want.Ports.Lo); p <= int(want.Ports.Hi); p++ {
		if !allowsPort(specs, portKey{want.Proto, uint16(p)}) {
			return false
		}
	}
	return true
}

func allowsPort(specs []conf.PortSpec, k portKey) bool {
	for _, s := range specs {
		if s.Proto.Has(k.proto) && s.Ports.Contains(k.port) {
			return true
		}
	}
	return false
}

// portKeys expands a single-protocol spec into its ports.
func portKeys(s conf.PortSpec) []portKey {
	keys := make([]portKey, 0, s.Ports.Size())
	for p := int(s.Ports.Lo); p <= int(s.Ports.Hi); p++ {
		keys = append(keys, portKey{s.Proto, uint16(p)})
	}
	return keys
}

// registry records which peer holds each (protocol, port) on the relay: a
// port belongs to one peer at a time. It is not safe for concurrent use; the
// Relay guards it with its mutex.
type registry struct {
	owner map[portKey]string // peer name
}

func newRegistry() *registry { return &registry{owner: make(map[portKey]string)} }

// check returns why peer cannot take every port of s given its allowances,
// or "" if it can (ports it already holds count as available).
func (g *registry) check(peer string, allowances []conf.PortSpec, s conf.PortSpec) string {
	if !allows(allowances, s) {
		return reasonNotAllowed
	}
	for _, k := range portKeys(s) {
		if o, ok := g.owner[k]; ok && o != peer {
			return fmt.Sprintf(reasonHeldBy, o)
		}
	}
	return ""
}

func (g *registry) take(peer string, k portKey) { g.owner[k] = peer }

// release frees k if peer holds it.
func (g *registry) release(peer string, k portKey) {
	if g.owner[k] == peer {
		delete(g.owner, k)
	}
}
