package conf

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Defaults not tied to one table.
const (
	DefaultAdminSocket = "/run/natbox/natbox.sock"
	DefaultTUNName     = "natbox0"
	DefaultTUNMTU      = 1500
	DefaultTunnelMTU   = 1420
	DefaultKeepalive   = 25 * time.Second
	DefaultDialTimeout = 5 * time.Second
	DefaultMaxSessions = 100000

	// expirySoon is how far ahead an expiry date draws a warning.
	expirySoon = 30 * 24 * time.Hour
)

func defaultLog() Log     { return Log{Level: "info", Format: "console"} }
func defaultAdmin() Admin { return Admin{Socket: DefaultAdminSocket} }

func defaultLimits() Limits {
	return Limits{
		DialTimeout:          Duration(DefaultDialTimeout),
		MaxInflight:          1024,
		MaxInflightPerSource: 64,
		MaxInflightPerTarget: 256,
		MaxSessions:          DefaultMaxSessions,
		ShutdownGrace:        Duration(5 * time.Second),

		MaxTCPSessionsPerSource:       DefaultSessionsPerSource,
		MaxUDPSessionsPerSource:       DefaultSessionsPerSource,
		NewSessionsPerSourcePerSecond: DefaultNewSessionsRate,
		MaxTrackedSources:             DefaultMaxTrackedSources,
		BufferMemory:                  DefaultBufferMemory,
		MemoryLimit:                   DefaultMemoryLimit,
	}
}

// applyDefaults fills what the tables that exist left unset. Top-level
// tables were filled before decoding, so an explicit value (even 0) stays.
func (c *Config) applyDefaults() {
	// Written out so that status and check show the pools in force.
	c.Limits.MaxTCPSessions, c.Limits.MaxUDPSessions = c.Limits.SessionPools()
	if t := c.TUN; t != nil {
		if t.Name == "" {
			t.Name = DefaultTUNName
		}
		if t.MTU == 0 {
			t.MTU = DefaultTUNMTU
		}
	}
	for i := range c.Uplinks {
		u := &c.Uplinks[i]
		if u.Keepalive == 0 {
			u.Keepalive = Duration(DefaultKeepalive)
		}
		if u.MTU == 0 {
			u.MTU = DefaultTunnelMTU
		}
		if u.MaxMTU == 0 {
			u.MaxMTU = max(DefaultMaxTunnelMTU, u.MTU)
		}
		if !u.RelayAddress.IsValid() && u.Address.IsValid() {
			u.RelayAddress = hostOne(u.Address)
		}
		if u.Transport == "" {
			u.Transport = TransportAuto
		}
		if u.LossFallback == "" {
			u.LossFallback = DefaultLossFallback
		}
		if u.TCPCongestion == "" {
			u.TCPCongestion = DefaultTCPCongestion
		}
		if host, _, err := net.SplitHostPort(u.Relay); u.RelayTCP == "" && err == nil && host != "" {
			u.RelayTCP = net.JoinHostPort(host, DefaultRelayTCPPort)
		}
	}
	for i := range c.Mappings {
		m := &c.Mappings[i]
		if m.IdleTimeout == 0 && (m.Protocol == TCP || m.Protocol == UDP) {
			m.IdleTimeout = Duration(m.IdleTimeoutFor(m.Protocol))
		}
	}
}

// hostOne returns a with its last byte set to 1: 10.77.0.2 -> 10.77.0.1.
func hostOne(a netip.Addr) netip.Addr {
	b := a.AsSlice()
	b[len(b)-1] = 1
	out, _ := netip.AddrFromSlice(b)
	return out
}

