// Package conf is natbox's configuration: the TOML schema users write, its
// defaults, and validation that reports every problem at once as
// FILE:LINE: key path: problem; fix. It is a leaf package: it knows nothing
// about packets, flows or WireGuard devices, only declarative, validated values.
package conf

import (
	"crypto/sha256"
	"net/netip"
	"time"
)

// Config is an appliance's natbox.toml after loading, defaults and validation.
type Config struct {
	Log Log  `toml:"log"`
	TUN *TUN `toml:"tun"` // nil: no gateway ingress
	// Uplinks are the relays this appliance registers its mappings with, one
	// [[uplink]] table each (a single [uplink] table is one); none: no relay
	// uplink. Each is independent: its own tunnel, stack and registration.
	Uplinks  []Uplink  `toml:"uplink,one_or_many"`
	Limits   Limits    `toml:"limits"`
	Admin    Admin     `toml:"admin"`
	Mappings []Mapping `toml:"mapping"`

	// Path is the file the config was loaded from ("" when built in code).
	Path string `toml:"-"`
	// Digest is the SHA-256 of the bytes the config was parsed from, so a
	// file watcher can tell an edit from what is already applied.
	Digest [sha256.Size]byte `toml:"-"`
}

// Log configures the logger.
type Log struct {
	Level       string `toml:"level"`       // debug | info | warn | error; default info
	Format      string `toml:"format"`      // console | json; default console
	Connections bool   `toml:"connections"` // one line per closed session, for audits and fail2ban
}

// TUN is the gateway ingress: a kernel TUN device whose packets feed the stack.
type TUN struct {
	Name      string         `toml:"name"`      // default "natbox0"
	MTU       int            `toml:"mtu"`       // default 1500
	Addresses []netip.Prefix `toml:"addresses"` // public-side addresses the stack answers on
	Routes    []netip.Prefix `toml:"routes"`    // kernel routes installed into the TUN, removed on exit
	// Queues is the number of TUN queues, each read by its own input pump
	// (IFF_MULTI_QUEUE); 0 means one per thread running Go code (Limits.Procs), at most 4.
	Queues int `toml:"queues"`
}

// Uplink is the appliance side of relay mode: an outbound WireGuard tunnel.
type Uplink struct {
	Relay          string     `toml:"relay"` // host:port of the relay's WireGuard listener
	RelayPublicKey Key        `toml:"relay_public_key"`
	PrivateKey     Key        `toml:"private_key"`      // inline, or
	PrivateKeyFile string     `toml:"private_key_file"` // read at load time
	Address        netip.Addr `toml:"address"`          // this appliance's tunnel address
	RelayAddress   netip.Addr `toml:"relay_address"`    // the relay's tunnel address; default: Address with last octet 1
	Keepalive      Duration   `toml:"keepalive"`        // default 25s
	MTU            int        `toml:"mtu"`              // tunnel MTU, default 1420
	// MaxMTU is the largest tunnel MTU a path probe may raise mtu to where
	// the path to the relay carries it (default DefaultMaxTunnelMTU; equal
	// to mtu: no probe). See tunnel/pathmtu.go.
	MaxMTU int `toml:"max_mtu"`
	// The TCP fallback (WireGuard inside TLS): relay_tcp is the relay's
	// tcp_listen as reachable from here, default the relay's host, port 443;
	// transport is "auto" (default: UDP, TCP when UDP gets no answer), "udp"
	// or "tcp".
	RelayTCP  string `toml:"relay_tcp"`
	Transport string `toml:"transport"`
	// LossFallback is, with transport "auto", the share of the relay's
	// messages lost over UDP (e.g. "0.01%") from which the uplink moves to
	// TCP for a while, or "off" (default DefaultLossFallback): on a lossy
	// path every loss halves the window of the TCP flows inside the tunnel,
	// while inside TLS over TCP the host's TCP repairs the losses beneath
	// them (README, "Slow through the relay"). LossFallbackRate is it as a
	// fraction, 0 for off.
	LossFallback     string  `toml:"loss_fallback"`
	LossFallbackRate float64 `toml:"-"`
	// TCPCongestion is the congestion control asked of the kernel for the
	// TCP transport's connection (DefaultTCPCongestion, another the kernel
	// offers, or "system" for its default); see TCPCongestionSystem.
	TCPCongestion string `toml:"tcp_congestion"`

	// Key is this table's key path in messages: "uplink" for a single
	// [uplink] table, "uplink[1]" for the second [[uplink]].
	Key string `toml:"-"`
	// Line is the line of the table's header in Config.Path (0 when built in code).
	Line int `toml:"-"`
}

