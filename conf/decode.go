package conf

import (
	"encoding"
	"fmt"
	"maps"
	"math"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
)

// decode fills rv from v, a value of the generic tree BurntSushi/toml
// decodes into. Unlike toml.Decode into the struct, which stops at the first
// bad value, it reports every unknown key, type mismatch and leaf error (from
// UnmarshalText) at its own indexed path, and keeps going.
func (r *report) decode(path string, v any, rv reflect.Value) {
	t := rv.Type()
	if t == reflect.TypeFor[time.Time]() {
		r.decodeDate(path, v, rv)
		return
	}
	if u, ok := rv.Addr().Interface().(encoding.TextUnmarshaler); ok {
		r.decodeText(path, v, t, u)
		return
	}
	switch t.Kind() {
	case reflect.Pointer:
		elem := reflect.New(t.Elem())
		r.decode(path, v, elem.Elem())
		rv.Set(elem)
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			r.typeError(path, v, "a table")
			return
		}
		r.decodeTable(path, m, rv)
	case reflect.Slice:
		var elems []any
		switch s := v.(type) {
		case []any:
			elems = s
		case []map[string]any:
			for _, m := range s {
				elems = append(elems, m)
			}
		default:
			if isTable(t.Elem()) {
				r.typeError(path, v, fmt.Sprintf("an array of tables (write [[%s]])", path))
			} else if str, ok := v.(string); ok {
				r.typeError(path, v, fmt.Sprintf("an array, e.g. [%q]", str))
			} else {
				r.typeError(path, v, "an array")
			}
			return
		}
		s := reflect.MakeSlice(t, len(elems), len(elems))
		for i, e := range elems {
			r.decode(fmt.Sprintf("%s[%d]", path, i), e, s.Index(i))
		}
		rv.Set(s)
	case reflect.String:
		s, ok := v.(string)
		if !ok {
			r.typeError(path, v, "a string")
			return
		}
		rv.SetString(s)
	case reflect.Int:
		n, ok := v.(int64)
		if !ok || n < math.MinInt32 || n > math.MaxInt32 {
			r.typeError(path, v, "a whole number")
			return
		}
		rv.SetInt(n)
	case reflect.Bool:
		b, ok := v.(bool)
		if !ok {
			r.typeError(path, v, "true or false")
			return
		}
		rv.SetBool(b)
	default:
		panic(fmt.Sprintf("conf: no decoder for %s at %s", t, path))
	}
}

// isTable reports whether values of t are written as TOML tables.
func isTable(t reflect.Type) bool {
	return t.Kind() == reflect.Struct && t != reflect.TypeFor[time.Time]() &&
		!reflect.PointerTo(t).Implements(reflect.TypeFor[encoding.TextUnmarshaler]())
}

// decodeTable fills a struct from a table; keys it does not know are errors.
func (r *report) decodeTable(path string, m map[string]any, rv reflect.Value) {
	fields := tomlFields(rv.Type())
	for _, key := range slices.Sorted(maps.Keys(m)) {
		v := m[key]
		i, ok := fields[key]
		if !ok {
			r.unknownKey(path, key, fields)
			continue
		}
		f := rv.Type().Field(i)
		if m, ok := v.(map[string]any); ok && f.Type.Kind() == reflect.Slice && tagOption(f, "one_or_many") {
			// [uplink] written once is the one element of the array, and
			// keeps its unindexed key path (uplink.relay) in messages.
			s := reflect.MakeSlice(f.Type, 1, 1)
			r.decode(joinPath(path, key), m, s.Index(0))
			rv.Field(i).Set(s)
			r.oneTable[joinPath(path, key)] = true
			continue
		}
		r.decode(joinPath(path, key), v, rv.Field(i))
	}
}

// tagOption reports whether f's toml tag carries option opt after its name.
func tagOption(f reflect.StructField, opt string) bool {
	_, opts, _ := strings.Cut(f.Tag.Get("toml"), ",")
	for o := range strings.SplitSeq(opts, ",") {
		if o == opt {
			return true
		}
	}
	return false
}

