package app

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/netstack"
	"github.com/natbox/natbox/tunnel"
)

// handMade says where each field that status.go shows by hand (the ...ByHand
// lists) appears: its key in the JSON object of its section, and the metric
// family carrying it, or "-" and why it has none.
var handMade = map[string]struct{ json, metric string }{
	"forwarder.Status.Mappings":      {"mappings", "natbox_mapping_hits_total"},
	"forwarder.Status.Unmatched":     {"refusals", "natbox_refusals_total"},
	"forwarder.Status.InflightDials": {"inflight_dials", "natbox_inflight_dials"},

	"forwarder.MappingStatus.Name":           {"name", "natbox_mapping_active"}, // the mapping label
	"forwarder.MappingStatus.Protocol":       {"protocol", "- configuration text"},
	"forwarder.MappingStatus.Listen":         {"listen", "- configuration text"},
	"forwarder.MappingStatus.Target":         {"target", "- configuration text"},
	"forwarder.MappingStatus.Enabled":        {"state", "natbox_mapping_active"},
	"forwarder.MappingStatus.Expired":        {"state", "natbox_mapping_expired"},
	"forwarder.MappingStatus.ReviewOverdue":  {"review_overdue", "natbox_mapping_review_overdue"},
	"forwarder.MappingStatus.Expires":        {"expires", "natbox_mapping_expired"},
	"forwarder.MappingStatus.ReviewBy":       {"review_by", "natbox_mapping_review_overdue"},
	"forwarder.MappingStatus.Hits":           {"hits", "natbox_mapping_hits_total"},
	"forwarder.MappingStatus.SessionsOpened": {"sessions_opened", "natbox_mapping_sessions_opened_total"},
	"forwarder.MappingStatus.SessionsActive": {"sessions_active", "natbox_mapping_sessions_active"},
	"forwarder.MappingStatus.BytesIn":        {"bytes_in", "natbox_mapping_bytes_total"},
	"forwarder.MappingStatus.BytesOut":       {"bytes_out", "natbox_mapping_bytes_total"},
	"forwarder.MappingStatus.LastUsed":       {"last_used", "- a time; rate(natbox_mapping_sessions_opened_total) says it"},
	"forwarder.MappingStatus.Refusals":       {"refusals", "natbox_refusals_total"},
	"forwarder.MappingStatus.UDPExpired":     {"udp_sessions_expired", "natbox_udp_sessions_expired_total"},
	"forwarder.MappingStatus.UDPDropped":     {"udp_dropped", "natbox_udp_datagrams_dropped_total"},
	"forwarder.MappingStatus.DialLatency":    {"dial_latency", "natbox_dial_latency_seconds"},

	"tunnel.UplinkStatus.State":          {"state", "natbox_uplink_registered"},
	"tunnel.UplinkStatus.Relay":          {"relay", "- configuration text"},
	"tunnel.UplinkStatus.Endpoint":       {"endpoint", "- an address"},
	"tunnel.UplinkStatus.Peer":           {"peer", "- a name"},
	"tunnel.UplinkStatus.LastHandshake":  {"last_handshake", "natbox_uplink_handshake_age_seconds"},
	"tunnel.UplinkStatus.RxBytes":        {"bytes_in", "natbox_uplink_bytes_total"},
	"tunnel.UplinkStatus.TxBytes":        {"bytes_out", "natbox_uplink_bytes_total"},
	"tunnel.UplinkStatus.Registered":     {"registered", "natbox_uplink_ports_registered"},
	"tunnel.UplinkStatus.Refused":        {"refused", "natbox_uplink_ports_refused"},
	"tunnel.UplinkStatus.Transport":      {"transport", "natbox_uplink_using_tcp"},
	"tunnel.UplinkStatus.SwitchReason":   {"switch_reason", "- text; natbox_uplink_transport_switches_total counts them"},
	"tunnel.UplinkStatus.TransportError": {"transport_error", "- text; natbox_uplink_tcp_connect_failures_total counts them"},
	"tunnel.UplinkStatus.TCPCongestion":  {"tcp_congestion", "- a name"},

	"tunnel.RelayStatus.Peers":         {"peers", "natbox_relay_peer_bytes_total"},
	"tunnel.RelayStatus.TCPCongestion": {"tcp_congestion", "- a name"},

	"tunnel.RelayPeerStatus.Name":            {"name", "natbox_relay_peer_bytes_total"}, // the peer label
	"tunnel.RelayPeerStatus.PublicKey":       {"public_key", "- a key"},
	"tunnel.RelayPeerStatus.Address":         {"address", "- an address"},
	"tunnel.RelayPeerStatus.Endpoint":        {"endpoint", "- an address"},
	"tunnel.RelayPeerStatus.LastHandshake":   {"last_handshake", "natbox_relay_peer_handshake_age_seconds"},
	"tunnel.RelayPeerStatus.RxBytes":         {"bytes_in", "natbox_relay_peer_bytes_total"},
	"tunnel.RelayPeerStatus.TxBytes":         {"bytes_out", "natbox_relay_peer_bytes_total"},
	"tunnel.RelayPeerStatus.Ports":           {"registered", "natbox_relay_peer_ports_registered"},
	"tunnel.RelayPeerStatus.Refused":         {"refused", "natbox_relay_peer_ports_refused"},
	"tunnel.RelayPeerStatus.SessionsActive":  {"sessions_active", "natbox_relay_peer_sessions_active"},
	"tunnel.RelayPeerStatus.SessionsOpened":  {"sessions_opened", "natbox_relay_peer_sessions_opened_total"},
	"tunnel.RelayPeerStatus.DialFailures":    {"dial_failures", "natbox_relay_peer_dial_failures_total"},
	"tunnel.RelayPeerStatus.ControlRefusals": {"control_refusals", "natbox_relay_peer_control_refusals_total"},
}

