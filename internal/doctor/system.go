package doctor

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
)

// cgnatPrefix is the shared address space of RFC 6598: carrier-grade NAT.
var cgnatPrefix = netip.MustParsePrefix("100.64.0.0/10")

// capNetAdmin is CAP_NET_ADMIN's bit in the capability sets.
const capNetAdmin = 12

// systemInterfaces lists this machine's interfaces and their addresses.
func systemInterfaces() ([]Interface, error) {
	nifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	out := make([]Interface, 0, len(nifs))
	for _, ni := range nifs {
		ifc := Interface{Name: ni.Name, Up: ni.Flags&net.FlagUp != 0, Loopback: ni.Flags&net.FlagLoopback != 0}
		addrs, err := ni.Addrs()
		if err != nil {
			return nil, fmt.Errorf("addresses of %s: %w", ni.Name, err)
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(ipn.IP)
			if !ok {
				continue
			}
			ones, _ := ipn.Mask.Size()
			ifc.Addrs = append(ifc.Addrs, netip.PrefixFrom(ip.Unmap(), ones))
		}
		out = append(out, ifc)
	}
	return out, nil
}

// checkAddresses looks at the box's own addresses for the signs that inbound
// connections from the internet cannot reach it: carrier-grade or double NAT.
func (d *doctor) checkAddresses() []Check {
	const area = "addresses"
	if d.ifacesErr != nil {
		return []Check{{Area: area, Severity: Warning, Msg: fmt.Sprintf("cannot list this machine's addresses: %v", d.ifacesErr)}}
	}
	var cgnat, private, public []string
	for _, ifc := range d.ifaces {
		if !ifc.Up || ifc.Loopback || (d.cfg.TUN != nil && ifc.Name == d.cfg.TUN.Name) {
			continue
		}
		for _, p := range ifc.Addrs {
			a := p.Addr().Unmap()
			label := a.String() + " on " + ifc.Name
			switch {
			case a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsUnspecified():
			case cgnatPrefix.Contains(a):
				cgnat = append(cgnat, label)
			case a.IsPrivate():
				private = append(private, label)
			case a.IsGlobalUnicast():
				public = append(public, label)
			}
		}
	}
	relay := len(d.cfg.Uplinks) > 0
	switch {
	case len(cgnat) > 0 && relay:
		return []Check{{Area: area, Severity: OK, Msg: fmt.Sprintf("carrier-grade NAT address (%s); relay mode ([uplink]) carries inbound mappings", strings.Join(cgnat, ", "))}}
	case len(cgnat) > 0:
		return []Check{{Area: area, Severity: Warning,
			Msg: fmt.Sprintf("carrier-grade NAT: %s is in 100.64.0.0/10, so inbound mappings from the internet will not reach this box", strings.Join(cgnat, ", ")),
			Fix: "use relay mode: run natbox relay on a public server and add an [uplink] to it"}}
	case len(public) > 0:
		return []Check{{Area: area, Severity: OK, Msg: "public address: " + strings.Join(public, ", ")}}
	case len(private) > 0 && relay:
		return []Check{{Area: area, Severity: OK, Msg: fmt.Sprintf("only private addresses (%s); relay mode ([uplink]) carries inbound mappings", strings.Join(private, ", "))}}
	case len(private) > 0:
		return []Check{{Area: area, Severity: Warning,
			Msg: fmt.Sprintf("only private addresses (%s): this box sits behind another router (double NAT), so internet clients reach it only if that router forwards the mapped ports here", strings.Join(private, ", ")),
			Fix: "forward the mapped ports on the upstream router to this box, or use relay mode ([uplink])"}}
	}
	return []Check{{Area: area, Severity: Warning, Msg: "no usable address on any interface that is up",
		Fix: "connect this box to a network, or check ip addr"}}
}