func (r *report) unknownKey(table, key string, fields map[string]int) {
	known := make([]string, 0, len(fields))
	for k := range fields {
		known = append(known, k)
	}
	path := joinPath(table, key)
	fix := "remove it"
	if s, ok := suggest(key, known); ok {
		fix = fmt.Sprintf("did you mean %q?", s)
		// The missing key it was meant to be is the same mistake.
		r.bad = append(r.bad, joinPath(table, s))
	}
	if r.failed(path) {
		return
	}
	r.bad = append(r.bad, path)
	r.errs = append(r.errs, Error{Path: r.file, Line: r.line(path), Key: r.display(table), Msg: fmt.Sprintf("unknown key %q", key), Fix: fix})
}

// tomlFields maps the toml tag of each field of t to its index.
func tomlFields(t reflect.Type) map[string]int {
	fields := make(map[string]int, t.NumField())
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ",")
		if name != "" && name != "-" {
			fields[name] = i
		}
	}
	return fields
}

func (r *report) decodeText(path string, v any, t reflect.Type, u encoding.TextUnmarshaler) {
	var s string
	switch x := v.(type) {
	case string:
		s = x
	case int64: // listen = 8443
		s = strconv.FormatInt(x, 10)
	default:
		r.typeError(path, v, "a string")
		return
	}
	if err := u.UnmarshalText([]byte(s)); err != nil {
		if _, ok := err.(*valueError); ok {
			r.valueError(path, err, "")
			return
		}
		problem, fix := textHint(t, s)
		r.errorf(path, fix, "%s", problem)
	}
}

// textHint explains a value that a standard library type rejected.
func textHint(t reflect.Type, s string) (problem, fix string) {
	switch t {
	case reflect.TypeFor[netip.Prefix]():
		if a, err := netip.ParseAddr(s); err == nil {
			return fmt.Sprintf("%q has no prefix length", s), fmt.Sprintf("write %q", netip.PrefixFrom(a, a.BitLen()))
		}
		return fmt.Sprintf("%q is not an address prefix", s), `write address/bits, e.g. "203.0.113.0/24"`
	case reflect.TypeFor[netip.Addr]():
		return fmt.Sprintf("%q is not an IP address", s), `write an address, e.g. "10.77.0.2" or "fd77::2"`
	}
	return fmt.Sprintf("%q is not a valid %s", s, t), ""
}

// decodeDate accepts a TOML date or datetime, or a string in either form.
func (r *report) decodeDate(path string, v any, rv reflect.Value) {
	switch x := v.(type) {
	case time.Time:
		// A TOML local time (07:30:00) decodes as that time on 0000-01-01:
		// it names no day, and would read as long expired.
		if x.Year() == 0 {
			r.errorf(path, "write a date, e.g. 2026-12-31", "%s is a time of day, not a date", x.Format(time.TimeOnly))
			return
		}
		rv.Set(reflect.ValueOf(x))
		return
	case string:
		for _, layout := range []string{time.DateOnly, time.RFC3339} {
			if d, err := time.ParseInLocation(layout, x, time.Local); err == nil {
				rv.Set(reflect.ValueOf(d))
				return
			}
		}
		r.errorf(path, "write a date, e.g. 2026-12-31", "%q is not a date", x)
	default:
		r.typeError(path, v, "a date")
	}
}

func (r *report) typeError(path string, v any, want string) {
	r.errorf(path, "write "+want, "%s is %s", describeValue(v), tomlTypeName(v))
}

func describeValue(v any) string {
	switch x := v.(type) {
	case string:
		return strconv.Quote(x)
	case map[string]any, []map[string]any:
		return "the value"
	}
	return fmt.Sprint(v)
}

func tomlTypeName(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case time.Time:
		return "a date"
	case []any:
		return "an array"
	case map[string]any:
		return "a table"
	case []map[string]any:
		return "an array of tables"
	}
	return fmt.Sprintf("a %T", v)
}
