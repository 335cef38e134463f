package admin

import (
	"reflect"
	"strings"
	"time"
	"unicode"
)

// Counters holds the numeric fields of a component's stats struct, taken by
// reflection (CountersOf), so a field added to such a struct reaches natbox
// status and /metrics without more code. Keys are the field names in
// snake_case ("TCPInFlightDrops" is "tcp_in_flight_drops").
type Counters struct {
	// Counters only ever grow; /metrics shows each as <prefix><name>_total.
	Counters map[string]uint64 `json:"counters,omitempty"`
	// Gauges are current values (true is 1); /metrics shows each as <prefix><name>.
	Gauges map[string]int64 `json:"gauges,omitempty"`
	// Reasons are groups of counters by reason, from a nested struct of
	// counters or a map[string]uint64; /metrics shows each group as
	// <prefix><group>_total with a reason label.
	Reasons map[string]map[string]uint64 `json:"reasons,omitempty"`
}

// IsZero reports whether c holds no field at all (not whether they are 0).
func (c Counters) IsZero() bool {
	return len(c.Counters) == 0 && len(c.Gauges) == 0 && len(c.Reasons) == 0
}

// CountersOf walks the exported fields of the struct v (or *v), except those
// named in skip (the ones the caller shows by hand):
//   - unsigned integers are counters, signed integers and bools are gauges;
//     a `stats:"gauge"` or `stats:"counter"` field tag overrides that, and
//     `stats:"-"` leaves the field out;
//   - a nested struct of integers, or a map[string] of integers, is a group
//     of counters by reason;
//   - any other field (strings, times, slices) is left out: the caller must
//     show it by hand.
func CountersOf(v any, skip ...string) Counters {
	rv := reflect.Indirect(reflect.ValueOf(v))
	var c Counters
	if rv.Kind() != reflect.Struct {
		return c
	}
	rt := rv.Type()
	for i := range rt.NumField() {
		f := rt.Field(i)
		tag := f.Tag.Get("stats")
		if !f.IsExported() || tag == "-" || contains(skip, f.Name) {
			continue
		}
		name := SnakeCase(f.Name)
		fv := rv.Field(i)
		if n, gauge, ok := number(fv, tag); ok {
			if gauge {
				setMap(&c.Gauges, name, n)
			} else {
				setMap(&c.Counters, name, uint64(n))
			}
			continue
		}
		if group, ok := reasons(fv); ok {
			setMap(&c.Reasons, name, group)
		}
	}
	return c
}

// number returns an integer or bool field's value and whether it is a gauge.
func number(v reflect.Value, tag string) (n int64, gauge, ok bool) {
	switch v.Kind() {
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return int64(v.Uint()), tag == "gauge", true
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if v.Type() == reflect.TypeFor[time.Duration]() {
			return 0, false, false
		}
		return v.Int(), tag != "counter", true
	case reflect.Bool:
		if v.Bool() {
			n = 1
		}
		return n, true, true
	}
	return 0, false, false
}

// reasons returns a nested struct of integers or a map[string] of integers
// as a reason -> count map.
func reasons(v reflect.Value) (map[string]uint64, bool) {
	switch {
	case v.Kind() == reflect.Struct && v.Type() != reflect.TypeFor[time.Time]():
		out := make(map[string]uint64, v.NumField())
		for i := range v.NumField() {
			f := v.Type().Field(i)
			if !f.IsExported() {
				continue
			}
			n, _, ok := number(v.Field(i), "")
			if !ok {
				return nil, false
			}
			out[SnakeCase(f.Name)] = uint64(n)
		}
		return out, true
	case v.Kind() == reflect.Map && v.Type().Key().Kind() == reflect.String:
		out := make(map[string]uint64, v.Len())
		for it := v.MapRange(); it.Next(); {
			n, _, ok := number(it.Value(), "")
			if !ok {
				return nil, false
			}
			out[it.Key().String()] = uint64(n)
		}
		return out, true
	}
	return nil, false
}

func setMap[V any](m *map[string]V, k string, v V) {
	if *m == nil {
		*m = make(map[string]V)
	}
	(*m)[k] = v
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// SnakeCase turns a Go field name into a metric name part: "PacketsIn" is
// "packets_in", "TCPInFlightDrops" is "tcp_in_flight_drops", "IPHeader" is
// "ip_header".
func SnakeCase(s string) string {
	r := []rune(s)
	var b strings.Builder
	for i, c := range r {
		if unicode.IsUpper(c) && i > 0 {
			prev := r[i-1]
			nextLower := i+1 < len(r) && unicode.IsLower(r[i+1])
			if unicode.IsLower(prev) || unicode.IsDigit(prev) || (unicode.IsUpper(prev) && nextLower) {
				b.WriteByte('_')
			}
		}
		b.WriteRune(unicode.ToLower(c))
	}
	return b.String()
}