// MaxUplinks bounds [[uplink]] tables: each is a WireGuard device, a
// netstack and a control connection, and more relays than this buys no
// reachability: scaling past one relay is DNS and more relays.
const MaxUplinks = 8

// Name is how status, metrics and logs label the uplink: its relay's
// host:port, unique among the uplinks of a valid config.
func (u *Uplink) Name() string { return u.Relay }

// Limits are the admission budgets shared by all mappings.
type Limits struct {
	DialTimeout          Duration `toml:"dial_timeout"`            // default 5s
	MaxInflight          int      `toml:"max_inflight"`            // connection attempts being dialed in total; default 1024
	MaxInflightPerSource int      `toml:"max_inflight_per_source"` // default 64
	MaxInflightPerTarget int      `toml:"max_inflight_per_target"` // default 256
	MaxSessions          int      `toml:"max_sessions"`            // all mappings together; default 100000
	ShutdownGrace        Duration `toml:"shutdown_grace"`          // drain time on stop; default 5s

	// TCP and UDP have separate session pools under max_sessions, so a UDP
	// flood (spoofable) cannot take the slots TCP needs. 0 or unset:
	// max_sessions for TCP, 40 % of it for UDP; unlimited when max_sessions
	// is 0. Use SessionPools.
	MaxTCPSessions int `toml:"max_tcp_sessions"`
	MaxUDPSessions int `toml:"max_udp_sessions"`
	// Per-source caps count one mapping's sessions of one protocol from one
	// source (an IPv4 address, an IPv6 /64); default 256, 0: unlimited.
	MaxTCPSessionsPerSource int `toml:"max_tcp_sessions_per_source"`
	MaxUDPSessionsPerSource int `toml:"max_udp_sessions_per_source"`
	// New sessions one source may open per second on one mapping (a token
	// bucket); default 100, 0: unlimited. Burst 0: twice the rate.
	NewSessionsPerSourcePerSecond int `toml:"new_sessions_per_source_per_second"`
	NewSessionsPerSourceBurst     int `toml:"new_sessions_per_source_burst"`
	// MaxTrackedSources bounds the rate buckets kept; past it the least
	// recently seen source's bucket is dropped. Default 65536.
	MaxTrackedSources int `toml:"max_tracked_sources"`

	// BufferMemory bounds the flow buffers that grow with traffic: the TCP
	// windows and send queues of the userspace stacks and the forwarder's
	// bulk copy buffers and queued datagrams (see BufferShares); past it
	// flows get smaller windows instead of more memory. Default 32 MiB,
	// 0: unbounded. MemoryLimit is the Go runtime's soft memory limit
	// (GC works harder near it); default 256 MiB, 0: none. The GOMEMLIMIT
	// environment variable, when set, wins.
	BufferMemory Size `toml:"buffer_memory"`
	MemoryLimit  Size `toml:"memory_limit"`
	// Procs is how many threads run natbox's Go code at once (the Go
	// runtime's GOMAXPROCS); 0: the default, two where the process may use
	// two CPUs and half of them on a larger host, or, in a process that
	// carries a relay tunnel, half, at least one (cmd/natbox/runtime.go
	// says why). The GOMAXPROCS environment variable, when set, wins.
	Procs int `toml:"procs"`
}

