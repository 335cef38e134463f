package conf

// Defaults of the per-protocol and per-source session budgets.
const (
	DefaultSessionsPerSource = 256
	DefaultNewSessionsRate   = 100 // per source and second
	DefaultMaxTrackedSources = 65536

	// tcpShare is the part of max_sessions the TCP pool gets when
	// max_tcp_sessions is unset; UDP gets the rest, so by default the two
	// pools add up to max_sessions and neither protocol can refuse the other.
	tcpSharePercent = 60
)

// SessionPools returns the TCP and UDP session pools (0: unlimited): the
// configured ones, or the default shares of max_sessions for those unset.
func (l Limits) SessionPools() (tcp, udp int) {
	tcp, udp = l.MaxTCPSessions, l.MaxUDPSessions
	if l.MaxSessions > 0 {
		share := max(1, l.MaxSessions*tcpSharePercent/100)
		if tcp == 0 {
			tcp = share
		}
		if udp == 0 {
			udp = max(1, l.MaxSessions-share)
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
