package forwarder

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"time"

	"go4.org/netipx"

	"github.com/natbox/natbox/conf"
)

// Proxy protocol versions a mapping may ask for.
const (
	proxyNone = iota
	proxyV1
	proxyV2
)

// Rule is one compiled, immutable mapping. A Reload builds new Rules; it
// never changes one that sessions may be reading.
type Rule struct {
	Name    string
	Mapping conf.Mapping // a copy of the mapping it was compiled from

	ingress     ingressSet
	allow, deny *netipx.IPSet // nil allow: anyone; nil deny: nobody
	targetPorts conf.PortRange
	targetAddr  netip.Addr // valid when Target.Host is an IP literal
	idleTCP     time.Duration
	idleUDP     time.Duration
	proxy       int
	expires     int64 // unix nanos; 0: never
	enabled     bool
	budget      conf.SourceBudget // per-source caps and rate, [limits] and the mapping's own keys resolved
	groupName   string            // "" when in no group
	quota       Quota             // the group's
	group       *groupState       // the group's counters; set with state
	state       *mappingState     // this name's counters; set before the RuleSet is published
}

// ingressSet is a bit set of ingress names; 0 means any ingress.
type ingressSet uint8

const (
	ingressTUN ingressSet = 1 << iota
	ingressUplink
	ingressOther // any name we do not know; only an empty set serves it
)

func ingressBit(name string) ingressSet {
	switch name {
	case conf.IngressTUN:
		return ingressTUN
	case conf.IngressUplink:
		return ingressUplink
	}
	return ingressOther
}

func (s ingressSet) serves(name string) bool { return s == 0 || s&ingressBit(name) != 0 }

// compileRule builds a Rule from a validated mapping. It re-checks what the
// forwarder depends on, so a config built in code cannot break an invariant.
func compileRule(m conf.Mapping, configured ingressSet) (*Rule, error) {
	r := &Rule{Name: m.Name, Mapping: m, enabled: m.IsEnabled()}
	if m.Name == "" {
		return nil, errors.New("mapping has no name; give every mapping a unique name")
	}
	if m.Protocol&^conf.TCPUDP != 0 || m.Protocol == 0 {
		return nil, fmt.Errorf("mapping %q: unknown protocol %d; use tcp, udp or tcp+udp", m.Name, m.Protocol)
	}
	if m.Listen.Ports.Lo == 0 || m.Listen.Ports.Hi < m.Listen.Ports.Lo {
		return nil, fmt.Errorf("mapping %q: listen ports %d-%d are invalid; use 1-65535", m.Name, m.Listen.Ports.Lo, m.Listen.Ports.Hi)
	}
	if m.Target.Host == "" || m.Target.Ports.Lo == 0 {
		return nil, fmt.Errorf("mapping %q: target %q:%d is incomplete; write host:port", m.Name, m.Target.Host, m.Target.Ports.Lo)
	}
	// A target range is either as wide as the listen range or a start port.
	width := m.Listen.Ports.Size()
	switch {
	case m.Target.Ports.Size() == width, m.Target.Ports.Size() == 1:
	default:
		return nil, fmt.Errorf("mapping %q: target range has %d ports but listen has %d; use the same width or a single start port",
			m.Name, m.Target.Ports.Size(), width)
	}
	if int(m.Target.Ports.Lo)+width-1 > 65535 {
		return nil, fmt.Errorf("mapping %q: target ports run past 65535; lower the target start port", m.Name)
	}
	r.targetPorts = conf.PortRange{Lo: m.Target.Ports.Lo, Hi: m.Target.Ports.Lo + uint16(width-1)}
	if a, err := netip.ParseAddr(m.Target.Host); err == nil {
		r.targetAddr = a.Unmap()
	}
	for _, in := range m.Ingress {
		b := ingressBit(in)
		if b == ingressOther {
			return nil, fmt.Errorf("mapping %q: unknown ingress %q; use %q or %q", m.Name, in, conf.IngressTUN, conf.IngressUplink)
		}
		r.ingress |= b
	}
	if len(m.Ingress) == 0 {
		r.ingress = configured
	}
	switch m.ProxyProtocol {
	case "":
	case "v1":
		if m.Protocol.Has(conf.UDP) {
			return nil, fmt.Errorf("mapping %q: proxy_protocol v1 cannot carry udp; use \"v2\"", m.Name)
		}
		r.proxy = proxyV1
	case "v2":
		r.proxy = proxyV2
	default:
		return nil, fmt.Errorf("mapping %q: unknown proxy_protocol %q; use \"v1\" or \"v2\"", m.Name, m.ProxyProtocol)
	}
	var err error
	if r.allow, err = buildSet(m.Allow); err != nil {
		return nil, fmt.Errorf("mapping %q: allow: %w", m.Name, err)
	}
	if r.deny, err = buildSet(m.Deny); err != nil {
		return nil, fmt.Errorf("mapping %q: deny: %w", m.Name, err)
	}
	r.idleTCP, r.idleUDP = m.IdleTimeoutFor(conf.TCP), m.IdleTimeoutFor(conf.UDP)
	if !m.Expires.IsZero() {
		r.expires = m.Expires.UnixNano()
	}
	return r, nil
}

