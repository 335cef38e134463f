package doctor

import (
	"fmt"
	"strings"
	"time"

	"github.com/natbox/natbox/conf"
)

// plainHTTPPorts are where router, camera and NAS admin pages usually answer
// without TLS.
var plainHTTPPorts = []uint16{80, 8080}

// checkExposure flags served mappings that open plain-text or high-risk
// services to everyone; acknowledge_risk silences a mapping.
func (d *doctor) checkExposure() []Check {
	const area = "exposure"
	var out []Check
	for i := range d.cfg.Mappings {
		m := &d.cfg.Mappings[i]
		if !m.ActiveAt(d.now) || m.AcknowledgeRisk != "" || !m.OpenToEveryone() {
			continue
		}
		fix := fmt.Sprintf("in mapping %q add allow = [\"<the sources that need it>\"], or set acknowledge_risk = \"<why this is fine>\"", m.Name)
		for _, port := range m.RiskyExposure() {
			out = append(out, Check{Area: area, Severity: Problem,
				Msg: fmt.Sprintf("mapping %q exposes %s (port %d) to everyone on the internet", m.Name, conf.RiskyPorts[port], port),
				Fix: fix})
		}
		if !m.Protocol.Has(conf.TCP) {
			continue
		}
		for _, port := range plainHTTPPorts {
			if m.Target.Ports.Contains(port) {
				out = append(out, Check{Area: area, Severity: Warning,
					Msg: fmt.Sprintf("mapping %q exposes plain HTTP (target port %d) to everyone: admin pages of routers, cameras and NAS boxes send passwords unencrypted", m.Name, port),
					Fix: fix + ", or serve it over HTTPS"})
			}
		}
	}
	if len(out) == 0 {
		out = append(out, Check{Area: area, Severity: OK, Msg: "no risky service is open to everyone"})
	}
	return out
}

// checkReview flags mappings that nobody answers for, whose review is
// overdue, or that expired.
func (d *doctor) checkReview() []Check {
	const area = "review"
	var out []Check
	for i := range d.cfg.Mappings {
		m := &d.cfg.Mappings[i]
		if !m.IsEnabled() {
			continue // exposes nothing
		}
		who := ownerAndDescription(m)
		switch {
		case d.expired(m):
			out = append(out, Check{Area: area, Severity: Warning,
				Msg: fmt.Sprintf("mapping %q expired on %s%s; natbox no longer serves it", m.Name, day(m.Expires), who),
				Fix: "remove the mapping, or move expires later if it is still needed"})
			continue
		case !m.Expires.IsZero() && m.Expires.Sub(d.now) <= 30*24*time.Hour:
			out = append(out, Check{Area: area, Severity: OK,
				Msg: fmt.Sprintf("mapping %q expires on %s%s", m.Name, day(m.Expires), who)})
		}
		if !m.ReviewBy.IsZero() && m.ReviewBy.Before(d.now) {
			out = append(out, Check{Area: area, Severity: Warning,
				Msg: fmt.Sprintf("mapping %q was due for review on %s%s", m.Name, day(m.ReviewBy), who),
				Fix: "ask the owner whether it is still needed, then set a new review_by or remove the mapping"})
		}
		if m.Owner == "" {
			out = append(out, Check{Area: area, Severity: Warning,
				Msg: fmt.Sprintf("mapping %q has no owner", m.Name),
				Fix: "set owner = \"<who answers for this open port>\""})
		}
	}
	if len(out) == 0 {
		out = append(out, Check{Area: area, Severity: OK, Msg: "every mapping has an owner and none is overdue for review"})
	}
	return out
}

func ownerAndDescription(m *conf.Mapping) string {
	var parts []string
	if m.Owner != "" {
		parts = append(parts, "owner "+m.Owner)
	}
	if m.Description != "" {
		parts = append(parts, fmt.Sprintf("%q", m.Description))
	}
	if len(parts) == 0 {
		return ""
	}
	return " (" + strings.Join(parts, ", ") + ")"
}

func day(t time.Time) string { return t.Format(time.DateOnly) }
