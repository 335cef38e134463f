package main

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/tunnel"
)

func checkCommand() *cli.Command {
	return &cli.Command{
		Name:      "check",
		Usage:     "validate a config without touching the network and show its mappings",
		ArgsUsage: " ",
		Description: `Loads the config exactly as "natbox run" would, reports every problem at once as
FILE:LINE: key path: problem; fix, and prints the mappings it defines with their
owners and review dates, plus warnings (no owner, review overdue, expiring within
30 days, risky services exposed to everyone). A relay config (one with a [relay]
table or [[peer]] tables) is loaded as "natbox relay" would load it, and check
prints the relay's public key and each peer's tunnel address and ports.
Exit 0 when valid, 2 when not.`,
		Flags: []cli.Flag{configFlag},
		Action: func(c *cli.Context) error {
			path := c.String("config")
			if conf.IsRelayConfig(path) {
				return checkRelay(c.App.Writer, path)
			}
			cfg, warnings, err := conf.Load(path)
			if err != nil {
				return err
			}
			// Read like natbox run reads it at start, so check catches it first.
			if err := admin.CheckListen(cfg.Admin); err != nil {
				return &conf.Errors{List: []conf.Error{{Path: cfg.Path, Msg: err.Error()}}}
			}
			printMappings(c.App.Writer, cfg, time.Now())
			printBudgets(c.App.Writer, cfg)
			printUplinks(c.App.Writer, cfg)
			printWarnings(c.App.Writer, warnings)
			fmt.Fprintf(c.App.Writer, "ok: %s: %d mapping(s), %d warning(s)\n", cfg.Path, len(cfg.Mappings), len(warnings))
			return nil
		},
	}
}

// checkRelay validates a relay config as natbox relay does at start and
// prints what it would serve: its key and addresses, and each peer's tunnel
// address and port allowance.
func checkRelay(w io.Writer, path string) error {
	cfg, warnings, err := conf.LoadRelay(path)
	if err != nil {
		return err
	}
	if err := admin.CheckListen(cfg.Admin); err != nil {
		return &conf.Errors{List: []conf.Error{{Path: cfg.Path, Msg: err.Error()}}}
	}
	r := &cfg.Relay
	binds := make([]string, len(r.PublicBind))
	for i, a := range r.PublicBind {
		binds[i] = a.String()
	}
	fmt.Fprintf(w, "relay: wireguard %s, tunnel address %s, public key %s\n", r.Listen, r.Address, r.PrivateKey.Public())
	fmt.Fprintf(w, "public listeners on: %s\n", strings.Join(binds, ", "))
	peerPorts := func(p *conf.Peer) string {
		ports := make([]string, len(p.Ports))
		for j, s := range p.Ports {
			ports[j] = s.String()
		}
		return orDash(strings.Join(ports, ","))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tADDRESS\tPORTS\tPUBLIC_KEY")
	for i := range cfg.Peers {
		p := &cfg.Peers[i]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Name, p.Address, peerPorts(p), p.PublicKey)
	}
	tw.Flush()
	// The quotas in force per peer (its own or the [relay] default); "-": unlimited.
	fmt.Fprintln(w, "\nquotas per peer (\"-\": unlimited):")
	limit := func(n int) string {
		if n <= 0 {
			return "-"
		}
		return strconv.Itoa(n)
	}
	fmt.Fprintln(tw, "PEER\tADDRESS\tPORTS\tSESSIONS\tUDP\tINFLIGHT\tNEW/S\tPER_SOURCE\tNEW/S/SOURCE")
	for i := range cfg.Peers {
		p := &cfg.Peers[i]
		l := cfg.Relay.PeerLimits(p)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, p.Address, peerPorts(p),
			limit(l.MaxSessions), limit(l.MaxUDPSessions), limit(l.MaxInflight), limit(l.NewSessionsPerSecond),
			limit(l.MaxSessionsPerSource), limit(l.NewSessionsPerSourcePerSecond))
	}
	tw.Flush()
	// What the UDP allowances cost if held whole, against the caps.
	nbinds := max(1, len(cfg.Relay.PublicBind))
	per := tunnel.UDPSocketMemory(cfg.Relay.MTU)
	fmt.Fprintf(w, "\npublic UDP sockets per peer, all its UDP ports held (one per port per bind address, %d here;\n"+
		"each a goroutine and about %d KiB, plus kernel buffers while datagrams queue):\n", nbinds, per>>10)
	fmt.Fprintln(tw, "PEER\tSOCKETS\tMAX_UDP_SOCKETS\tMEMORY")
	total := 0
	for i := range cfg.Peers {
		p := &cfg.Peers[i]
		n := cfg.UDPSockets(p.Ports)
		total += n
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", p.Name, n, limit(cfg.Relay.PeerLimits(p).MaxUDPSockets), mib(n*per))
	}
	tw.Flush()
	fmt.Fprintf(w, "all peers: %d sockets (%s), relay max_udp_sockets %s\n", total, mib(total*per), limit(cfg.Relay.MaxUDPSockets))
	printWarnings(w, warnings)
	fmt.Fprintf(w, "ok: %s: relay config, %d peer(s), %d warning(s)\n", cfg.Path, len(cfg.Peers), len(warnings))
	return nil
}

