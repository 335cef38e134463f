package conf

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// valueError is a leaf problem found while reading one value: what is wrong
// and how to fix it, kept apart so the loader can print "problem; fix".
type valueError struct{ problem, fix string }

func (e *valueError) Error() string {
	if e.fix == "" {
		return e.problem
	}
	return e.problem + "; " + e.fix
}

func valueErr(fix, format string, args ...any) error {
	return &valueError{problem: fmt.Sprintf(format, args...), fix: fix}
}

// String returns "tcp", "udp" or "tcp+udp".
func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case TCPUDP:
		return "tcp+udp"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

// UnmarshalText accepts "tcp", "udp" or "tcp+udp".
func (p *Proto) UnmarshalText(b []byte) error {
	switch s := string(b); s {
	case "tcp":
		*p = TCP
	case "udp":
		*p = UDP
	case "tcp+udp", "udp+tcp":
		*p = TCPUDP
	default:
		return valueErr(`use "tcp", "udp" or "tcp+udp"`, "unknown protocol %q", s)
	}
	return nil
}

// MarshalText is the inverse of UnmarshalText.
func (p Proto) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// String returns "443" for a single port and "10000-10100" for a range.
func (r PortRange) String() string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}

// ParsePortRange parses "443" or "10000-10100"; ports are 1-65535.
func ParsePortRange(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(s, "-")
	l, err := parsePort(lo)
	if err != nil {
		return PortRange{}, err
	}
	if !isRange {
		return PortRange{l, l}, nil
	}
	h, err := parsePort(hi)
	if err != nil {
		return PortRange{}, err
	}
	if h < l {
		return PortRange{}, valueErr(fmt.Sprintf("write %d-%d", h, l), "port range %q runs backwards", s)
	}
	return PortRange{l, h}, nil
}

func parsePort(s string) (uint16, error) {
	s = strings.TrimSpace(s)
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, valueErr(`write a number from 1 to 65535 or a range like "10000-10100"`, "%q is not a port", s)
	}
	if n < 1 || n > 65535 {
		return 0, valueErr("use 1-65535", "port %d is out of range", n)
	}
	return uint16(n), nil
}

// String returns the listen spec as written: "443", "10000-10100",
// "198.51.100.1:443" or "[2001:db8::1]:80-90".
func (l Listen) String() string {
	if !l.Addr.IsValid() {
		return l.Ports.String()
	}
	return joinHostPorts(l.Addr.String(), l.Ports)
}

// UnmarshalText accepts "8443", "10000-10100", "198.51.100.1:8443" or
// "[2001:db8::1]:80-90". A bare number (TOML integer) is a single port.
func (l *Listen) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	host, ports, hasHost, err := splitHostPorts(s)
	if err != nil {
		return err
	}
	var addr netip.Addr
	if hasHost {
		a, err := netip.ParseAddr(host)
		if err != nil || a.Zone() != "" {
			return valueErr(`write an IP address, e.g. "198.51.100.1:443", or only the port to listen on every address`,
				"listen address %q is not an IP address", host)
		}
		addr = a.Unmap()
	}
	r, err := ParsePortRange(ports)
	if err != nil {
		return err
	}
	*l = Listen{Addr: addr, Ports: r}
	return nil
}

// MarshalText is the inverse of UnmarshalText.
func (l Listen) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// MatchesAddr reports whether a flow to dst is for this listen address: the
// zero Addr matches every address, an unspecified one (0.0.0.0, ::) every
// address of its family.
func (l Listen) MatchesAddr(dst netip.Addr) bool {
	switch {
	case !l.Addr.IsValid():
		return true
	case l.Addr.IsUnspecified():
		return l.Addr.Is4() == dst.Unmap().Is4()
	}
	return l.Addr == dst.Unmap()
}

// Overlaps reports whether some destination address and port is matched by
// both l and o.
func (l Listen) Overlaps(o Listen) bool {
	if !l.Ports.Overlaps(o.Ports) {
		return false
	}
	if !l.Addr.IsValid() || !o.Addr.IsValid() {
		return true
	}
	if l.Addr.Is4() != o.Addr.Is4() {
		return false
	}
	return l.Addr.IsUnspecified() || o.Addr.IsUnspecified() || l.Addr == o.Addr
}

// String returns "host:port" or "host:lo-hi" (IPv6 hosts in brackets).
func (t Target) String() string { return joinHostPorts(t.Host, t.Ports) }

