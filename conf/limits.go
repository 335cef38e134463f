package conf

// Defaults of the per-protocol and per-source session budgets.
const (
	DefaultSessionsPerSource = 256
	DefaultNewSessionsRate   = 100 // per source and second
	DefaultMaxTrackedSources = 65536

	// udpSharePercent is the part of max_sessions the UDP pool gets when
	// max_udp_sessions is unset: the rest stays for TCP whatever UDP does.
	udpSharePercent = 40
)

// SessionPools returns the TCP and UDP session pools (0: unlimited): the
// configured ones, or for those unset max_sessions (TCP) and 40 % of it
// (UDP). max_sessions caps the sum and is checked first, so a config
// written before the pools existed keeps its meaning for TCP, and TCP
// always has max_sessions - max_udp_sessions slots no UDP flood can take.
func (l Limits) SessionPools() (tcp, udp int) {
	tcp, udp = l.MaxTCPSessions, l.MaxUDPSessions
	if l.MaxSessions > 0 {
		if tcp == 0 {
			tcp = l.MaxSessions
		}
		if udp == 0 {
			udp = max(1, l.MaxSessions*udpSharePercent/100)
		}
	}
	return tcp, udp
}

// SourceBudget is what one source (an IPv4 address or an IPv6 /64) may open
// on one mapping. Zero fields are unlimited.
type SourceBudget struct {
	MaxTCPSessions int
	MaxUDPSessions int
	RatePerSecond  int // new sessions per second
	Burst          int // bucket size; at least 1 when RatePerSecond is set
}

// SourceBudget returns the per-source budget of m under l: the mapping's
// own keys where set, the [limits] values otherwise.
func (l Limits) SourceBudget(m *Mapping) SourceBudget {
	pick := func(own, global int) int {
		if own > 0 {
			return own
		}
		return global
	}
	b := SourceBudget{
		MaxTCPSessions: pick(m.MaxTCPSessionsPerSource, l.MaxTCPSessionsPerSource),
		MaxUDPSessions: pick(m.MaxUDPSessionsPerSource, l.MaxUDPSessionsPerSource),
		RatePerSecond:  pick(m.NewSessionsPerSourcePerSecond, l.NewSessionsPerSourcePerSecond),
	}
	if b.RatePerSecond > 0 {
		// A mapping that sets only its rate gets twice that rate as burst,
		// not the global burst sized for another rate.
		switch {
		case m.NewSessionsPerSourceBurst > 0:
			b.Burst = m.NewSessionsPerSourceBurst
		case m.NewSessionsPerSourcePerSecond == 0 && l.NewSessionsPerSourceBurst > 0:
			b.Burst = l.NewSessionsPerSourceBurst
		default:
			b.Burst = 2 * b.RatePerSecond
		}
	}
	return b
}

// Defaults of the memory bounds: a 1 GiB NAS runs the appliance, a 512 MiB
// VPS the relay, each beside other software.
const (
	DefaultBufferMemory      = 32 << 20
	DefaultMemoryLimit       = 256 << 20
	DefaultRelayBufferMemory = 32 << 20
	DefaultRelayMemoryLimit  = 192 << 20

	// minBufferMemory is the least budget allowed: below it a handful of
	// flows would already share out the 16 KiB floor per buffer.
	minBufferMemory = 1 << 20
)

// BufferShares splits a buffer_memory budget of total bytes between the
// forwarder (its bulk copy buffers and queued datagrams: a quarter) and
// each of stacks userspace TCP/IP stacks (the rest, in equal parts, for
// their connections' windows and send queues). total 0 is unbounded (all
// 0).
func BufferShares(total Size, stacks int) (forwarder, perStack int) {
	if total <= 0 {
		return 0, 0
	}
	forwarder = int(total) / 4
	return forwarder, (int(total) - forwarder) / max(stacks, 1)
}

// Runtime is what [limits] on an appliance and [relay] on a relay set for
// the whole process, applied at start (cmd/natbox/runtime.go).
type Runtime struct {
	BufferMemory, MemoryLimit Size
	Procs                     int
}

// Runtime returns the process-wide settings of [limits].
func (l Limits) Runtime() Runtime {
	return Runtime{BufferMemory: l.BufferMemory, MemoryLimit: l.MemoryLimit, Procs: l.Procs}
}

// Runtime returns the process-wide settings of [relay].
func (s RelaySection) Runtime() Runtime {
	return Runtime{BufferMemory: s.BufferMemory, MemoryLimit: s.MemoryLimit, Procs: s.Procs}
}

// validateRuntime checks a section's buffer_memory, memory_limit and procs.
func validateRuntime(r *report, section string, rt Runtime) {
	buffers, limit := rt.BufferMemory, rt.MemoryLimit
	if rt.Procs < 0 {
		r.errorf(section+".procs", "use a positive number of threads, or 0 for the default (half the CPUs; at least two on a gateway)", "%d is negative", rt.Procs)
	}
	if buffers > 0 && buffers < minBufferMemory {
		r.errorf(section+".buffer_memory", `use at least "1MiB", or "0" for unbounded`, "%s is below 1 MiB", buffers.String())
	}
	if limit > 0 && buffers > 0 && limit < 2*buffers {
		r.warnf(section+".memory_limit", "memory_limit %s is below twice buffer_memory %s: with full buffers the garbage collector would run almost without pause; raise it or lower buffer_memory",
			limit.String(), buffers.String())
	}
}

// String formats s as in a config file.
func (s Size) String() string { b, _ := s.MarshalText(); return string(b) }