// Admin configures the local control API and the optional HTTP endpoint.
type Admin struct {
	Socket    string `toml:"socket"`     // unix socket; default /run/natbox/natbox.sock, the relay's /run/natbox/relay.sock
	Listen    string `toml:"listen"`     // optional HTTP host:port for /metrics, /healthz, /readyz, /status
	TokenFile string `toml:"token_file"` // bearer token, required when Listen is not loopback
	Watch     bool   `toml:"watch"`      // reload when the config file changes
}

// Ingress names where a mapping is served.
const (
	IngressTUN    = "tun"
	IngressUplink = "uplink"
)

// Mapping is one port-mapping rule.
type Mapping struct {
	Name            string         `toml:"name"`
	Protocol        Proto          `toml:"protocol"`
	Listen          Listen         `toml:"listen"`
	Target          Target         `toml:"target"`
	Allow           []netip.Prefix `toml:"allow"` // empty: anyone
	Deny            []netip.Prefix `toml:"deny"`  // checked before Allow
	MaxSessions     int            `toml:"max_sessions"`
	IdleTimeout     Duration       `toml:"idle_timeout"` // Load sets 2h for tcp, 2m for udp; stays 0 for tcp+udp unless set: use IdleTimeoutFor
	Enabled         *bool          `toml:"enabled"`      // nil means true; use IsEnabled
	Ingress         []string       `toml:"ingress"`      // "tun" and/or "uplink"; empty: every configured ingress
	ProxyProtocol   string         `toml:"proxy_protocol"`
	AcknowledgeRisk string         `toml:"acknowledge_risk"`

	// Per-source budgets for this mapping; 0 or unset: the [limits] value
	// (see Limits.SourceBudget).
	MaxTCPSessionsPerSource       int `toml:"max_tcp_sessions_per_source"`
	MaxUDPSessionsPerSource       int `toml:"max_udp_sessions_per_source"`
	NewSessionsPerSourcePerSecond int `toml:"new_sessions_per_source_per_second"`
	NewSessionsPerSourceBurst     int `toml:"new_sessions_per_source_burst"`

	// Documentation fields: kept and shown, never interpreted beyond dates.
	Description string    `toml:"description"`
	Owner       string    `toml:"owner"`
	Created     time.Time `toml:"created"`
	ReviewBy    time.Time `toml:"review_by"`
	Expires     time.Time `toml:"expires"` // zero: never; a date (2027-06-30) expires at the start of that day, local time

	// Line is the line of this mapping's [[mapping]] header in Config.Path (0 when built in code).
	Line int `toml:"-"`
}

// IsEnabled reports whether the mapping is enabled (the default).
func (m *Mapping) IsEnabled() bool { return m.Enabled == nil || *m.Enabled }

// RelayConfig is the relay's config file (natbox relay --config).
type RelayConfig struct {
	Log   Log          `toml:"log"`
	Relay RelaySection `toml:"relay"`
	Admin Admin        `toml:"admin"`
	Peers []Peer       `toml:"peer"`

	Path   string            `toml:"-"` // as Config.Path
	Digest [sha256.Size]byte `toml:"-"` // as Config.Digest
}

