package admin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/natbox/natbox/conf"
)

// WriteJSON writes v as indented JSON: the --json output of the CLI.
func WriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// RenderStatus writes st as aligned tables for people: the mappings, then the
// uplink and the relay when present. Ages are measured from st.Time.
func RenderStatus(w io.Writer, st Status) error {
	// Sections are separated by a blank line; the first one has none before it.
	var buf bytes.Buffer
	if err := renderStatus(&buf, st); err != nil {
		return err
	}
	_, err := w.Write(bytes.TrimLeft(buf.Bytes(), "\n"))
	return err
}

func renderStatus(w io.Writer, st Status) error {
	now := st.Time
	if now.IsZero() {
		now = time.Now()
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	switch {
	case len(st.Mappings) == 0 && st.Relay != nil:
		// A relay has peers, not mappings: its section below says it all.
	case len(st.Mappings) == 0:
		fmt.Fprintln(tw, "no mappings")
	default:
		fmt.Fprintln(tw, "MAPPING\tSTATE\tPROTO\tLISTEN\tTARGET\tSESSIONS\tHITS\tIN\tOUT\tLAST USED\tREFUSALS")
		for _, m := range st.Mappings {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\n",
				m.Name, m.State, m.Protocol, m.Listen, m.Target, m.SessionsActive, m.Hits,
				formatBytes(m.BytesIn), formatBytes(m.BytesOut), formatAgo(now, m.LastUsed), formatCounts(m.Refusals))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	var notes []string
	for _, m := range st.Mappings {
		if m.ReviewOverdue {
			notes = append(notes, fmt.Sprintf("review overdue: %s (review by %s%s)", m.Name, formatDate(m.ReviewBy), whoWhat(m)))
		}
		if m.State == StateExpired {
			notes = append(notes, fmt.Sprintf("expired: %s on %s%s; natbox no longer serves it", m.Name, formatDate(m.Expires), whoWhat(m)))
		}
		if m.RelayRefusal != "" {
			notes = append(notes, fmt.Sprintf("relay refused: %s: %s", m.Name, m.RelayRefusal))
		}
		if m.UDPDropped > 0 {
			notes = append(notes, fmt.Sprintf("UDP dropped: %s: %d datagrams (a full session queue, a failed dial or stray replies)", m.Name, m.UDPDropped))
		}
		if c := formatStats(m.Stats, nil); c != "" {
			notes = append(notes, fmt.Sprintf("mapping %s: %s", m.Name, c))
		}
	}
	if st.Forwarder.Gauges["shutting_down"] != 0 {
		notes = append(notes, "shutting down: no new flows are admitted")
	}
	if c := formatCounts(st.Refusals); c != "-" {
		notes = append(notes, "refused without a mapping: "+c)
	}
	if c := formatCounts(st.BudgetHits); c != "-" {
		notes = append(notes, "budget limits hit: "+c)
	}
	if len(notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range notes {
			fmt.Fprintln(w, n)
		}
	}

	if t := st.TUN; t != nil {
		fmt.Fprintln(w)
		renderTUN(w, t)
	}
	renderNetstack(w, st.Netstack)
	if len(st.Uplinks) > 1 {
		up := 0
		for _, u := range st.Uplinks {
			if u.State == UplinkRegistered {
				up++
			}
		}
		fmt.Fprintf(w, "\nuplinks: %d of %d relays registered\n", up, len(st.Uplinks))
	}
	for i := range st.Uplinks {
		fmt.Fprintln(w)
		renderUplink(w, now, &st.Uplinks[i])
	}
	if r := st.Relay; r != nil {
		fmt.Fprintln(w)
		if err := renderRelay(w, now, r); err != nil {
			return err
		}
	}
	return nil
}

func renderTUN(w io.Writer, t *TUN) {
	if t.Error != "" {
		fmt.Fprintf(w, "tun %s: %s\n", t.Name, t.Error)
		return
	}
	state := "up"
	if !t.Up {
		state = "DOWN: nothing reaches natbox through it (ip link set " + t.Name + " up)"
	}
	fmt.Fprintf(w, "tun %s, %s, mtu %d\n", t.Name, state, t.MTU)
	fmt.Fprintf(w, "  traffic     in %s (%d packets), out %s (%d packets)\n",
		formatBytes(t.BytesIn), t.PacketsIn, formatBytes(t.BytesOut), t.PacketsOut)
	if t.DroppedIn > 0 {
		fmt.Fprintf(w, "  dropped     %d packets (%.2f %%) the kernel could not queue for natbox (queue %d): natbox is short of CPU for this load\n",
			t.DroppedIn, 100*float64(t.DroppedIn)/float64(t.DroppedIn+t.PacketsIn), t.TxQueueLen)
	}
}

// netstackRoutine are the netstack counters of normal traffic, which natbox
// status leaves to --json and /metrics. Every other counter (drops, errors,
// and whatever is added to netstack.Stats later) is shown when it is not 0.
var netstackRoutine = map[string]bool{
	"packets_in": true, "bytes_in": true, "packets_out": true, "bytes_out": true,
	"read_batches": true, "write_batches": true, "gro_coalesced": true, "direct_writes": true,
	"acks_held": true, "acks_suppressed": true,
	"gso_frames_in": true, "gso_frames_out": true,
	"udp_fast_path": true, "udp_reassembled": true, "udp_sent": true,
	"tcp_requests": true, "tcp_rejected": true, "tcp_retransmits": true, "time_wait_reopened": true,
	"tcp_sack_recovery": true, "tcp_fast_recovery": true, "tcp_timeouts": true, "tcp_spurious_recovery": true,
	"tcp_bulk_promoted": true,
}

// renderNetstack writes one line per stack whose drop and error counters are
// not all 0, and nothing when every stack is quiet.
func renderNetstack(w io.Writer, stacks map[string]Counters) {
	var lines []string
	for _, name := range sortedKeys(stacks) {
		c := stacks[name]
		if s := formatStats(c, netstackRoutine); s != "" {
			lines = append(lines, fmt.Sprintf("  %-8s %s (of %d TCP requests, %d packets in)", name, s, c.Counters["tcp_requests"], c.Counters["packets_in"]))
		}
	}
	if len(lines) == 0 {
		return
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "netstack drops and errors (every counter: natbox status --json, /metrics)")
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
}

// formatStats lists c's non-zero counters, then its non-zero reason groups
// as group(reason=n ...), leaving out the names in skip; "" when none is left.
// Gauges are left to --json and /metrics.
func formatStats(c Counters, skip map[string]bool) string {
	var parts []string
	for _, k := range sortedKeys(c.Counters) {
		if c.Counters[k] != 0 && !skip[k] {
			parts = append(parts, fmt.Sprintf("%s=%d", k, c.Counters[k]))
		}
	}
	for _, g := range sortedKeys(c.Reasons) {
		if r := formatCounts(c.Reasons[g]); r != "-" && !skip[g] {
			parts = append(parts, g+"("+r+")")
		}
	}
	return strings.Join(parts, " ")
}

func renderUplink(w io.Writer, now time.Time, u *Uplink) {
	relay := u.Relay
	if u.Endpoint != "" && u.Endpoint != u.Relay {
		relay += " (" + u.Endpoint + ")"
	}
	fmt.Fprintf(w, "uplink to %s, tunnel address %s\n", relay, u.Address)
	fmt.Fprintf(w, "  state       %s\n", orDash(u.State))
	fmt.Fprintf(w, "  handshake   %s\n", formatAgo(now, u.LastHandshake))
	if u.Transport != "" && u.Transport != "udp" { // udp is routine
		why := u.SwitchReason
		if u.TransportError != "" {
			why = "failing: " + u.TransportError
		}
		if u.TCPCongestion != "" && u.Transport == "tcp" {
			why += "; congestion control " + u.TCPCongestion
		}
		fmt.Fprintf(w, "  transport   %s (%s)\n", u.Transport, why)
	}
	if mtu, ok := u.Stats.Gauges["mtu"]; ok {
		fmt.Fprintf(w, "  tunnel mtu  %d\n", mtu) // uplink.mtu, or more where the path probe passed
	}
	fmt.Fprintf(w, "  traffic     in %s, out %s\n", formatBytes(u.BytesIn), formatBytes(u.BytesOut))
	if line := pathLoss(u.Stats, u.Transport); line != "" {
		fmt.Fprintf(w, "  path loss   %s\n", line)
	}
	fmt.Fprintf(w, "  registered  %s\n", formatList(u.Registered))
	for _, r := range u.Refused {
		fmt.Fprintf(w, "  refused     %s: %s\n", r.Port, r.Reason)
	}
}

// pathLoss describes the loss the uplink's counters estimate
// (tunnel/lossmeter.go), with a pointer to what to do where the path loses
// as much as makes an "auto" uplink move to TCP by default; "" before any
// loss.
func pathLoss(c Counters, transport string) string {
	in, lost := c.Counters["datagrams_in"], c.Counters["datagrams_lost"]
	if lost == 0 || in == 0 {
		return ""
	}
	share := float64(lost) / float64(in+lost)
	line := fmt.Sprintf("%.3f %% of the messages from the relay (%d of %d)", share*100, lost, in+lost)
	if share >= conf.DefaultLossFallbackRate && transport != "tcp" {
		line += `; TCP through the tunnel crawls over UDP on such a path (README, "Slow through the relay")`
	}
	return line
}

func renderRelay(w io.Writer, now time.Time, r *Relay) error {
	peers := "peers"
	if len(r.Peers) == 1 {
		peers = "peer"
	}
	fmt.Fprintf(w, "relay listening on %s, %d %s\n", r.Listen, len(r.Peers), peers)
	if r.TCPCongestion != "" {
		fmt.Fprintf(w, "tcp transport congestion control: %s\n", r.TCPCongestion)
	}
	if len(r.Peers) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tADDRESS\tENDPOINT\tHANDSHAKE\tIN\tOUT\tSESSIONS\tREGISTERED\tREFUSED")
	for _, p := range r.Peers {
		refused := make([]string, len(p.Refused))
		for i, rf := range p.Refused {
			refused[i] = rf.Port
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n",
			p.Name, p.Address, orDash(p.Endpoint), formatAgo(now, p.LastHandshake),
			formatBytes(p.BytesIn), formatBytes(p.BytesOut), p.SessionsActive,
			formatList(p.Registered), formatList(refused))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if c := formatStats(r.Stats, nil); c != "" {
		fmt.Fprintf(w, "relay: %s\n", c)
	}
	for _, p := range r.Peers {
		if c := formatStats(p.Stats, nil); c != "" {
			fmt.Fprintf(w, "%s: %s\n", p.Name, c)
		}
		if p.DialFailures > 0 {
			fmt.Fprintf(w, "%s: %d public connections reset: the appliance refused them or did not answer (its natbox status says why)\n",
				p.Name, p.DialFailures)
		}
		if len(p.ControlRefusals) > 0 {
			fmt.Fprintf(w, "%s: control connections refused: %s\n", p.Name, formatCounts(p.ControlRefusals))
		}
	}
	return nil
}

// RenderSessions writes the sessions as an aligned table for people.
func RenderSessions(w io.Writer, sessions []Session) error {
	if len(sessions) == 0 {
		_, err := fmt.Fprintln(w, "no sessions")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MAPPING\tPROTO\tCLIENT\tTARGET\tAGE\tIDLE\tIN\tOUT\tVIA")
	for _, s := range sessions {
		via := orDash(s.Ingress)
		if s.Peer != "" {
			via = "peer " + s.Peer
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			s.Mapping, s.Protocol, s.Client, s.Target,
			formatSeconds(s.AgeSeconds), formatSeconds(s.IdleSeconds),
			formatBytes(s.BytesIn), formatBytes(s.BytesOut), via)
	}
	return tw.Flush()
}

func whoWhat(m Mapping) string {
	var parts []string
	if m.Owner != "" {
		parts = append(parts, "owner "+m.Owner)
	} else {
		parts = append(parts, "no owner")
	}
	if m.Description != "" {
		parts = append(parts, fmt.Sprintf("%q", m.Description))
	}
	return ", " + strings.Join(parts, ", ")
}

func formatDate(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Format(time.DateOnly)
}

// formatBytes uses binary units with one decimal: 0 B, 512 B, 1.5 KiB, 3.2 GiB.
func formatBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func formatAgo(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return formatSeconds(now.Sub(t).Seconds()) + " ago"
}

// formatSeconds gives a duration its largest whole unit: 45s, 12m, 3h, 5d.
func formatSeconds(s float64) string {
	d := time.Duration(max(s, 0) * float64(time.Second))
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d/time.Hour))
	}
	return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
}

// formatCounts lists the non-zero counts as key=n, or "-" when there are none.
func formatCounts(m map[string]uint64) string {
	var parts []string
	for _, k := range sortedKeys(m) {
		if m[k] != 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
		}
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, " ")
}

func formatList(l []string) string {
	if len(l) == 0 {
		return "-"
	}
	return strings.Join(l, ",")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
