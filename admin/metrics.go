package admin

import (
	"fmt"
	"math"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// StatusSource is the part of Source the metrics read.
type StatusSource interface {
	Status() Status
}

// Collector turns one Status snapshot per scrape into natbox_* metrics, so the
// data path keeps plain atomic counters and does no metrics work per packet.
// Labels stay bounded: mapping, reason, limit, peer, uplink, direction;
// never a client address.
type Collector struct {
	src StatusSource
	now func() time.Time
}

// NewCollector returns a collector over src; now is the clock for ages (nil: time.Now).
func NewCollector(src StatusSource, now func() time.Time) *Collector {
	if now == nil {
		now = time.Now
	}
	return &Collector{src: src, now: now}
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	descSessionsOpened = desc("natbox_mapping_sessions_opened_total", "Sessions opened per mapping.", "mapping")
	descSessionsActive = desc("natbox_mapping_sessions_active", "Sessions open now per mapping.", "mapping")
	descHits           = desc("natbox_mapping_hits_total", "Flows that matched a mapping, admitted or refused.", "mapping")
	descBytes          = desc("natbox_mapping_bytes_total", "Bytes carried per mapping; in is client to target, out is target to client.", "mapping", "direction")
	descRefusals       = desc("natbox_refusals_total", "Refused flows by mapping and reason; mapping is empty for flows that matched none.", "mapping", "reason")
	descDialLatency    = desc("natbox_dial_latency_seconds", "Time to connect to a mapping's target.", "mapping")
	descUDPExpired     = desc("natbox_udp_sessions_expired_total", "UDP sessions closed by their idle timeout.", "mapping")
	descUDPDropped     = desc("natbox_udp_datagrams_dropped_total", "UDP datagrams dropped: a full queue, a failed dial, stray replies.", "mapping")
	descInflightDials  = desc("natbox_inflight_dials", "Connection attempts being dialed now.")
	descBudgetHits     = desc("natbox_inflight_budget_hits_total", "Admissions refused by a shared budget, by limit.", "limit")
	descReviewOverdue  = desc("natbox_mapping_review_overdue", "1 when the mapping's review_by date has passed.", "mapping")
	descExpired        = desc("natbox_mapping_expired", "1 when the mapping's expires date has passed and natbox disabled it.", "mapping")
	descMappingUp      = desc("natbox_mapping_active", "1 when the mapping is enabled and served.", "mapping")

	descTUNUp      = desc("natbox_tun_up", "1 when the gateway's TUN link is up.", "tun")
	descTUNPackets = desc("natbox_tun_packets_total", "Packets through the gateway's TUN; in is what the kernel handed natbox.", "tun", "direction")
	descTUNBytes   = desc("natbox_tun_bytes_total", "Bytes through the gateway's TUN; in is what the kernel handed natbox.", "tun", "direction")
	descTUNDropped = desc("natbox_tun_dropped_packets_total", "Packets the kernel dropped because natbox did not read them from the TUN in time.", "tun")

	// The uplink label is the relay's host:port as configured: one series
	// per [[uplink]], at most conf.MaxUplinks.
	descUplinkHandshakeAge = desc("natbox_uplink_handshake_age_seconds", "Seconds since the last WireGuard handshake with the relay; +Inf when there was none.", "uplink")
	descUplinkBytes        = desc("natbox_uplink_bytes_total", "Bytes through the uplink; in is received from the relay.", "uplink", "direction")
	descUplinkRegistered   = desc("natbox_uplink_ports_registered", "Port specs the relay holds for this appliance.", "uplink")
	descUplinkRefused      = desc("natbox_uplink_ports_refused", "Port specs the relay refused.", "uplink")
	descUplinkState        = desc("natbox_uplink_registered", "1 once the relay answered every port the appliance asked for (its state is registered).", "uplink")

	descPeerHandshakeAge = desc("natbox_relay_peer_handshake_age_seconds", "Seconds since the last handshake with a peer; +Inf when there was none.", "peer")
	descPeerBytes        = desc("natbox_relay_peer_bytes_total", "Bytes through the relay per peer; in is received from the peer.", "peer", "direction")
	descPeerActive       = desc("natbox_relay_peer_sessions_active", "Sessions open now per relay peer.", "peer")
	descPeerOpened       = desc("natbox_relay_peer_sessions_opened_total", "Sessions opened per relay peer.", "peer")
	descPeerDialFailures = desc("natbox_relay_peer_dial_failures_total", "Public TCP connections reset because the peer refused or did not answer the flow inside the tunnel.", "peer")
	descPeerRegistered   = desc("natbox_relay_peer_ports_registered", "Port specs a peer holds on the relay.", "peer")
	descPeerRefused      = desc("natbox_relay_peer_ports_refused", "Port specs the relay refused to a peer.", "peer")

	descPeerCtlRefusals = desc("natbox_relay_peer_control_refusals_total", "Control connections the relay refused or ended per peer, by reason.", "peer", "reason")

	allDescs = []*prometheus.Desc{
		descSessionsOpened, descSessionsActive, descHits, descBytes, descRefusals, descDialLatency,
		descUDPExpired, descUDPDropped, descInflightDials, descBudgetHits, descReviewOverdue, descExpired, descMappingUp,
		descTUNUp, descTUNPackets, descTUNBytes, descTUNDropped,
		descUplinkHandshakeAge, descUplinkBytes, descUplinkRegistered, descUplinkRefused, descUplinkState,
		descPeerHandshakeAge, descPeerBytes, descPeerActive, descPeerOpened, descPeerDialFailures, descPeerRegistered, descPeerRefused,
		descPeerCtlRefusals,
	}
)

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	st := c.src.Status()
	now := st.Time
	if now.IsZero() {
		now = c.now()
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	collectCounters(ch, "natbox_forwarder_", "forwarder", st.Forwarder, nil)
	for _, stack := range sortedKeys(st.Netstack) {
		collectCounters(ch, "natbox_netstack_", "userspace network stack", st.Netstack[stack], []string{"stack"}, stack)
	}
	for _, m := range st.Mappings {
		collectCounters(ch, "natbox_mapping_", "mapping", m.Stats, []string{"mapping"}, m.Name)
		counter(descSessionsOpened, m.SessionsOpened, m.Name)
		gauge(descSessionsActive, float64(m.SessionsActive), m.Name)
		counter(descHits, m.Hits, m.Name)
		counter(descBytes, m.BytesIn, m.Name, DirectionIn)
		counter(descBytes, m.BytesOut, m.Name, DirectionOut)
		for _, reason := range sortedKeys(m.Refusals) {
			counter(descRefusals, m.Refusals[reason], m.Name, reason)
		}
		ch <- prometheus.MustNewConstHistogram(descDialLatency, m.DialLatency.Count, m.DialLatency.SumSeconds,
			bucketMap(m.DialLatency.Buckets), m.Name)
		counter(descUDPExpired, m.UDPSessionsExpired, m.Name)
		counter(descUDPDropped, m.UDPDropped, m.Name)
		gauge(descReviewOverdue, boolValue(m.ReviewOverdue), m.Name)
		gauge(descExpired, boolValue(m.State == StateExpired), m.Name)
		gauge(descMappingUp, boolValue(m.State == StateActive), m.Name)
	}
	for _, reason := range sortedKeys(st.Refusals) {
		counter(descRefusals, st.Refusals[reason], "", reason)
	}
	gauge(descInflightDials, float64(st.InflightDials))
	for _, limit := range sortedKeys(st.BudgetHits) {
		counter(descBudgetHits, st.BudgetHits[limit], limit)
	}
	if t := st.TUN; t != nil && t.Error == "" {
		gauge(descTUNUp, boolValue(t.Up), t.Name)
		counter(descTUNPackets, t.PacketsIn, t.Name, DirectionIn)
		counter(descTUNPackets, t.PacketsOut, t.Name, DirectionOut)
		counter(descTUNBytes, t.BytesIn, t.Name, DirectionIn)
		counter(descTUNBytes, t.BytesOut, t.Name, DirectionOut)
		counter(descTUNDropped, t.DroppedIn, t.Name)
	}
	for _, u := range st.Uplinks {
		gauge(descUplinkHandshakeAge, handshakeAge(now, u.LastHandshake), u.Relay)
		counter(descUplinkBytes, u.BytesIn, u.Relay, DirectionIn)
		counter(descUplinkBytes, u.BytesOut, u.Relay, DirectionOut)
		gauge(descUplinkRegistered, float64(len(u.Registered)), u.Relay)
		gauge(descUplinkRefused, float64(len(u.Refused)), u.Relay)
		gauge(descUplinkState, boolValue(u.State == UplinkRegistered), u.Relay)
		collectCounters(ch, "natbox_uplink_", "uplink", u.Stats, []string{"uplink"}, u.Relay)
	}
	if r := st.Relay; r != nil {
		collectCounters(ch, "natbox_relay_", "relay", r.Stats, nil)
		for _, p := range r.Peers {
			collectCounters(ch, "natbox_relay_peer_", "relay peer", p.Stats, []string{"peer"}, p.Name)
			gauge(descPeerHandshakeAge, handshakeAge(now, p.LastHandshake), p.Name)
			counter(descPeerBytes, p.BytesIn, p.Name, DirectionIn)
			counter(descPeerBytes, p.BytesOut, p.Name, DirectionOut)
			gauge(descPeerActive, float64(p.SessionsActive), p.Name)
			counter(descPeerOpened, p.SessionsOpened, p.Name)
			counter(descPeerDialFailures, p.DialFailures, p.Name)
			gauge(descPeerRegistered, float64(len(p.Registered)), p.Name)
			gauge(descPeerRefused, float64(len(p.Refused)), p.Name)
			for reason, n := range p.ControlRefusals {
				counter(descPeerCtlRefusals, n, p.Name, reason)
			}
		}
	}
}

// collectCounters exports c, the fields CountersOf took from a stats struct:
// each counter as <prefix><name>_total, each gauge as <prefix><name>, each
// reason group as <prefix><group>_total{reason}. The descriptors are made per
// scrape because the names come from the struct, so a new field needs no code
// here; Describe does not list them, which a non-pedantic registry allows.
func collectCounters(ch chan<- prometheus.Metric, prefix, what string, c Counters, labels []string, values ...string) {
	for _, name := range sortedKeys(c.Counters) {
		d := desc(prefix+name+"_total", fmt.Sprintf("The %s counter %s (natbox status --json shows it too).", what, name), labels...)
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(c.Counters[name]), values...)
	}
	for _, name := range sortedKeys(c.Gauges) {
		d := desc(prefix+name, fmt.Sprintf("The %s gauge %s (natbox status --json shows it too).", what, name), labels...)
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(c.Gauges[name]), values...)
	}
	for _, group := range sortedKeys(c.Reasons) {
		d := desc(prefix+group+"_total", fmt.Sprintf("The %s counters %s, by reason (natbox status --json shows them too).", what, group),
			append(append([]string(nil), labels...), "reason")...)
		for _, reason := range sortedKeys(c.Reasons[group]) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(c.Reasons[group][reason]), append(append([]string(nil), values...), reason)...)
		}
	}
}

// handshakeAge is +Inf for "never", so an alert on age > 180 fires for a
// tunnel that never came up as well as for one that went quiet.
func handshakeAge(now, last time.Time) float64 {
	if last.IsZero() {
		return math.Inf(1)
	}
	return max(now.Sub(last).Seconds(), 0)
}

func bucketMap(bs []Bucket) map[float64]uint64 {
	m := make(map[float64]uint64, len(bs))
	for _, b := range bs {
		m[b.UpperBoundSeconds] = b.Count
	}
	return m
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