// checkTUN checks what the gateway ingress needs: the TUN driver, the
// capability to configure it, the link, and routes into it.
func (d *doctor) checkTUN() []Check {
	const area = "tun"
	t := d.cfg.TUN
	var out []Check

	f, err := os.OpenFile(d.opts.TUNDevice, os.O_RDWR, 0)
	switch {
	case err == nil:
		f.Close()
		out = append(out, Check{Area: area, Severity: OK, Msg: d.opts.TUNDevice + " opens"})
	case errors.Is(err, fs.ErrNotExist):
		out = append(out, Check{Area: area, Severity: Problem, Msg: "no " + d.opts.TUNDevice,
			Fix: "load the tun module (modprobe tun), or give the container --device /dev/net/tun"})
	case errors.Is(err, fs.ErrPermission):
		out = append(out, Check{Area: area, Severity: Problem, Msg: "cannot open " + d.opts.TUNDevice + ": permission denied",
			Fix: "run natbox as root or with CAP_NET_ADMIN, and in a container pass --device /dev/net/tun"})
	default:
		out = append(out, Check{Area: area, Severity: Problem, Msg: fmt.Sprintf("cannot open %s: %v", d.opts.TUNDevice, err),
			Fix: "load the tun module (modprobe tun)"})
	}

	switch has, err := hasCapability(d.opts.ProcStatus, capNetAdmin); {
	case err != nil:
		out = append(out, Check{Area: area, Severity: Warning, Msg: fmt.Sprintf("cannot read capabilities: %v", err)})
	case has:
		out = append(out, Check{Area: area, Severity: OK, Msg: "has CAP_NET_ADMIN"})
	default:
		out = append(out, Check{Area: area, Severity: Problem,
			Msg: "no CAP_NET_ADMIN: natbox cannot create the TUN or install its routes",
			Fix: "run as root, or setcap cap_net_admin+ep on the natbox binary, or docker run --cap-add NET_ADMIN; relay mode ([uplink] without [tun]) needs no privilege"})
	}

	var link *Interface
	for i := range d.ifaces {
		if d.ifaces[i].Name == t.Name {
			link = &d.ifaces[i]
		}
	}
	running := d.running != nil
	switch {
	case link == nil && running:
		out = append(out, Check{Area: area, Severity: Problem, Msg: fmt.Sprintf("natbox is running but has no link %q", t.Name),
			Fix: "check natbox's log for the TUN error, then restart it"})
		return out
	case link == nil:
		out = append(out, Check{Area: area, Severity: OK, Msg: fmt.Sprintf("link %q does not exist yet; natbox creates it when it starts", t.Name)})
		return out
	case !link.Up:
		sev := Warning
		if running {
			sev = Problem
		}
		out = append(out, Check{Area: area, Severity: sev, Msg: fmt.Sprintf("link %q exists but is down", t.Name),
			Fix: fmt.Sprintf("natbox brings it up when it starts; if it is running, ip link set %s up", t.Name)})
	default:
		out = append(out, Check{Area: area, Severity: OK, Msg: fmt.Sprintf("link %q is up", t.Name)})
	}
	return append(out, d.checkRoutes()...)
}

