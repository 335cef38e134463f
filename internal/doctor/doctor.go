// Package doctor is `natbox doctor`: read-only checks of a config against the
// machine it runs on (targets reachable, the box's own addresses, the TUN and
// its routes, the relay uplink, risky exposures, overdue reviews), each
// reported as ok, warning or problem with the fix in plain words. The doctor
// never changes anything.
package doctor

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
)

// Severity grades a check.
type Severity int

const (
	OK      Severity = iota // nothing to do
	Warning                 // works, but likely not as intended
	Problem                 // broken; natbox doctor exits 1
)

func (s Severity) String() string {
	switch s {
	case OK:
		return "ok"
	case Warning:
		return "warning"
	case Problem:
		return "problem"
	}
	return fmt.Sprintf("severity(%d)", int(s))
}

// MarshalText makes a Severity its word in JSON.
func (s Severity) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Check is one finding.
type Check struct {
	Area     string   `json:"area"` // what was checked: `mapping "web"`, "addresses", "tun", "uplink", "exposure", "review"
	Severity Severity `json:"severity"`
	Msg      string   `json:"message"`
	Fix      string   `json:"fix,omitempty"` // what to do; empty for ok
}

// Report is every check, in the order they ran.
type Report struct {
	Checks []Check `json:"checks"`
}

// Count returns how many checks have severity s.
func (r Report) Count(s Severity) int {
	n := 0
	for _, c := range r.Checks {
		if c.Severity == s {
			n++
		}
	}
	return n
}

// HasProblems reports whether any check is a Problem (natbox doctor exits 1).
func (r Report) HasProblems() bool { return r.Count(Problem) > 0 }

// Write prints the report for people: one line per check, its fix indented
// under it, and a summary line.
func (r Report) Write(w io.Writer) error {
	var b strings.Builder
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "%-8s %s: %s\n", c.Severity, c.Area, c.Msg)
		if c.Fix != "" {
			fmt.Fprintf(&b, "%-8s   fix: %s\n", "", c.Fix)
		}
	}
	fmt.Fprintf(&b, "\n%d ok, %s, %s\n", r.Count(OK), plural(r.Count(Warning), "warning"), plural(r.Count(Problem), "problem"))
	_, err := io.WriteString(w, b.String())
	return err
}

func plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return fmt.Sprintf("%d %ss", n, word)
}

// Dialer connects to targets; *net.Dialer is one.
type Dialer interface {
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
}

// Resolver resolves names; *net.Resolver is one.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Interface is a network interface of this machine.
type Interface struct {
	Name     string
	Up       bool
	Loopback bool
	Addrs    []netip.Prefix
}

// Options are the doctor's seams; the zero value checks the real machine.
type Options struct {
	Now         func() time.Time            // nil: time.Now
	Dialer      Dialer                      // nil: a net.Dialer
	Resolver    Resolver                    // nil: net.DefaultResolver
	Interfaces  func() ([]Interface, error) // nil: net.Interfaces
	DialTimeout time.Duration               // per target; 0: 3s
	// Status asks the running natbox for its status; nil: dial cfg.Admin.Socket.
	// An error means no natbox answers.
	Status func(ctx context.Context) (admin.Status, error)

	TUNDevice     string // "": /dev/net/tun
	ProcStatus    string // "": /proc/self/status
	RouteFile     string // "": /proc/net/route
	IPv6RouteFile string // "": /proc/net/ipv6_route
}

const (
	defaultDialTimeout = 3 * time.Second
	statusTimeout      = 2 * time.Second
	// maxHandshakeAge: WireGuard re-handshakes every 2 minutes while traffic
	// or keepalives flow, so older means the tunnel is down.
	maxHandshakeAge = 3 * time.Minute
	// maxParallelProbes bounds concurrent target dials.
	maxParallelProbes = 16
)

func (o *Options) fill(cfg *conf.Config) {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Dialer == nil {
		o.Dialer = &net.Dialer{}
	}
	if o.Resolver == nil {
		o.Resolver = net.DefaultResolver
	}
	if o.Interfaces == nil {
		o.Interfaces = systemInterfaces
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = defaultDialTimeout
	}
	if o.Status == nil {
		socket := cfg.Admin.Socket
		o.Status = func(ctx context.Context) (admin.Status, error) {
			c, err := admin.Dial(socket)
			if err != nil {
				return admin.Status{}, err
			}
			defer c.Close()
			return c.Status(ctx)
		}
	}
	if o.TUNDevice == "" {
		o.TUNDevice = "/dev/net/tun"
	}
	if o.ProcStatus == "" {
		o.ProcStatus = "/proc/self/status"
	}
	if o.RouteFile == "" {
		o.RouteFile = "/proc/net/route"
	}
	if o.IPv6RouteFile == "" {
		o.IPv6RouteFile = "/proc/net/ipv6_route"
	}
}

// doctor holds what the checks share for one run.
type doctor struct {
	cfg  *conf.Config
	opts Options
	now  time.Time

	ifaces    []Interface
	ifacesErr error
	// running is the live natbox's status; runningErr says why there is none.
	running    *admin.Status
	runningErr error
}

// Run checks cfg against this machine and returns every finding. It only
// reads and probes: it never changes the machine or a running natbox.
func Run(ctx context.Context, cfg *conf.Config, opts Options) Report {
	opts.fill(cfg)
	d := &doctor{cfg: cfg, opts: opts, now: opts.Now()}
	d.ifaces, d.ifacesErr = opts.Interfaces()
	if cfg.TUN != nil || len(cfg.Uplinks) > 0 {
		sctx, cancel := context.WithTimeout(ctx, statusTimeout)
		st, err := opts.Status(sctx)
		cancel()
		if err == nil {
			d.running = &st
		}
		d.runningErr = err
	}

	var r Report
	r.Checks = append(r.Checks, d.checkTargets(ctx)...)
	r.Checks = append(r.Checks, d.checkAddresses()...)
	if cfg.TUN != nil {
		r.Checks = append(r.Checks, d.checkTUN()...)
	}
	for i := range cfg.Uplinks {
		r.Checks = append(r.Checks, d.checkUplink(ctx, &cfg.Uplinks[i])...)
	}
	r.Checks = append(r.Checks, d.checkExposure()...)
	r.Checks = append(r.Checks, d.checkReview()...)
	return r
}

// expired reports whether m's expires date has passed.
func (d *doctor) expired(m *conf.Mapping) bool {
	return !m.Expires.IsZero() && !d.now.Before(m.Expires)
}

func mappingArea(m *conf.Mapping) string { return fmt.Sprintf("mapping %q", m.Name) }