func (c *Config) validate(r *report, now time.Time) {
	validateLog(r, c.Log)
	if c.TUN == nil && len(c.Uplinks) == 0 {
		r.errorf("", "add a [tun] table (gateway mode), an [uplink] table (relay mode), or both",
			"no ingress is configured")
	}
	if c.TUN != nil {
		c.TUN.validate(r)
	}
	c.validateUplinks(r)
	c.Limits.validate(r)
	validateAdmin(r, c.Admin)
	names := make(map[string]int)
	for i := range c.Mappings {
		c.validateMapping(r, i, names, now)
	}
	c.checkOverlaps(r, now)
}

func validateLog(r *report, l Log) {
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, l.Level) {
		r.errorf("log.level", `use "debug", "info", "warn" or "error"`, "unknown level %q", l.Level)
	}
	if l.Format != "console" && l.Format != "json" {
		r.errorf("log.format", `use "console" or "json"`, "unknown format %q", l.Format)
	}
}

// MTU bounds, the one source of them: netstack refuses a link outside
// MinMTU-MaxMTU (internal/app tests that the two agree). Every natbox stack
// carries IPv6, whose minimum link MTU is 1280. A tunnel packet must fit one
// WireGuard message (32 bytes of header) in the largest UDP datagram IPv4
// carries (65507 bytes).
const (
	MinMTU       = 1280
	MaxMTU       = 65535
	MaxTunnelMTU = 65507 - 32
	// DefaultMaxTunnelMTU is how far a path probe may raise a tunnel's MTU
	// by default: where the path carries it (a LAN's jumbo frames, relay
	// and appliance on one host), fewer, larger packets halve the tunnel's
	// CPU per byte; beyond it the relay benchmarks gained nothing and a
	// lost datagram costs more (tunnel/BENCH.md).
	DefaultMaxTunnelMTU = 32000
	// MaxTUNQueues is netstack.MaxTUNQueues (internal/app tests that the
	// two agree).
	MaxTUNQueues = 64
)

// validateMTU checks a TUN's mtu (tunnel false) or a WireGuard tunnel's.
func validateMTU(r *report, path string, mtu int, tunnel bool) {
	hi, usual := MaxMTU, "1500 for Ethernet"
	if tunnel {
		hi, usual = MaxTunnelMTU, fmt.Sprintf("%d is WireGuard's usual", DefaultTunnelMTU)
	}
	if mtu < MinMTU || mtu > hi {
		r.errorf(path, fmt.Sprintf("use %d-%d (%s)", MinMTU, hi, usual), "mtu %d is out of range", mtu)
	}
}

// validateMaxMTU checks a tunnel's mtu and max_mtu under the table at path.
func validateMaxMTU(r *report, path string, mtu, maxMTU int) {
	validateMTU(r, path+".mtu", mtu, true)
	if mtu < MinMTU || mtu > MaxTunnelMTU {
		return // said above; max_mtu's range depends on it
	}
	if maxMTU < mtu || maxMTU > MaxTunnelMTU {
		r.errorf(path+".max_mtu", fmt.Sprintf("use %d-%d; max_mtu = mtu turns the path probe off", mtu, MaxTunnelMTU),
			"max_mtu %d is out of range", maxMTU)
	}
}

// tunnelAddr checks one side's tunnel address and stores it unmapped
// (::ffff:10.77.0.2 is 10.77.0.2). Only IPv4 is accepted: each side's IPv6
// tunnel address is derived from its IPv4 one.
func tunnelAddr(r *report, path string, a *netip.Addr) bool {
	if !a.Unmap().Is4() {
		r.errorf(path, "use an IPv4 address such as 10.77.0.2; natbox derives the IPv6 tunnel address from it",
			"address %s is IPv6; tunnel addresses are IPv4", *a)
		return false
	}
	*a = a.Unmap()
	return true
}