// checkRoutes checks that the configured routes exist and that traffic for
// the TUN's addresses is routed into it.
func (d *doctor) checkRoutes() []Check {
	const area = "tun"
	name := d.cfg.TUN.Name
	v4, err4 := readIPv4Routes(d.opts.RouteFile)
	v6, err6 := readIPv6Routes(d.opts.IPv6RouteFile)
	if err := errors.Join(err4, err6); err != nil && len(v4)+len(v6) == 0 {
		return []Check{{Area: area, Severity: Warning, Msg: fmt.Sprintf("cannot read the routing table: %v", err)}}
	}
	var into []netip.Prefix
	for _, r := range append(v4, v6...) {
		if r.iface == name {
			into = append(into, r.dst)
		}
	}
	var out []Check
	for _, want := range d.cfg.TUN.Routes {
		if !containsPrefix(into, want.Masked()) {
			out = append(out, Check{Area: area, Severity: Problem, Msg: fmt.Sprintf("configured route %s into %s is missing", want, name),
				Fix: fmt.Sprintf("natbox installs [tun] routes when it starts; restart it, or add it by hand: ip route add %s dev %s", want.Masked(), name)})
		}
	}
	for _, a := range d.cfg.TUN.Addresses {
		if !routedInto(into, a.Addr()) {
			out = append(out, Check{Area: area, Severity: Warning,
				Msg: fmt.Sprintf("no route sends traffic for %s into %s, so clients' packets for it never reach natbox", a.Addr(), name),
				Fix: fmt.Sprintf("add %s to [tun] routes, or route it into %s yourself", netip.PrefixFrom(a.Addr(), a.Addr().BitLen()), name)})
		}
	}
	if len(out) == 0 {
		list := make([]string, len(into))
		for i, p := range into {
			list[i] = p.String()
		}
		if len(list) == 0 {
			list = []string{"none"}
		}
		out = append(out, Check{Area: area, Severity: OK, Msg: fmt.Sprintf("routes into %s: %s", name, strings.Join(list, ", "))})
	}
	return out
}

func containsPrefix(ps []netip.Prefix, p netip.Prefix) bool {
	for _, q := range ps {
		if q == p {
			return true
		}
	}
	return false
}

func routedInto(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// hasCapability reports whether the effective set in a /proc/PID/status file
// holds capability bit.
func hasCapability(statusFile string, bit uint) (bool, error) {
	data, err := os.ReadFile(statusFile)
	if err != nil {
		return false, err
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return false, fmt.Errorf("%s: CapEff: %w", statusFile, err)
			}
			return caps&(1<<bit) != 0, nil
		}
	}
	return false, fmt.Errorf("%s has no CapEff line", statusFile)
}

type route struct {
	iface string
	dst   netip.Prefix
}

// rtfUp is RTF_UP: the route is usable.
const rtfUp = 0x1

// readIPv4Routes parses /proc/net/route: a header line, then
// Iface Destination Gateway Flags RefCnt Use Metric Mask ..., with addresses
// as hex in host byte order.
func readIPv4Routes(path string) ([]route, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []route
	sc := bufio.NewScanner(f)
	for first := true; sc.Scan(); first = false {
		fields := strings.Fields(sc.Text())
		if first || len(fields) < 8 {
			continue
		}
		dst, err1 := strconv.ParseUint(fields[1], 16, 32)
		flags, err2 := strconv.ParseUint(fields[3], 16, 32)
		mask, err3 := strconv.ParseUint(fields[7], 16, 32)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("%s: %q: %w", path, sc.Text(), err)
		}
		if flags&rtfUp == 0 {
			continue
		}
		var b [4]byte
		binary.NativeEndian.PutUint32(b[:], uint32(dst))
		// A netmask's ones count is the prefix length whatever the byte order.
		out = append(out, route{iface: fields[0], dst: netip.PrefixFrom(netip.AddrFrom4(b), bits.OnesCount32(uint32(mask)))})
	}
	return out, sc.Err()
}

// readIPv6Routes parses /proc/net/ipv6_route: dst (32 hex digits, network
// order), dst prefix length (hex), src, src length, next hop, metric, refcnt,
// use, flags, iface.
func readIPv6Routes(path string) ([]route, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []route
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 {
			continue
		}
		raw, err1 := hex.DecodeString(fields[0])
		plen, err2 := strconv.ParseUint(fields[1], 16, 8)
		flags, err3 := strconv.ParseUint(fields[8], 16, 32)
		if err := errors.Join(err1, err2, err3); err != nil || len(raw) != 16 {
			return nil, fmt.Errorf("%s: %q: bad route line", path, sc.Text())
		}
		if flags&rtfUp == 0 {
			continue
		}
		out = append(out, route{iface: fields[9], dst: netip.PrefixFrom(netip.AddrFrom16([16]byte(raw)), int(plen))})
	}
	return out, sc.Err()
}