// RelaySection is the [relay] table.
type RelaySection struct {
	Listen         string       `toml:"listen"` // WireGuard UDP host:port; default 0.0.0.0:51820
	PrivateKey     Key          `toml:"private_key"`
	PrivateKeyFile string       `toml:"private_key_file"`
	Address        netip.Addr   `toml:"address"`     // the relay's tunnel address
	PublicBind     []netip.Addr `toml:"public_bind"` // where public listeners open; default 0.0.0.0 and ::
	MTU            int          `toml:"mtu"`         // default 1420; public UDP datagrams must fit it
	// MaxMTU is the largest tunnel packet the relay takes from and sends to
	// a peer whose path probe showed the path carries it (default
	// DefaultMaxTunnelMTU; equal to mtu: every peer stays at mtu).
	MaxMTU      int      `toml:"max_mtu"`
	DialTimeout Duration `toml:"dial_timeout"`
	MaxSessions int      `toml:"max_sessions"`
	// TCPListen turns the TCP transport on: WireGuard inside TLS for
	// appliances whose network blocks UDP, e.g. "0.0.0.0:443"; empty: off.
	TCPListen string `toml:"tcp_listen"`
	// TCPCongestion is as uplink.tcp_congestion, for the connections
	// tcp_listen accepts (the relay's half of each: what it sends).
	TCPCongestion string `toml:"tcp_congestion"`

	// Each peer's quotas, unless its [[peer]] sets its own (0: unlimited):
	// what one peer's ports may take of the relay. See RelayConfig.PeerLimits.
	PeerMaxSessions          int `toml:"peer_max_sessions"`            // TCP and UDP; default 10000
	PeerMaxUDPSessions       int `toml:"peer_max_udp_sessions"`        // default 4000
	PeerMaxInflight          int `toml:"peer_max_inflight"`            // public TCP connections being dialed into the tunnel; default 256
	PeerNewSessionsPerSecond int `toml:"peer_new_sessions_per_second"` // all sources together; default 1000
	PeerNewSessionsBurst     int `toml:"peer_new_sessions_burst"`      // 0: twice the rate
	// Public UDP sockets: one per held UDP port per public_bind address,
	// each with a reading goroutine and its buffers. A registration that
	// would pass either cap is refused for that spec.
	PeerMaxUDPSockets int `toml:"peer_max_udp_sockets"` // default 2048
	MaxUDPSockets     int `toml:"max_udp_sockets"`      // all peers together; default 8192
	// Per-source budgets on each held port (one source: an IPv4 address or
	// an IPv6 /64), as [limits] on an appliance.
	MaxSessionsPerSource          int `toml:"max_sessions_per_source"`            // per protocol; default 256
	NewSessionsPerSourcePerSecond int `toml:"new_sessions_per_source_per_second"` // default 100
	NewSessionsPerSourceBurst     int `toml:"new_sessions_per_source_burst"`      // 0: twice the rate

	// Memory bounds, as [limits] buffer_memory and memory_limit on an
	// appliance: the relay's flow buffers (its tunnel stack's TCP windows
	// and send queues, its forwarder's copy buffers and queued datagrams)
	// and its Go soft memory limit. Defaults 32 MiB and 192 MiB, for a
	// 512 MiB VPS; 0: unbounded, none. Procs as [limits] procs.
	BufferMemory Size `toml:"buffer_memory"`
	MemoryLimit  Size `toml:"memory_limit"`
	Procs        int  `toml:"procs"`
}

// Peer is one appliance allowed to use the relay.
type Peer struct {
	Name      string     `toml:"name"`
	PublicKey Key        `toml:"public_key"`
	Address   netip.Addr `toml:"address"`
	Ports     []PortSpec `toml:"ports"` // what this peer may hold, e.g. "tcp/443", "udp/10000-10100"

	// This peer's quotas and per-source budgets; 0 or unset: the [relay]
	// value of the same name (peer_max_sessions, ...).
	MaxSessions                   int `toml:"max_sessions"`
	MaxUDPSessions                int `toml:"max_udp_sessions"`
	MaxInflight                   int `toml:"max_inflight"`
	NewSessionsPerSecond          int `toml:"new_sessions_per_second"`
	NewSessionsBurst              int `toml:"new_sessions_burst"`
	MaxSessionsPerSource          int `toml:"max_sessions_per_source"`
	NewSessionsPerSourcePerSecond int `toml:"new_sessions_per_source_per_second"`
	NewSessionsPerSourceBurst     int `toml:"new_sessions_per_source_burst"`
	MaxUDPSockets                 int `toml:"max_udp_sockets"`

	Line int `toml:"-"`
}