func (t *TUN) validate(r *report) {
	if t.Name == "" || len(t.Name) > 15 || strings.ContainsAny(t.Name, "/ \t") {
		r.errorf("tun.name", "use 1-15 characters without spaces or slashes, e.g. \"natbox0\"", "%q is not a valid interface name", t.Name)
	}
	validateMTU(r, "tun.mtu", t.MTU, false)
	if t.Queues < 0 || t.Queues > MaxTUNQueues {
		r.errorf("tun.queues", fmt.Sprintf("use 1-%d, or 0 for one per procs (at most 4)", MaxTUNQueues), "%d queues is out of range", t.Queues)
	}
	if len(t.Addresses) == 0 {
		r.errorf("tun.addresses", `list the public addresses natbox answers on, e.g. addresses = ["203.0.113.10/32"]`,
			"no addresses")
	}
	for i, p := range t.Routes {
		checkMasked(r, fmt.Sprintf("tun.routes[%d]", i), p)
	}
}

// checkMasked rejects a prefix with host bits set: "10.0.0.1/8" means
// something other than what it says.
func checkMasked(r *report, path string, p netip.Prefix) {
	if m := p.Masked(); m != p {
		r.errorf(path, fmt.Sprintf("write %q", m), "%q has host bits set", p)
	}
}

// validateUplinks checks each uplink, then that they can work side by
// side: every relay at most once, and at most MaxUplinks of them.
func (c *Config) validateUplinks(r *report) {
	if n := len(c.Uplinks); n > MaxUplinks {
		r.errorf(c.Uplinks[MaxUplinks].key(MaxUplinks), fmt.Sprintf("remove %d of them; more relays are more DNS records, not more uplinks per appliance", n-MaxUplinks),
			"%d [[uplink]] tables; at most %d are allowed", n, MaxUplinks)
	}
	relays := make(map[string]int) // normalized host:port -> index
	keys := make(map[Key]int)      // relay public key -> index
	for i := range c.Uplinks {
		u := &c.Uplinks[i]
		u.validate(r, u.key(i), filepath.Dir(c.Path))
		if u.Relay != "" {
			if j, dup := relays[normalizeHostPort(u.Relay)]; dup {
				r.errorf(u.key(i)+".relay", "remove one of the two tables; each [[uplink]] is a different relay",
					"relay %q is already %s", u.Relay, c.uplinkLabel(j))
			} else {
				relays[normalizeHostPort(u.Relay)] = i
			}
		}
		if !u.RelayPublicKey.IsZero() {
			// One relay under two names: as one peer it would see two
			// endpoints take turns, as two peers the second's ports are
			// refused (the first holds them).
			if j, dup := keys[u.RelayPublicKey]; dup {
				r.errorf(u.key(i)+".relay_public_key", "each relay has its own key; remove the table that names the same relay twice",
					"relay_public_key is the same as %s's: that is one relay twice", c.uplinkLabel(j))
			} else {
				keys[u.RelayPublicKey] = i
			}
		}
	}
}

// key returns the uplink's key path, for an uplink built in code too.
func (u *Uplink) key(i int) string {
	switch {
	case u.Key != "":
		return u.Key
	case i == 0:
		return "uplink"
	}
	return fmt.Sprintf("uplink[%d]", i)
}

// uplinkLabel names uplink i in messages: uplink[0] (line 3).
func (c *Config) uplinkLabel(i int) string {
	s := c.Uplinks[i].key(i)
	if n := c.Uplinks[i].Line; n > 0 {
		s += fmt.Sprintf(" (line %d)", n)
	}
	return s
}

// normalizeHostPort lowercases the host, so that Relay.Example.net:51820
// and relay.example.net:51820 are one relay.
func normalizeHostPort(s string) string {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return s
	}
	if a, err := netip.ParseAddr(host); err == nil {
		host = a.Unmap().String()
	}
	return net.JoinHostPort(strings.ToLower(host), port)
}