func buildSet(prefixes []netip.Prefix) (*netipx.IPSet, error) {
	if len(prefixes) == 0 {
		return nil, nil
	}
	var b netipx.IPSetBuilder
	for _, p := range prefixes {
		if !p.IsValid() {
			return nil, fmt.Errorf("prefix %q is invalid; write an address or CIDR", p)
		}
		b.AddPrefix(p.Masked())
		// Clients may arrive as IPv4-mapped IPv6 addresses; admit them too.
		if p.Addr().Is4() {
			b.AddPrefix(netip.PrefixFrom(netip.AddrFrom16(p.Addr().As16()), p.Bits()+96).Masked())
		}
	}
	return b.IPSet()
}

// admits returns the refusal for a client address, or refusalNone.
func (r *Rule) admits(client netip.Addr) refusal {
	client = client.Unmap()
	if r.deny != nil && r.deny.Contains(client) {
		return refusedDenied
	}
	if r.allow != nil && !r.allow.Contains(client) {
		return refusedNotAllowed
	}
	return refusalNone
}

// expiredAt reports whether the mapping's expires time has passed at now.
func (r *Rule) expiredAt(now time.Time) bool {
	return r.expires != 0 && now.UnixNano() >= r.expires
}

// matchesAddr reports whether a flow to dst is for this mapping's listen
// address: none matches every address, an unspecified one every address of
// its family, anything else only itself.
func (r *Rule) matchesAddr(dst netip.Addr) bool {
	l := r.Mapping.Listen.Addr
	switch {
	case !l.IsValid():
		return true
	case l.IsUnspecified():
		return l.Is4() == dst.Is4()
	}
	return l == dst
}

// specificity orders candidates: an exact listen address beats an
// unspecified one, which beats none.
func (r *Rule) specificity() int {
	l := r.Mapping.Listen.Addr
	switch {
	case !l.IsValid():
		return 0
	case l.IsUnspecified():
		return 1
	}
	return 2
}

// targetPort maps a listen port to its target port (ranges map 1:1).
func (r *Rule) targetPort(listenPort uint16) uint16 {
	return r.targetPorts.Lo + (listenPort - r.Mapping.Listen.Ports.Lo)
}

// listenPort is the inverse of targetPort.
func (r *Rule) listenPort(targetPort uint16) uint16 {
	return r.Mapping.Listen.Ports.Lo + (targetPort - r.targetPorts.Lo)
}

// targetHostPort is the dial address for a flow that arrived on listenPort.
func (r *Rule) targetHostPort(listenPort uint16) string {
	return net.JoinHostPort(r.Mapping.Target.Host, strconv.Itoa(int(r.targetPort(listenPort))))
}

// RuleSet is an immutable compiled config: the mappings indexed by protocol
// and port, plus the shared limits. Safe for concurrent use.
type RuleSet struct {
	rules   []*Rule // config order, disabled ones included
	byName  map[string]*Rule
	tcp     portIndex
	udp     portIndex
	limits  conf.Limits
	connLog bool

	tcpPool, udpPool int // session pools; 0: unlimited
	trackedPerShard  int // rate buckets kept per sourceTable shard
}

// Compile builds a RuleSet from cfg. It returns an error, and nothing else,
// when a mapping is unusable or two mappings share a name.
func Compile(cfg *conf.Config) (*RuleSet, error) { return CompileGroups(cfg, Groups{}) }

// CompileGroups is Compile with mappings put under the quotas of g.
func CompileGroups(cfg *conf.Config, g Groups) (*RuleSet, error) {
	if cfg == nil {
		return nil, errors.New("no config; pass a loaded *conf.Config")
	}
	rs := &RuleSet{byName: make(map[string]*Rule, len(cfg.Mappings)), limits: cfg.Limits, connLog: cfg.Log.Connections}
	rs.tcpPool, rs.udpPool = cfg.Limits.SessionPools()
	tracked := cfg.Limits.MaxTrackedSources
	if tracked <= 0 {
		tracked = conf.DefaultMaxTrackedSources
	}
	rs.trackedPerShard = max(1, (tracked+sourceShards-1)/sourceShards)
	// An empty ingress list means every configured ingress; a config with
	// none configured (built in code, or the relay's) serves any ingress.
	var configured ingressSet
	if cfg.TUN != nil {
		configured |= ingressTUN
	}
	if len(cfg.Uplinks) > 0 {
		configured |= ingressUplink
	}
	var tcp, udp []*Rule
	for _, m := range cfg.Mappings {
		r, err := compileRule(m, configured)
		if err != nil {
			return nil, err
		}
		r.budget = cfg.Limits.SourceBudget(&m)
		if name, ok := g.Of[m.Name]; ok {
			q, ok := g.Quotas[name]
			if !ok {
				return nil, fmt.Errorf("mapping %q: group %q has no quota", m.Name, name)
			}
			r.groupName, r.quota = name, q
		}
		if _, dup := rs.byName[r.Name]; dup {
			return nil, fmt.Errorf("mapping %q is defined twice; give each mapping a unique name", r.Name)
		}
		rs.byName[r.Name] = r
		rs.rules = append(rs.rules, r)
		if !r.enabled {
			continue
		}
		if m.Protocol.Has(conf.TCP) {
			tcp = append(tcp, r)
		}
		if m.Protocol.Has(conf.UDP) {
			udp = append(udp, r)
		}
	}
	rs.tcp = buildPortIndex(tcp)
	rs.udp = buildPortIndex(udp)
	return rs, nil
}