// uplinkArea names an uplink's checks: "uplink" when there is one, else
// "uplink <relay>", so that each relay's findings read apart.
func (d *doctor) uplinkArea(u *conf.Uplink) string {
	if len(d.cfg.Uplinks) == 1 {
		return "uplink"
	}
	return "uplink " + u.Relay
}

// checkUplink checks one relay tunnel through the running natbox, or, when
// none answers, only that the relay's name resolves.
func (d *doctor) checkUplink(ctx context.Context, u *conf.Uplink) []Check {
	area := d.uplinkArea(u)
	if d.running == nil {
		out := []Check{d.checkRelayResolves(ctx, u)}
		return append(out, Check{Area: area, Severity: Warning,
			Msg: fmt.Sprintf("no natbox answers on %s (%v), so the tunnel's handshake and the ports the relay accepted cannot be checked", d.cfg.Admin.Socket, d.runningErr),
			Fix: "start natbox (natbox run), then run natbox doctor again"})
	}
	var st *admin.Uplink
	for i := range d.running.Uplinks {
		if d.running.Uplinks[i].Relay == u.Relay {
			st = &d.running.Uplinks[i]
		}
	}
	if st == nil {
		return []Check{{Area: area, Severity: Problem, Msg: fmt.Sprintf("the running natbox has no uplink to %s: it runs with another config", u.Relay),
			Fix: "restart natbox with this config (an [[uplink]] change needs a restart)"}}
	}
	now := d.running.Time
	if now.IsZero() {
		now = d.now
	}
	fix := fmt.Sprintf("check that natbox relay runs on %s and its UDP port is reachable from here, that relay_public_key is the relay's public key, and that the relay lists this box's public key in a [[peer]]", u.Relay)
	var out []Check
	switch age := now.Sub(st.LastHandshake); {
	case st.LastHandshake.IsZero():
		out = append(out, Check{Area: area, Severity: Problem, Msg: fmt.Sprintf("no handshake with the relay %s yet", u.Relay), Fix: fix})
	case age > maxHandshakeAge:
		out = append(out, Check{Area: area, Severity: Problem,
			Msg: fmt.Sprintf("last handshake with the relay %s was %s ago (over %s): the tunnel is down", u.Relay, age.Round(time.Second), maxHandshakeAge),
			Fix: fix})
	default:
		out = append(out, Check{Area: area, Severity: OK, Msg: fmt.Sprintf("handshake with the relay %s %s ago", u.Relay, age.Round(time.Second))})
	}
	for _, r := range st.Refused {
		out = append(out, Check{Area: area, Severity: Problem, Msg: fmt.Sprintf("the relay refused %s: %s", r.Port, r.Reason),
			Fix: "add the port to this box's [[peer]] ports on the relay, or set ingress = [\"tun\"] on the mapping that needs it"})
	}
	if len(st.Refused) == 0 && len(st.Registered) > 0 {
		out = append(out, Check{Area: area, Severity: OK, Msg: "the relay holds " + strings.Join(st.Registered, ", ")})
	}
	if c, ok := d.transportCheck(u, st); ok {
		out = append(out, c)
	}
	if want, running := u.TCPCongestion, st.TCPCongestion; running != "" && want != "" && want != conf.TCPCongestionSystem && running != want {
		out = append(out, Check{Area: area, Severity: Warning,
			Msg: fmt.Sprintf("the TCP transport runs %s, not uplink.tcp_congestion %q: over a lossy path it slows down as flows over UDP do", running, want),
			Fix: fmt.Sprintf("as root on this host: modprobe tcp_%s, and add %s to net.ipv4.tcp_allowed_congestion_control (README, \"When UDP loses\"); or set tcp_congestion = \"system\"",
				want, want)})
	}
	return out
}