// validate checks one uplink; p is its key path ("uplink", "uplink[1]").
func (u *Uplink) validate(r *report, p, dir string) {
	if u.Relay == "" {
		r.errorf(p+".relay", `set the relay's WireGuard host:port, e.g. relay = "relay.example.net:51820"`, "relay is required")
	} else if err := checkHostPort(u.Relay, false); err != nil {
		r.valueError(p+".relay", err, "")
	}
	if u.RelayPublicKey.IsZero() {
		r.errorf(p+".relay_public_key", "copy the relay's public key (natbox relay prints it; or wg pubkey < relay.key)", "relay_public_key is required")
	}
	loadPrivateKey(r, p, &u.PrivateKey, u.PrivateKeyFile, dir)
	if !u.Address.IsValid() {
		r.errorf(p+".address", `set the tunnel address the relay assigned to this appliance, e.g. address = "10.77.0.2"`, "address is required")
	} else if tunnelAddr(r, p+".address", &u.Address) && tunnelAddr(r, p+".relay_address", &u.RelayAddress) &&
		u.RelayAddress == u.Address {
		r.errorf(p+".relay_address", "set relay_address to the relay's tunnel address", "relay_address %s is this appliance's own address", u.RelayAddress)
	}
	validateMaxMTU(r, p, u.MTU, u.MaxMTU)
	switch u.Transport {
	case TransportAuto, TransportUDP, TransportTCP:
	default:
		r.errorf(p+".transport", `use "auto" (UDP, TCP when UDP is blocked), "udp" or "tcp"`, "unknown transport %q", u.Transport)
	}
	if u.RelayTCP != "" {
		if err := checkHostPort(u.RelayTCP, false); err != nil {
			r.valueError(p+".relay_tcp", err, "")
		}
	}
	if rate, ok := parseLossShare(u.LossFallback); ok {
		u.LossFallbackRate = rate
	} else {
		r.errorf(p+".loss_fallback", `write a share of messages lost above 0 and below 100 %, e.g. "0.01%", or "off"`,
			"loss_fallback %q is not a share of messages", u.LossFallback)
	}
	validateCongestion(r, p+".tcp_congestion", u.TCPCongestion)
}

// validateCongestion checks a tcp_congestion value's form; whether the
// kernel offers and allows it is known only when a connection asks, so a
// refused one leaves the kernel's default and status says which runs.
func validateCongestion(r *report, key, name string) {
	if name == TCPCongestionSystem {
		return
	}
	ok := name != "" && len(name) < 16 // the kernel's TCP_CA_NAME_MAX, with its NUL
	for _, c := range name {
		ok = ok && (c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_')
	}
	if !ok {
		r.errorf(key, `name a congestion control the kernel offers (net.ipv4.tcp_available_congestion_control), e.g. "bbr" or "cubic", or "system"`,
			"%q is not a congestion control name", name)
	}
}

// parseLossShare reads uplink.loss_fallback: "off" (0), or a per cent
// share above 0 and below 100 ("0.01%", "0.5 %") as a fraction.
func parseLossShare(s string) (float64, bool) {
	if s == "off" {
		return 0, true
	}
	num, ok := strings.CutSuffix(strings.TrimSpace(s), "%")
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if err != nil || !(v > 0 && v < 100) {
		return 0, false
	}
	return v / 100, true
}

// Transports of uplink.transport.
const (
	TransportAuto = "auto"
	TransportUDP  = "udp"
	TransportTCP  = "tcp"
	// DefaultRelayTCPPort is uplink.relay_tcp's port when only relay is set.
	DefaultRelayTCPPort = "443"
	// DefaultLossFallback is uplink.loss_fallback's default, one message in
	// 50 000: at 20 ms to the relay, one frame in 10 000 lost held a relayed
	// TCP flow to about 0.1 Gbit/s over UDP and 0.5 over TCP/443, and the
	// threshold sits well below that so such a path is caught in every
	// window (tunnel/BENCH.md, "A lossy line").
	DefaultLossFallback     = "0.002%"
	DefaultLossFallbackRate = 0.00002 // DefaultLossFallback as a fraction
	// DefaultTCPCongestion is tcp_congestion's default for the TCP
	// transport, on both ends: BBR keeps its pace through random loss, which
	// halves cubic's and reno's window each time; on a 20 ms line losing one
	// frame in 10 000 a relayed flow moved 0.4-0.6 Gbit/s over TCP/443 with
	// it and 0.05-0.15 with cubic, and over UDP 0.1 (tunnel/BENCH.md, "The
	// host's congestion control"). The transport carries one connection,
	// the user's own tunnel, which is where BBR's appetite is acceptable.
	DefaultTCPCongestion = "bbr"
	// TCPCongestionSystem leaves the kernel's default
	// (net.ipv4.tcp_congestion_control).
	TCPCongestionSystem = "system"
)

// checkHostPort validates "host:port"; an empty host is allowed only when
// emptyHost is set (listen on every address).
func checkHostPort(s string, emptyHost bool) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil || (host == "" && !emptyHost) {
		return valueErr(`write host:port, e.g. "relay.example.net:51820" or "[2001:db8::1]:51820"`, "%q is not host:port", s)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return valueErr("use 1-65535", "port %q is out of range", port)
	}
	return nil
}