// Rule returns the rule named name, enabled or not.
func (rs *RuleSet) Rule(name string) (*Rule, bool) {
	r, ok := rs.byName[name]
	return r, ok
}

// Rules returns every rule in config order, disabled ones included.
func (rs *RuleSet) Rules() []*Rule { return slices.Clone(rs.rules) }

// Lookup returns the enabled, unexpired rule that serves a flow of protocol p
// (conf.TCP or conf.UDP) arriving on the named ingress for dst, or nil.
func (rs *RuleSet) Lookup(ingress string, p conf.Proto, dst netip.AddrPort, now time.Time) *Rule {
	ix := &rs.tcp
	if p == conf.UDP {
		ix = &rs.udp
	} else if p != conf.TCP {
		return nil
	}
	addr := dst.Addr().Unmap()
	for _, r := range ix.find(dst.Port()) {
		if r.matchesAddr(addr) && r.ingress.serves(ingress) && !r.expiredAt(now) {
			return r
		}
	}
	return nil
}

// portIndex finds the rules whose listen range holds a port. The port space
// is cut into segments at every range boundary; each segment lists its
// candidates, most specific listen address first. Lookup is a binary search.
type portIndex struct {
	starts []uint16  // segment i covers starts[i] up to starts[i+1]-1
	rules  [][]*Rule // candidates of segment i
}

func buildPortIndex(rules []*Rule) portIndex {
	var bounds []int
	for _, r := range rules {
		bounds = append(bounds, int(r.Mapping.Listen.Ports.Lo), int(r.Mapping.Listen.Ports.Hi)+1)
	}
	slices.Sort(bounds)
	bounds = slices.Compact(bounds)
	if n := len(bounds); n > 0 && bounds[n-1] > 65535 {
		bounds = bounds[:n-1] // the end past the last port opens no segment
	}
	ix := portIndex{starts: make([]uint16, len(bounds)), rules: make([][]*Rule, len(bounds))}
	for i, b := range bounds {
		ix.starts[i] = uint16(b)
	}
	for _, r := range rules {
		lo, hi := r.Mapping.Listen.Ports.Lo, r.Mapping.Listen.Ports.Hi
		i, _ := slices.BinarySearch(ix.starts, lo)
		for ; i < len(ix.starts) && ix.starts[i] <= hi; i++ {
			ix.rules[i] = append(ix.rules[i], r)
		}
	}
	for _, c := range ix.rules {
		slices.SortStableFunc(c, func(a, b *Rule) int { return b.specificity() - a.specificity() })
	}
	return ix
}

func (ix *portIndex) find(port uint16) []*Rule {
	i, found := slices.BinarySearch(ix.starts, port)
	if !found {
		i--
	}
	if i < 0 {
		return nil
	}
	return ix.rules[i]
}

// sameMapping reports whether two mappings are equal for reload purposes:
// the config line is ignored, times compare by instant.
func sameMapping(a, b conf.Mapping) bool {
	if !a.Created.Equal(b.Created) || !a.ReviewBy.Equal(b.ReviewBy) || !a.Expires.Equal(b.Expires) {
		return false
	}
	if a.IsEnabled() != b.IsEnabled() {
		return false
	}
	a.Line, b.Line = 0, 0
	a.Created, a.ReviewBy, a.Expires = time.Time{}, time.Time{}, time.Time{}
	b.Created, b.ReviewBy, b.Expires = time.Time{}, time.Time{}, time.Time{}
	a.Enabled, b.Enabled = nil, nil
	return reflect.DeepEqual(a, b)
}

// sameRoute reports whether established sessions may survive the change from
// a to b: where flows go, which flows match and how they are framed.
func sameRoute(a, b conf.Mapping) bool {
	return a.Protocol == b.Protocol && a.Listen == b.Listen && a.Target == b.Target && a.ProxyProtocol == b.ProxyProtocol
}