// mib formats a byte count for check's cost table.
func mib(n int) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// printMappings writes the table natbox check shows: what is exposed, to whom,
// and who answers for it.
func printMappings(w io.Writer, cfg *conf.Config, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tPROTO\tLISTEN\tTARGET\tALLOW\tINGRESS\tOWNER\tREVIEW_BY\tSTATE")
	for i := range cfg.Mappings {
		m := &cfg.Mappings[i]
		allow := "anyone"
		if len(m.Allow) > 0 {
			parts := make([]string, len(m.Allow))
			for j, p := range m.Allow {
				parts[j] = p.String()
			}
			allow = strings.Join(parts, ",")
		}
		if len(m.Deny) > 0 {
			allow += fmt.Sprintf(" (deny %d)", len(m.Deny))
		}
		ingress := strings.Join(m.Ingress, ",")
		if ingress == "" {
			ingress = "all"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			m.Name, m.Protocol, m.Listen, m.Target, allow, ingress,
			orDash(m.Owner), dateOrDash(m.ReviewBy), mappingState(m, now))
	}
	tw.Flush()
}

// printBudgets writes the session budgets in force, resolved from [limits]
// and the mappings' own per-source keys.
// printUplinks prints one line per relay the appliance registers with.
func printUplinks(w io.Writer, cfg *conf.Config) {
	for _, u := range cfg.Uplinks {
		mtu := fmt.Sprintf("mtu %d", u.MTU)
		if u.MaxMTU > u.MTU {
			mtu += fmt.Sprintf(" (up to %d where the path probe passes)", u.MaxMTU)
		}
		fmt.Fprintf(w, "uplink %s: relay key %s, tunnel address %s (relay %s), keepalive %s, %s\n",
			u.Relay, u.RelayPublicKey, u.Address, u.RelayAddress, u.Keepalive, mtu)
	}
}

func printBudgets(w io.Writer, cfg *conf.Config) {
	n := func(v int) string {
		if v == 0 {
			return "unlimited"
		}
		return fmt.Sprint(v)
	}
	tcp, udp := cfg.Limits.SessionPools()
	fmt.Fprintf(w, "sessions: %s in all, tcp %s, udp %s\n", n(cfg.Limits.MaxSessions), n(tcp), n(udp))
	var own []string
	for i := range cfg.Mappings {
		m := &cfg.Mappings[i]
		if m.MaxTCPSessionsPerSource|m.MaxUDPSessionsPerSource|m.NewSessionsPerSourcePerSecond|m.NewSessionsPerSourceBurst != 0 {
			b := cfg.Limits.SourceBudget(m)
			own = append(own, fmt.Sprintf("%s (tcp %s, udp %s, %s)", m.Name, n(b.MaxTCPSessions), n(b.MaxUDPSessions), rate(b)))
		}
	}
	b := cfg.Limits.SourceBudget(&conf.Mapping{})
	line := fmt.Sprintf("per source and mapping: tcp %s, udp %s, %s", n(b.MaxTCPSessions), n(b.MaxUDPSessions), rate(b))
	if len(own) > 0 {
		line += "; own: " + strings.Join(own, ", ")
	}
	fmt.Fprintln(w, line)
}

func rate(b conf.SourceBudget) string {
	if b.RatePerSecond == 0 {
		return "new sessions unlimited"
	}
	return fmt.Sprintf("%d new/s burst %d", b.RatePerSecond, b.Burst)
}

func mappingState(m *conf.Mapping, now time.Time) string {
	switch {
	case !m.IsEnabled():
		return "disabled"
	case !m.Expires.IsZero() && !now.Before(m.Expires):
		return "expired"
	case !m.Expires.IsZero() && m.Expires.Sub(now) < 30*24*time.Hour:
		return "expires " + m.Expires.Format(time.DateOnly)
	case !m.ReviewBy.IsZero() && now.After(m.ReviewBy):
		return "review overdue"
	}
	return "active"
}

func printWarnings(w io.Writer, warnings []conf.Warning) {
	for _, wn := range warnings {
		fmt.Fprintf(w, "warning: %s\n", wn)
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func dateOrDash(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Format(time.DateOnly)
}

func genkeyCommand() *cli.Command {
	return &cli.Command{
		Name:  "genkey",
		Usage: "print a new WireGuard private key (base64, as wg genkey)",
		Description: `Example: natbox genkey > natbox.key && chmod 600 natbox.key
         natbox pubkey < natbox.key`,
		Action: func(c *cli.Context) error {
			k, err := conf.GenerateKey()
			if err != nil {
				return fmt.Errorf("generate key: %w", err)
			}
			fmt.Fprintln(c.App.Writer, k.String())
			return nil
		},
	}
}

func pubkeyCommand() *cli.Command {
	return &cli.Command{
		Name:        "pubkey",
		Usage:       "read a private key on stdin and print its public key (as wg pubkey)",
		Description: `Example: natbox pubkey < natbox.key`,
		Action: func(c *cli.Context) error {
			line, err := bufio.NewReader(c.App.Reader).ReadString('\n')
			if err != nil && err != io.EOF {
				return fmt.Errorf("read private key from stdin: %w", err)
			}
			k, err := conf.ParseKey(strings.TrimSpace(line))
			if err != nil {
				return usagef("stdin: %v; pipe in a key made by natbox genkey or wg genkey", err)
			}
			fmt.Fprintln(c.App.Writer, k.Public().String())
			return nil
		},
	}
}

func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the natbox version",
		Action: func(c *cli.Context) error {
			fmt.Fprintf(c.App.Writer, "natbox %s\n", version)
			return nil
		},
	}
}
