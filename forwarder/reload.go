package forwarder

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

// reviewWarnEvery spaces the review_by reminders of one mapping.
const reviewWarnEvery = 24 * time.Hour

// Diff names the mappings a Reload added, changed and removed, and counts
// the sessions it closed because their mapping no longer admits them.
type Diff struct {
	Added, Changed, Removed []string
	SessionsClosed          int
}

// Reload compiles cfg and swaps it in atomically; on error nothing changes.
// Sessions of unchanged mappings are untouched. Sessions of removed,
// disabled or expired mappings close at once. Sessions of a changed mapping
// close when its protocol, listen, target, PROXY framing or ingress no
// longer fit them, or when its allow/deny no longer admits their client;
// otherwise they continue under the new rule (limits, idle timeout).
func (e *Engine) Reload(cfg *conf.Config) (Diff, error) { return e.ReloadGroups(cfg, Groups{}) }

// ReloadGroups is Reload with mappings put under shared quotas (see
// Groups): the relay swaps its rules this way, without a file. A group's
// counters survive reloads while its name does.
func (e *Engine) ReloadGroups(cfg *conf.Config, g Groups) (Diff, error) {
	rs, err := CompileGroups(cfg, g)
	if err != nil {
		return Diff{}, fmt.Errorf("reload: %w", err)
	}
	e.reloadMu.Lock()
	defer e.reloadMu.Unlock()
	old := e.rules.Load()
	diff := diffRuleSets(old, rs)
	e.bindStates(rs)
	e.rules.Store(rs)

	now := e.clock.Now()
	closed := 0
	for _, s := range e.liveSessions(func(*session) bool { return true }) {
		if reason := reloadVerdict(s, rs, now); reason != "" {
			s.close(reason)
			closed++
		}
	}
	lvl := zap.InfoLevel
	if e.opts.QuietRules {
		lvl = zap.DebugLevel
	}
	for _, name := range diff.Added {
		if ce := e.log.Check(lvl, "mapping loaded"); ce != nil {
			ce.Write(ruleFields(rs.byName[name])...)
		}
	}
	if ce := e.log.Check(lvl, "config reloaded"); ce != nil {
		ce.Write(zap.Int("count", len(rs.rules)), zap.Strings("added", diff.Added),
			zap.Strings("changed", diff.Changed), zap.Strings("removed", diff.Removed), zap.Int("sessions_closed", closed))
	}
	diff.SessionsClosed = closed
	return diff, nil
}

func diffRuleSets(old, cur *RuleSet) Diff {
	var d Diff
	for _, r := range cur.rules {
		o, ok := old.byName[r.Name]
		switch {
		case !ok:
			d.Added = append(d.Added, r.Name)
		case !sameMapping(o.Mapping, r.Mapping):
			d.Changed = append(d.Changed, r.Name)
		}
	}
	for _, r := range old.rules {
		if _, ok := cur.byName[r.Name]; !ok {
			d.Removed = append(d.Removed, r.Name)
		}
	}
	return d
}

// reloadVerdict decides whether a live session may continue under rs: it
// returns the close reason, or "" after moving the session onto its new rule.
func reloadVerdict(s *session, rs *RuleSet, now time.Time) string {
	old := s.rule.Load()
	r := rs.byName[old.Name]
	switch {
	case r == nil:
		return "removed"
	case !r.enabled:
		return "disabled"
	case r.expiredAt(now):
		return "expired"
	case !sameRoute(old.Mapping, r.Mapping), !r.ingress.serves(s.ingress):
		return "changed"
	case r.admits(s.client.Addr()) != refusalNone:
		return "not_allowed"
	}
	if r != old {
		s.rule.Store(r)
		s.idle.setIdle(r.idleFor(s.proto))
	}
	return ""
}

// runSweep checks mapping expiry and review dates every SweepInterval
// until the engine stops or ctx is done.
func (e *Engine) runSweep(ctx context.Context) {
	defer close(e.sweepDone)
	t := time.NewTicker(e.opts.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-e.stopSweep:
			return
		case <-ctx.Done():
			return
		case <-t.C:
			e.sweep()
			e.sources.sweep(e.clock.Now())
			if e.opts.onSweep != nil {
				e.opts.onSweep()
			}
		}
	}
}

// sweep closes the sessions of mappings whose expires passed (Lookup
// already refuses their new flows), warning once per expiry, and reminds
// once a day about mappings past their review_by date.
func (e *Engine) sweep() {
	e.reloadMu.Lock()
	defer e.reloadMu.Unlock()
	rs := e.rules.Load()
	now := e.clock.Now()
	for _, r := range rs.rules {
		st := r.state
		if r.enabled && r.expiredAt(now) {
			if st.warnedExpiry != r.expires {
				st.warnedExpiry = r.expires
				e.log.Warn("mapping expired; its flows are refused until expires is moved or removed",
					zap.String("rule", r.Name), zap.Time("expires", r.Mapping.Expires))
			}
			if st.slots.Load() > 0 {
				for _, s := range e.liveSessions(func(s *session) bool { return s.state == st }) {
					s.close("expired")
				}
			}
		}
		if reviewOverdue(r, now) && (st.lastReviewWarn.IsZero() || now.Sub(st.lastReviewWarn) >= reviewWarnEvery) {
			st.lastReviewWarn = now
			e.log.Warn("mapping review overdue; review it and move review_by",
				zap.String("rule", r.Name), zap.Time("review_by", r.Mapping.ReviewBy))
		}
	}
}

func reviewOverdue(r *Rule, now time.Time) bool {
	return !r.Mapping.ReviewBy.IsZero() && !now.Before(r.Mapping.ReviewBy)
}