// section is one status struct and where its fields land.
type section struct {
	v      reflect.Value // the filled struct
	byHand []string
	parent map[string]any // the JSON object holding the hand-made keys
	stats  any            // the JSON admin.Counters object of the generic fields
	prefix string         // metric name prefix of the generic fields
	labels map[string]string
}

// TestEveryStatsFieldIsExported fills every field of the netstack, forwarder
// and tunnel status structs with a distinct value, converts them as natbox
// status does, and checks that each field reaches the JSON status and the
// /metrics collector. A field added to one of these structs passes without
// more code when it is an integer, a bool or a group of them (admin.CountersOf);
// any other field fails here until it is shown by hand.
func TestEveryStatsFieldIsExported(t *testing.T) {
	n := uint64(100)
	var stacks [3]netstack.Stats
	for i := range stacks {
		fill(t, reflect.ValueOf(&stacks[i]).Elem(), &n)
	}
	var fs forwarder.Status
	var us tunnel.UplinkStatus
	var rs tunnel.RelayStatus
	fill(t, reflect.ValueOf(&fs).Elem(), &n)
	fill(t, reflect.ValueOf(&us).Elem(), &n)
	fill(t, reflect.ValueOf(&rs).Elem(), &n)

	st := engineStatus(fs)
	st.Time = time.Now()
	u := uplinkStatus(&conf.Uplink{Address: netip.MustParseAddr("100.96.0.2")}, us)
	st.Uplinks = []admin.Uplink{u}
	st.Relay = relayStatus(&conf.RelayConfig{}, rs)
	st.Netstack = map[string]admin.Counters{
		"tun": netstackStatus(stacks[0]), "uplink": netstackStatus(stacks[1]), "relay": netstackStatus(stacks[2]),
	}
	doc, metrics := render(t, st)

	mapping0 := index(doc, "mappings", 0)
	relay := index(doc, "relay")
	peer0 := index(relay, "peers", 0)
	sections := []section{
		{v: reflect.ValueOf(fs), byHand: engineByHand, parent: doc, stats: doc["forwarder"], prefix: "natbox_forwarder_"},
		{v: reflect.ValueOf(fs.Mappings[0]), byHand: mappingByHand, parent: mapping0, stats: mapping0["stats"],
			prefix: "natbox_mapping_", labels: map[string]string{"mapping": fs.Mappings[0].Name}},
		{v: reflect.ValueOf(us), byHand: uplinkByHand, parent: index(doc, "uplinks", 0), stats: index(doc, "uplinks", 0)["stats"],
			prefix: "natbox_uplink_", labels: map[string]string{"uplink": us.Relay}},
		{v: reflect.ValueOf(rs), byHand: relayByHand, parent: relay, stats: relay["stats"], prefix: "natbox_relay_"},
		{v: reflect.ValueOf(rs.Peers[0]), byHand: relayPeerByHand, parent: peer0, stats: peer0["stats"],
			prefix: "natbox_relay_peer_", labels: map[string]string{"peer": rs.Peers[0].Name}},
	}
	for i, name := range []string{"tun", "uplink", "relay"} {
		sections = append(sections, section{v: reflect.ValueOf(stacks[i]), stats: index(doc, "netstack")[name],
			prefix: "natbox_netstack_", labels: map[string]string{"stack": name}})
	}
	seen := map[string]bool{} // the three stacks share one struct: say each problem once
	for _, s := range sections {
		for _, p := range s.problems(metrics) {
			if !seen[p] {
				seen[p] = true
				t.Error(p)
			}
		}
	}
}