// UnmarshalText accepts "host:port", "host:start" or "host:lo-hi"; host is an
// IP literal (IPv6 in brackets) or a DNS name resolved at dial time.
func (t *Target) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	host, ports, hasHost, err := splitHostPorts(s)
	if err != nil {
		return err
	}
	if !hasHost || host == "" {
		return valueErr(`write host:port, e.g. "10.0.0.5:443" or "[fd00::5]:443"`, "target %q has no host", s)
	}
	if err := checkHost(host); err != nil {
		return err
	}
	r, err := ParsePortRange(ports)
	if err != nil {
		return err
	}
	*t = Target{Host: host, Ports: r}
	return nil
}

// MarshalText is the inverse of UnmarshalText.
func (t Target) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

// checkHost accepts an IP literal or a DNS name.
func checkHost(h string) error {
	if _, err := netip.ParseAddr(h); err == nil {
		return nil
	}
	ok := len(h) <= 253
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			ok = false
		}
	}
	if !ok || strings.HasPrefix(h, ".") || strings.Contains(h, "..") {
		return valueErr("use an IP address or a DNS name", "target host %q is neither an IP address nor a host name", h)
	}
	return nil
}

// splitHostPorts splits "host:ports" or "[v6]:ports"; a string without a
// host part is all ports.
func splitHostPorts(s string) (host, ports string, hasHost bool, err error) {
	if strings.HasPrefix(s, "[") {
		h, p, ok := strings.Cut(s[1:], "]:")
		if !ok {
			return "", "", false, valueErr(`write "[address]:port", e.g. "[2001:db8::1]:443"`, "%q has no port", s)
		}
		return h, p, true, nil
	}
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return "", s, false, nil
	}
	if strings.Contains(s[:i], ":") {
		return "", "", false, valueErr(fmt.Sprintf(`put IPv6 addresses in brackets, e.g. "[%s]:443"`, s[:i]), "%q is ambiguous", s)
	}
	return s[:i], s[i+1:], true, nil
}

func joinHostPorts(host string, r PortRange) string {
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return host + ":" + r.String()
}

// String returns "tcp/443" or "udp/10000-10100".
func (s PortSpec) String() string { return s.Proto.String() + "/" + s.Ports.String() }

// UnmarshalText accepts "tcp/443", "udp/10000-10100" or "tcp+udp/53".
func (s *PortSpec) UnmarshalText(b []byte) error {
	str := strings.TrimSpace(string(b))
	proto, ports, ok := strings.Cut(str, "/")
	if !ok {
		return valueErr(`write protocol/ports, e.g. "tcp/443" or "udp/10000-10100"`, "port spec %q has no protocol", str)
	}
	var p Proto
	if err := p.UnmarshalText([]byte(proto)); err != nil {
		return err
	}
	r, err := ParsePortRange(ports)
	if err != nil {
		return err
	}
	*s = PortSpec{Proto: p, Ports: r}
	return nil
}

// MarshalText is the inverse of UnmarshalText.
func (s PortSpec) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// String returns d in Go syntax ("5s", "2h0m0s").
func (d Duration) String() string { return time.Duration(d).String() }

// UnmarshalText accepts a positive Go duration ("5s", "1m30s", "2h").
func (d *Duration) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	v, err := time.ParseDuration(s)
	if err != nil {
		return valueErr(`write a duration with a unit, e.g. "5s", "2m" or "2h"`, "%q is not a duration", s)
	}
	if v <= 0 {
		return valueErr(`use a positive duration, e.g. "5s"`, "duration %q must be greater than zero", s)
	}
	*d = Duration(v)
	return nil
}

// MarshalText is the inverse of UnmarshalText.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Size is a byte count written with a unit: "64MiB", "512KiB", "1GiB"
// (binary units; "B" for plain bytes). "0" is allowed where the key says
// what 0 means.
type Size int64

// Bytes returns s as an int.
func (s Size) Bytes() int { return int(s) }

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Size) UnmarshalText(b []byte) error {
	t := strings.TrimSpace(string(b))
	if t == "0" {
		*s = 0
		return nil
	}
	num := strings.TrimRightFunc(t, func(r rune) bool { return r < '0' || r > '9' })
	unit := strings.TrimSpace(t[len(num):])
	mult := map[string]int64{"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || mult == 0 || v < 0 || v > (1<<40)/mult {
		return valueErr(`write a size with a binary unit, e.g. "64MiB", "512KiB" or "1GiB"`, "%q is not a size", t)
	}
	*s = Size(v * mult)
	return nil
}

// MarshalText is the inverse of UnmarshalText.
func (s Size) MarshalText() ([]byte, error) {
	v := int64(s)
	for _, u := range []struct {
		name string
		m    int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if v != 0 && v%u.m == 0 {
			return []byte(strconv.FormatInt(v/u.m, 10) + u.name), nil
		}
	}
	if v == 0 {
		return []byte("0"), nil
	}
	return []byte(strconv.FormatInt(v, 10) + "B"), nil
}