// loadPrivateKey enforces exactly one of private_key and private_key_file
// in table and reads the file into key. Relative files are relative to the
// config file's directory.
func loadPrivateKey(r *report, table string, key *Key, file, dir string) {
	switch {
	case !key.IsZero() && file != "":
		r.errorf(table+".private_key_file", "remove private_key or private_key_file", "both private_key and private_key_file are set")
		return
	case key.IsZero() && file == "":
		r.errorf(table+".private_key", "set private_key_file (create it with: umask 077; wg genkey > FILE) or private_key", "a private key is required")
		return
	case file == "":
		return
	}
	path := table + ".private_key_file"
	if !filepath.IsAbs(file) {
		file = filepath.Join(dir, file)
	}
	data, err := os.ReadFile(file)
	switch {
	case os.IsNotExist(err):
		r.errorf(path, "create it with: umask 077; wg genkey > "+file, "key file %q does not exist", file)
		return
	case err != nil:
		r.errorf(path, "make it readable by natbox's user", "cannot read key file %q: %v", file, err)
		return
	}
	k, err := ParseKey(string(data))
	if err != nil {
		r.errorf(path, "it must hold one base64 key as printed by wg genkey", "key file %q does not hold a valid key", file)
		return
	}
	*key = k
	if fi, err := os.Stat(file); err == nil && fi.Mode().Perm()&0o004 != 0 {
		r.warnf(path, "key file %q is readable by every user; chmod 600 it", file)
	}
}

func (l *Limits) validate(r *report) {
	for _, f := range []struct {
		key string
		n   int
	}{
		{"max_inflight", l.MaxInflight},
		{"max_inflight_per_source", l.MaxInflightPerSource},
		{"max_inflight_per_target", l.MaxInflightPerTarget},
	} {
		if f.n < 1 {
			r.errorf("limits."+f.key, "use a positive number", "%d is not positive", f.n)
		}
	}
	for _, f := range []struct {
		key, fix string
		n        int
	}{
		{"max_sessions", "use 0 for unlimited or a positive number", l.MaxSessions},
		{"max_tcp_sessions", "use a positive number, or 0 for max_sessions", l.MaxTCPSessions},
		{"max_udp_sessions", "use a positive number, or 0 for 40 % of max_sessions", l.MaxUDPSessions},
		{"max_tcp_sessions_per_source", "use 0 for unlimited or a positive number (default 256)", l.MaxTCPSessionsPerSource},
		{"max_udp_sessions_per_source", "use 0 for unlimited or a positive number (default 256)", l.MaxUDPSessionsPerSource},
		{"new_sessions_per_source_per_second", "use 0 for unlimited or a positive number (default 100)", l.NewSessionsPerSourcePerSecond},
		{"new_sessions_per_source_burst", "use a positive number, or 0 for twice the rate", l.NewSessionsPerSourceBurst},
	} {
		if f.n < 0 {
			r.errorf("limits."+f.key, f.fix, "%d is negative", f.n)
		}
	}
	validateRuntime(r, "limits", l.Runtime())
	if l.MaxTrackedSources < 1 {
		r.errorf("limits.max_tracked_sources", "use a positive number (default 65536)", "%d is not positive", l.MaxTrackedSources)
	}
	if l.NewSessionsPerSourceBurst > 0 && l.NewSessionsPerSourceBurst < l.NewSessionsPerSourcePerSecond {
		r.warnf("limits.new_sessions_per_source_burst", "burst %d is below the rate %d; a source can then never open its rate within one second's bucket",
			l.NewSessionsPerSourceBurst, l.NewSessionsPerSourcePerSecond)
	}
	// max_sessions is checked before the pools: TCP keeps only what the
	// UDP pool leaves of it.
	if l.MaxSessions > 0 && l.MaxUDPSessions >= l.MaxSessions {
		r.warnf("limits.max_udp_sessions", "max_udp_sessions %d leaves TCP no slot of max_sessions %d that a UDP flood cannot take; lower it (default 40 %% of max_sessions) or raise max_sessions",
			l.MaxUDPSessions, l.MaxSessions)
	}
}