// transportCheck says which transport the uplink rides when it is not
// plain UDP, or why TCP fails.
func (d *doctor) transportCheck(u *conf.Uplink, st *admin.Uplink) (Check, bool) {
	area := d.uplinkArea(u)
	_, port, _ := net.SplitHostPort(u.RelayTCP)
	switch {
	case st.Transport == conf.TransportTCP && st.TransportError != "":
		return Check{Area: area, Severity: Problem,
			Msg: fmt.Sprintf("the uplink uses TCP/%s but cannot connect to %s: %s", port, u.RelayTCP, st.TransportError),
			Fix: "check that the relay sets [relay] tcp_listen and that uplink.relay_tcp points at it"}, true
	case st.Transport == conf.TransportTCP && st.Stats.Gauges["tcp_for_loss"] == 1:
		return Check{Area: area, Severity: Warning,
			Msg: fmt.Sprintf("UDP to the relay loses packets; using TCP/%s for a while (%s)", port, st.SwitchReason),
			Fix: "the loss is often the first hop (Wi-Fi, a cellular or satellite link): a wired uplink or a closer relay helps; " +
				`natbox tries UDP again by itself after the hold (README, "When UDP loses")`}, true
	case st.Transport == conf.TransportTCP && u.Transport == conf.TransportTCP:
		return Check{Area: area, Severity: OK, Msg: fmt.Sprintf("using TCP/%s to %s (uplink.transport = \"tcp\")", port, u.RelayTCP)}, true
	case st.Transport == conf.TransportTCP:
		return Check{Area: area, Severity: Warning,
			Msg: fmt.Sprintf("UDP to the relay is blocked; using TCP/%s (%s)", port, st.SwitchReason),
			Fix: fmt.Sprintf("allow outbound UDP to %s for full speed: TCP inside TCP stalls on loss; natbox moves back by itself when UDP works", u.Relay)}, true
	}
	return Check{}, false
}

func (d *doctor) checkRelayResolves(ctx context.Context, u *conf.Uplink) Check {
	area := d.uplinkArea(u)
	relay := u.Relay
	host, _, err := net.SplitHostPort(relay)
	if err != nil {
		return Check{Area: area, Severity: Problem, Msg: fmt.Sprintf("relay %q is not host:port: %v", relay, err),
			Fix: "write [uplink] relay as host:port, e.g. relay.example.net:51820"}
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return Check{Area: area, Severity: OK, Msg: "relay address " + relay}
	}
	rctx, cancel := context.WithTimeout(ctx, d.opts.DialTimeout)
	defer cancel()
	addrs, err := d.opts.Resolver.LookupNetIP(rctx, "ip", host)
	if err != nil || len(addrs) == 0 {
		return Check{Area: area, Severity: Problem, Msg: fmt.Sprintf("relay host %q does not resolve: %v", host, errOrEmpty(err)),
			Fix: "check [uplink] relay, and this box's DNS (resolv.conf)"}
	}
	return Check{Area: area, Severity: OK, Msg: fmt.Sprintf("relay host %s resolves to %s", host, addrs[0])}
}

// AddressWarning is checkAddresses' warning about this host's own addresses
// (carrier-grade or double NAT without an [uplink]), with its fix, or "" when
// there is none. natbox run computes it once at start for the status page.
func AddressWarning(cfg *conf.Config) string {
	ifaces, err := systemInterfaces()
	return addressWarning(cfg, ifaces, err)
}

func addressWarning(cfg *conf.Config, ifaces []Interface, err error) string {
	d := &doctor{cfg: cfg, ifaces: ifaces, ifacesErr: err}
	for _, c := range d.checkAddresses() {
		if c.Severity == Warning && err == nil {
			return c.Msg + "; " + c.Fix
		}
	}
	return ""
}
