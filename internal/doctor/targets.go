package doctor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"

	"github.com/natbox/natbox/conf"
)

// checkTargets probes every served mapping's target, several at a time,
// and returns the findings in mapping order.
func (d *doctor) checkTargets(ctx context.Context) []Check {
	results := make([][]Check, len(d.cfg.Mappings))
	sem := make(chan struct{}, maxParallelProbes)
	var wg sync.WaitGroup
	for i := range d.cfg.Mappings {
		m := &d.cfg.Mappings[i]
		switch {
		case !m.IsEnabled():
			results[i] = []Check{{Area: mappingArea(m), Severity: OK, Msg: "disabled; target not checked"}}
			continue
		case d.expired(m):
			continue // the review section reports it
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			results[i] = d.checkTarget(ctx, m)
		}()
	}
	wg.Wait()
	var out []Check
	for _, r := range results {
		out = append(out, r...)
	}
	return out
}

func (d *doctor) checkTarget(ctx context.Context, m *conf.Mapping) []Check {
	area := mappingArea(m)
	host, port := m.Target.Host, m.Target.Ports.Lo
	hostPort := net.JoinHostPort(host, strconv.Itoa(int(port)))
	what := "target " + hostPort
	if m.Target.Ports.Size() > 1 {
		what += " (first port of the range)"
	}

	addr, err := netip.ParseAddr(host)
	resolved := ""
	if err != nil {
		rctx, cancel := context.WithTimeout(ctx, d.opts.DialTimeout)
		addrs, err := d.opts.Resolver.LookupNetIP(rctx, "ip", host)
		cancel()
		if err != nil || len(addrs) == 0 {
			return []Check{{Area: area, Severity: Problem,
				Msg: fmt.Sprintf("target host %q does not resolve: %v", host, errOrEmpty(err)),
				Fix: "check the spelling, add the name to DNS or /etc/hosts, or use the target's IP address"}}
		}
		addr = addrs[0].Unmap()
		resolved = " (" + host + " resolves to " + addr.String() + ")"
	}
	addr = addr.Unmap()

	if !m.Protocol.Has(conf.TCP) {
		return []Check{{Area: area, Severity: Warning,
			Msg: what + resolved + ": UDP cannot be probed without speaking the service's own protocol, so reachability is not checked",
			Fix: "test it with a real client of the service through natbox"}}
	}

	dialAddr := netip.AddrPortFrom(addr, port).String()
	dctx, cancel := context.WithTimeout(ctx, d.opts.DialTimeout)
	conn, err := d.opts.Dialer.DialContext(dctx, "tcp", dialAddr)
	cancel()
	if err == nil {
		conn.Close()
		return []Check{{Area: area, Severity: OK, Msg: what + " is listening" + resolved}}
	}
	return []Check{d.dialProblem(area, what+resolved, hostPort, addr, err)}
}

// dialProblem explains a failed TCP probe in terms of what the operator can fix.
func (d *doctor) dialProblem(area, what, hostPort string, addr netip.Addr, err error) Check {
	own := d.isOwnAddr(addr)
	c := Check{Area: area, Severity: Problem}
	switch {
	case errors.Is(err, syscall.ECONNREFUSED) && own:
		c.Msg = fmt.Sprintf("nothing listens on %s, an address of this machine: the service is stopped, or it listens on another address or port", hostPort)
		c.Fix = "start the service, or correct the mapping's target (ss -ltnp shows what listens where)"
	case errors.Is(err, syscall.ECONNREFUSED):
		c.Msg = fmt.Sprintf("nothing listens on %s: the service is stopped or the port is wrong", hostPort)
		c.Fix = "start the service on that host, or correct the mapping's target"
	case isTimeout(err) && own:
		c.Msg = fmt.Sprintf("%s is an address of this machine but did not answer within %s: a local firewall drops it", hostPort, d.opts.DialTimeout)
		c.Fix = "check this machine's firewall rules (nft list ruleset) for that port"
	case isTimeout(err):
		c.Msg = fmt.Sprintf("%s did not answer within %s: host offline or a firewall drops it", hostPort, d.opts.DialTimeout)
		c.Fix = "check that the host is up and reachable from this box, and that its firewall admits this box"
	case errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH):
		c.Msg = fmt.Sprintf("no route from this box to %s", hostPort)
		c.Fix = "check this box's addresses and routes toward the target's network"
	default:
		c.Msg = fmt.Sprintf("cannot connect to %s: %v", what, err)
		c.Fix = "check the mapping's target and the network between this box and it"
	}
	return c
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// isOwnAddr reports whether addr is loopback or assigned to one of this
// machine's interfaces.
func (d *doctor) isOwnAddr(addr netip.Addr) bool {
	if addr.IsLoopback() {
		return true
	}
	for _, ifc := range d.ifaces {
		for _, p := range ifc.Addrs {
			if p.Addr().Unmap() == addr {
				return true
			}
		}
	}
	return false
}

func errOrEmpty(err error) error {
	if err == nil {
		return errors.New("no addresses")
	}
	return err
}