func validateAdmin(r *report, a Admin) {
	if a.Socket == "" {
		r.errorf("admin.socket", "set a path, e.g. "+DefaultAdminSocket, "socket is empty")
	}
	if a.Listen == "" {
		return
	}
	if err := checkHostPort(a.Listen, false); err != nil {
		r.valueError("admin.listen", err, "")
		return
	}
	host, _, _ := net.SplitHostPort(a.Listen)
	if ip, err := netip.ParseAddr(host); (err != nil || !ip.IsLoopback()) && host != "localhost" && a.TokenFile == "" {
		r.errorf("admin.token_file", "set token_file to a file holding a bearer token, or listen on 127.0.0.1", "admin.listen %q is not loopback and has no token", a.Listen)
	}
}

var validName = regexp.MustCompile(`^[a-z0-9._-]{1,64}$`)

// validateName checks a mapping or peer name; names maps names to the index
// that first used them.
func validateName(r *report, path, name string, i int, names map[string]int, kind string, line func(int) int) {
	switch {
	case name == "":
		r.errorf(path+".name", `add name = "web" (lowercase letters, digits, ".", "_", "-")`, "name is required")
	case !validName.MatchString(name):
		r.errorf(path+".name", `use 1-64 lowercase letters, digits, ".", "_" or "-"`, "name %q has characters that are not allowed", name)
	default:
		if j, dup := names[name]; dup {
			r.errorf(path+".name", fmt.Sprintf("give each %s its own name", kind), "name %q is already used by %s[%d] (line %d)", name, kind, j, line(j))
			return
		}
		names[name] = i
	}
}