// TestExportCheckCatchesAField proves the check above fails, naming the field
// and what to do, for a field CountersOf cannot export.
func TestExportCheckCatchesAField(t *testing.T) {
	type probe struct {
		Drops uint64
		Why   string
	}
	p := probe{Drops: 7, Why: "x"}
	doc, metrics := render(t, admin.Status{Netstack: map[string]admin.Counters{"probe": admin.CountersOf(p)}})
	s := section{v: reflect.ValueOf(p), stats: index(doc, "netstack")["probe"], prefix: "natbox_netstack_",
		labels: map[string]string{"stack": "probe"}}
	got := s.problems(metrics)
	if len(got) != 1 || !strings.Contains(got[0], "app.probe.Why") || !strings.Contains(got[0], "ByHand") {
		t.Fatalf("problems = %q, want one naming app.probe.Why and what to do", got)
	}
}

// render returns st as natbox status --json prints it, decoded, and the
// collector's samples as name{label="value",...} -> value.
func render(t *testing.T, st admin.Status) (map[string]any, map[string]float64) {
	t.Helper()
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(admin.NewCollector(staticStatus(st), nil))
	fams, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	metrics := map[string]float64{}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			metrics[sampleKey(f.GetName(), m.GetLabel())] = sampleValue(m)
		}
	}
	return doc, metrics
}

type staticStatus admin.Status

func (s staticStatus) Status() admin.Status { return admin.Status(s) }

func sampleKey(name string, labels []*dto.LabelPair) string {
	var l []string
	for _, p := range labels {
		l = append(l, fmt.Sprintf("%s=%q", p.GetName(), p.GetValue()))
	}
	return name + "{" + strings.Join(l, ",") + "}"
}

func sampleValue(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	}
	return m.GetUntyped().GetValue()
}

// problems lists each field of s that does not reach both outputs.
func (s section) problems(metrics map[string]float64) []string {
	var out []string
	typ := s.v.Type()
	typeName := typ.String()
	hint := fmt.Sprintf("admin.CountersOf exports integer and bool fields and nested groups of them by itself; "+
		"show a field of another type by hand in internal/app/status.go, list it in the ByHand list of %s there "+
		"(add one if it has none) and in handMade in internal/app/export_test.go", typeName)
	for _, name := range s.byHand {
		if _, ok := typ.FieldByName(name); !ok {
			out = append(out, fmt.Sprintf("%s has no field %s: remove it from its ByHand list in internal/app/status.go", typeName, name))
		}
	}
	for i := range typ.NumField() {
		f := typ.Field(i)
		if !f.IsExported() || f.Tag.Get("stats") == "-" {
			continue
		}
		field := typeName + "." + f.Name
		if slices.Contains(s.byHand, f.Name) {
			out = append(out, s.handProblems(field, metrics)...)
			continue
		}
		key := admin.SnakeCase(f.Name)
		fv := s.v.Field(i)
		if want, ok := intValue(fv); ok {
			kind, metric := "counters", s.prefix+key+"_total"
			if _, isCounter := metrics[sampleKey(metric, s.labelPairs(""))]; !isCounter {
				kind, metric = "gauges", s.prefix+key
			}
			if got, ok := lookup(s.stats, kind, key); !ok || got != float64(want) {
				out = append(out, fmt.Sprintf("%s = %d is not in the JSON status (%s.%s is %v): %s", field, want, kind, key, got, hint))
			}
			if got, ok := metrics[sampleKey(metric, s.labelPairs(""))]; !ok || got != float64(want) {
				out = append(out, fmt.Sprintf("%s = %d is not in /metrics as %s or %s_total: %s", field, want, s.prefix+key, s.prefix+key, hint))
			}
			continue
		}
		group, ok := groupValues(fv)
		if !ok {
			out = append(out, fmt.Sprintf("%s (%s) reaches neither the JSON status nor /metrics: %s", field, f.Type, hint))
			continue
		}
		for reason, want := range group {
			if got, ok := lookup(s.stats, "reasons", key, reason); !ok || got != float64(want) {
				out = append(out, fmt.Sprintf("%s[%s] = %d is not in the JSON status (reasons.%s.%s is %v): %s", field, reason, want, key, reason, got, hint))
			}
			metric := sampleKey(s.prefix+key+"_total", s.labelPairs(reason))
			if got, ok := metrics[metric]; !ok || got != float64(want) {
				out = append(out, fmt.Sprintf("%s[%s] = %d is not in /metrics as %s: %s", field, reason, want, metric, hint))
			}
		}
	}
	return out
}