func (c *Config) validateMapping(r *report, i int, names map[string]int, now time.Time) {
	m := &c.Mappings[i]
	p := fmt.Sprintf("mapping[%d]", i)
	validateName(r, p, m.Name, i, names, "mapping", func(j int) int { return c.Mappings[j].Line })
	if m.Protocol == 0 {
		r.errorf(p+".protocol", `add protocol = "tcp", "udp" or "tcp+udp"`, "protocol is required")
	}
	listenOK := m.Listen.Ports.Lo != 0
	if !listenOK {
		r.errorf(p+".listen", `add listen = "443" (or "10000-10100", or "203.0.113.10:443")`, "listen is required")
	}
	if m.Target.Host == "" {
		r.errorf(p+".target", `add target = "10.0.0.5:443"`, "target is required")
	} else if listenOK {
		checkTargetRange(r, p+".target", m.Listen, m.Target)
	}
	if listenOK && m.Listen.Addr.IsValid() && !m.Listen.Addr.IsUnspecified() {
		c.checkListenAddr(r, p+".listen", m)
	}
	for j, a := range m.Allow {
		checkMasked(r, fmt.Sprintf("%s.allow[%d]", p, j), a)
	}
	for j, d := range m.Deny {
		checkMasked(r, fmt.Sprintf("%s.deny[%d]", p, j), d)
	}
	if m.MaxSessions < 0 {
		r.errorf(p+".max_sessions", "use 0 for unlimited or a positive number", "%d is negative", m.MaxSessions)
	}
	validateMappingBudget(r, p, m)
	for j, in := range m.Ingress {
		path := fmt.Sprintf("%s.ingress[%d]", p, j)
		switch {
		case in != IngressTUN && in != IngressUplink:
			r.errorf(path, `use "tun" and/or "uplink"`, "unknown ingress %q", in)
		case !c.HasIngress(in):
			r.errorf(path, fmt.Sprintf("add a [%s] table or remove %q from ingress", in, in), "ingress %q is not configured", in)
		}
	}
	switch m.ProxyProtocol {
	case "", "v2":
	case "v1":
		if m.Protocol.Has(UDP) {
			r.errorf(p+".proxy_protocol", `use "v2" (v1 carries TCP only)`, "proxy_protocol v1 cannot carry %s", m.Protocol)
		}
	default:
		r.errorf(p+".proxy_protocol", `use "v1", "v2" or leave it out`, "unknown proxy_protocol %q", m.ProxyProtocol)
	}
	if !m.Created.IsZero() {
		for _, d := range []struct {
			key string
			t   time.Time
		}{{"review_by", m.ReviewBy}, {"expires", m.Expires}} {
			if !d.t.IsZero() && d.t.Before(m.Created) {
				r.errorf(p+"."+d.key, "correct one of the two dates", "%s %s is before created %s", d.key, day(d.t), day(m.Created))
			}
		}
	}
	c.warnMapping(r, p, m, now)
}

// validateMappingBudget checks a mapping's per-source overrides.
func validateMappingBudget(r *report, p string, m *Mapping) {
	for _, f := range []struct {
		key   string
		n     int
		proto Proto // the protocol the key applies to; 0: both
	}{
		{"max_tcp_sessions_per_source", m.MaxTCPSessionsPerSource, TCP},
		{"max_udp_sessions_per_source", m.MaxUDPSessionsPerSource, UDP},
		{"new_sessions_per_source_per_second", m.NewSessionsPerSourcePerSecond, 0},
		{"new_sessions_per_source_burst", m.NewSessionsPerSourceBurst, 0},
	} {
		switch {
		case f.n < 0:
			r.errorf(p+"."+f.key, "use a positive number, or leave it out to use the [limits] value", "%d is negative", f.n)
		case f.n > 0 && f.proto != 0 && m.Protocol != 0 && !m.Protocol.Has(f.proto):
			r.warnf(p+"."+f.key, "has no effect: the mapping carries %s only; remove it", m.Protocol)
		}
	}
}

// checkTargetRange checks that target is a single start port, or a range as
// large as listen's, and that the mapped ports stay within 1-65535.
func checkTargetRange(r *report, path string, l Listen, t Target) {
	ls, ts := l.Ports.Size(), t.Ports.Size()
	switch {
	case ts != 1 && ts != ls:
		r.errorf(path, fmt.Sprintf("use a range of %d ports, e.g. \"%s:%d-%d\", or a single start port", ls, t.Host, t.Ports.Lo, int(t.Ports.Lo)+ls-1),
			"target range %s has %d ports but listen %s has %d", t.Ports, ts, l.Ports, ls)
	case ts == 1 && int(t.Ports.Lo)+ls-1 > 65535:
		r.errorf(path, fmt.Sprintf("use a start port of at most %d", 65535-ls+1), "target ports from %d for %d listen ports run past 65535", t.Ports.Lo, ls)
	}
}

// checkListenAddr checks that a mapping's listen address is one the
// ingresses it serves receive flows for.
func (c *Config) checkListenAddr(r *report, path string, m *Mapping) {
	a := m.Listen.Addr
	servesTUN := m.ServesIngress(IngressTUN, c)
	if servesTUN && slices.ContainsFunc(c.TUN.Addresses, func(p netip.Prefix) bool { return p.Addr().Unmap() == a }) {
		return
	}
	if m.ServesIngress(IngressUplink, c) && slices.ContainsFunc(c.Uplinks, func(u Uplink) bool { return u.Address == a }) {
		return
	}
	if servesTUN {
		r.errorf(path, fmt.Sprintf("add %s to tun.addresses or listen on one of them", netip.PrefixFrom(a, a.BitLen())),
			"listen address %s is not one of tun.addresses", a)
		return
	}
	r.warnf(path, "listen address %s is not on tun (no tun ingress serves this mapping), so it will only match flows sent to that exact address", a)
}

func (c *Config) warnMapping(r *report, p string, m *Mapping, now time.Time) {
	if m.Owner == "" {
		r.warnf(p, "no owner; set owner so someone answers for this open port")
	}
	if !m.IsEnabled() {
		return
	}
	if !m.ReviewBy.IsZero() && m.ReviewBy.Before(now) {
		r.warnf(p+".review_by", "review was due on %s; review the mapping and move review_by", day(m.ReviewBy))
	}
	switch {
	case m.Expires.IsZero():
	case !now.Before(m.Expires):
		r.warnf(p+".expires", "expired on %s, natbox will not serve it", day(m.Expires))
	case m.Expires.Sub(now) <= expirySoon:
		r.warnf(p+".expires", "expires on %s, in %d days", day(m.Expires), int(m.Expires.Sub(now).Hours()/24))
	}
	if ports := m.RiskyExposure(); len(ports) > 0 {
		risky := make([]string, len(ports))
		for i, port := range ports {
			risky[i] = fmt.Sprintf("%d (%s)", port, RiskyPorts[port])
		}
		r.warnf(p+".listen", "port %s open to everyone; set allow to the sources that need it, or acknowledge_risk = \"why\"",
			strings.Join(risky, ", "))
	}
}

// checkOverlaps rejects two served mappings that would both match some
// flow: a shared protocol, overlapping listen addresses and ports, and a
// shared ingress. The later one is reported, naming the first.
func (c *Config) checkOverlaps(r *report, now time.Time) {
	for j := range c.Mappings {
		b := &c.Mappings[j]
		if !b.ActiveAt(now) || b.Listen.Ports.Lo == 0 {
			continue
		}
		for i := range j {
			a := &c.Mappings[i]
			shared := a.Protocol & b.Protocol
			if !a.ActiveAt(now) || shared == 0 || !a.Listen.Overlaps(b.Listen) || !c.ingressesOverlap(a, b) {
				continue
			}
			at := b.Listen
			at.Ports = a.Listen.Ports.Intersect(b.Listen.Ports)
			r.errorf(fmt.Sprintf("mapping[%d].listen", j), "pick another port or address",
				"%s/%s is already used by %s", shared, at, label("mapping", i, a.Name, a.Line))
			break
		}
	}
}

func (c *Config) ingressesOverlap(a, b *Mapping) bool {
	for _, in := range c.Ingresses() {
		if a.ServesIngress(in, c) && b.ServesIngress(in, c) {
			return true
		}
	}
	return false
}

// label names element i of a [[kind]] array in messages: mapping "web"
// (line 9), or mapping[3] when it has no name.
func label(kind string, i int, name string, line int) string {
	s := fmt.Sprintf("%s[%d]", kind, i)
	if name != "" {
		s = fmt.Sprintf("%s %q", kind, name)
	}
	if line > 0 {
		s += fmt.Sprintf(" (line %d)", line)
	}
	return s
}

func day(t time.Time) string { return t.Format(time.DateOnly) }