func (s section) handProblems(field string, metrics map[string]float64) []string {
	where, ok := handMade[field]
	if !ok {
		return []string{fmt.Sprintf("%s is shown by hand (a ByHand list in internal/app/status.go) but handMade in internal/app/export_test.go does not say where: add it", field)}
	}
	var out []string
	if v, ok := s.parent[where.json]; !ok || v == nil {
		out = append(out, fmt.Sprintf("%s: the JSON status has no %q next to it", field, where.json))
	}
	if !strings.HasPrefix(where.metric, "-") {
		found := false
		for k := range metrics {
			if strings.HasPrefix(k, where.metric+"{") || strings.HasPrefix(k, where.metric+"_count{") {
				found = true
				break
			}
		}
		if !found {
			out = append(out, fmt.Sprintf("%s: /metrics has no %s", field, where.metric))
		}
	}
	return out
}

// labelPairs are s's labels plus reason when it is not "", as sorted
// Prometheus label pairs.
func (s section) labelPairs(reason string) []*dto.LabelPair {
	l := make(map[string]string, len(s.labels)+1)
	for k, v := range s.labels {
		l[k] = v
	}
	if reason != "" {
		l["reason"] = reason
	}
	var out []*dto.LabelPair
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range l {
			if !yield(k) {
				return
			}
		}
	}) {
		out = append(out, &dto.LabelPair{Name: &k, Value: new(l[k])})
	}
	return out
}

func intValue(v reflect.Value) (int64, bool) {
	switch v.Kind() {
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return int64(v.Uint()), true
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return v.Int(), v.Type() != reflect.TypeFor[time.Duration]()
	case reflect.Bool:
		if v.Bool() {
			return 1, true
		}
		return 0, true
	}
	return 0, false
}

// groupValues returns a nested struct or string-keyed map of integers by
// snake_case reason.
func groupValues(v reflect.Value) (map[string]int64, bool) {
	out := map[string]int64{}
	switch {
	case v.Kind() == reflect.Struct && v.Type() != reflect.TypeFor[time.Time]():
		for i := range v.NumField() {
			if !v.Type().Field(i).IsExported() {
				continue
			}
			n, ok := intValue(v.Field(i))
			if !ok {
				return nil, false
			}
			out[admin.SnakeCase(v.Type().Field(i).Name)] = n
		}
	case v.Kind() == reflect.Map && v.Type().Key().Kind() == reflect.String:
		for it := v.MapRange(); it.Next(); {
			n, ok := intValue(it.Value())
			if !ok {
				return nil, false
			}
			out[it.Key().String()] = n
		}
	default:
		return nil, false
	}
	return out, len(out) > 0
}

// index walks a decoded JSON document by object keys and array indexes; it
// returns nil where the path does not exist.
func index(v any, path ...any) map[string]any {
	for _, p := range path {
		switch p := p.(type) {
		case string:
			m, _ := v.(map[string]any)
			v = m[p]
		case int:
			a, _ := v.([]any)
			if p >= len(a) {
				return nil
			}
			v = a[p]
		}
	}
	m, _ := v.(map[string]any)
	return m
}

func lookup(v any, path ...string) (float64, bool) {
	for _, p := range path {
		m, _ := v.(map[string]any)
		if v, _ = m[p]; v == nil {
			return 0, false
		}
	}
	f, ok := v.(float64)
	return f, ok
}

// fill sets every field of v, recursively, to a distinct non-zero value.
func fill(t *testing.T, v reflect.Value, n *uint64) {
	t.Helper()
	next := func() uint64 { *n++; return *n }
	switch v.Kind() {
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(next() % (1 << (8*v.Type().Size() - 1)))
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(int64(next() % (1 << (8*v.Type().Size() - 2))))
	case reflect.Bool:
		v.SetBool(true)
	case reflect.String:
		v.SetString("s" + strconv.FormatUint(next(), 10))
	case reflect.Struct:
		switch v.Type() {
		case reflect.TypeFor[time.Time]():
			v.Set(reflect.ValueOf(time.Unix(1_800_000_000+int64(next()), 0)))
		case reflect.TypeFor[netip.Addr]():
			i := next()
			v.Set(reflect.ValueOf(netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)})))
		default:
			for i := range v.NumField() {
				if v.Type().Field(i).IsExported() {
					fill(t, v.Field(i), n)
				}
			}
		}
	case reflect.Slice:
		s := reflect.MakeSlice(v.Type(), 1, 1)
		fill(t, s.Index(0), n)
		v.Set(s)
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fill(t, k, n)
		fill(t, e, n)
		m.SetMapIndex(k, e)
		v.Set(m)
	default:
		t.Fatalf("fill: no case for %s", v.Type())
	}
}
