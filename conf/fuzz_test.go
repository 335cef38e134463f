package conf

import (
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
)

// Fuzz targets for the config loaders and the value parsers. CI runs the
// seeds with go test and each target briefly with -fuzz (.ci/run); explore
// longer with go test -run '^$' -fuzz '^FuzzParse$' -fuzztime 60s ./conf.

// fuzzKeyFile is the only private_key_file a fuzzed config may name: the
// loader reads key files, and a mutated path could name /dev/zero or a FIFO.
const fuzzKeyFile = "fuzz.key"

// addConfigSeeds adds the example files and the test configs' building
// blocks, so the fuzzer starts from configs that load.
func addConfigSeeds(f *testing.F, examples []string, snippets []string) {
	for _, name := range examples {
		data, err := os.ReadFile(filepath.Join("..", "examples", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	for _, s := range snippets {
		f.Add([]byte(s))
	}
}

// fuzzDir returns a directory holding fuzzKeyFile, where the fuzzed config
// file is said to live.
func fuzzDir(f *testing.F) string {
	dir := f.TempDir()
	if err := os.WriteFile(filepath.Join(dir, fuzzKeyFile), []byte(testPriv+"\n"), 0o600); err != nil {
		f.Fatal(err)
	}
	return dir
}

// tomlOracle decodes data with BurntSushi/toml alone. It reports whether the
// syntax is valid and whether the tree names a key file other than
// fuzzKeyFile (such inputs are skipped, see fuzzKeyFile).
func tomlOracle(data []byte) (valid, foreignKeyFile bool) {
	var raw map[string]any
	if _, err := toml.Decode(string(data), &raw); err != nil {
		return false, false
	}
	var walk func(v any) bool
	walk = func(v any) bool {
		switch x := v.(type) {
		case map[string]any:
			for k, e := range x {
				if s, ok := e.(string); ok && k == "private_key_file" && s != fuzzKeyFile && s != "" {
					return true
				}
				if walk(e) {
					return true
				}
			}
		case []map[string]any:
			for _, e := range x {
				if walk(e) {
					return true
				}
			}
		case []any:
			for _, e := range x {
				if walk(e) {
					return true
				}
			}
		}
		return false
	}
	return true, walk(raw)
}

// checkProblems checks the form of every error and warning: each names the
// file it came from, and a line only if the file has that line.
func checkProblems(t *testing.T, path string, data []byte, warns []Warning, err error) {
	t.Helper()
	lines := strings.Count(string(data), "\n") + 1
	for _, w := range warns {
		if w.Path != path || w.Line < 0 || w.Line > lines || w.Msg == "" {
			t.Fatalf("malformed warning %#v (file has %d lines)", w, lines)
		}
	}
	if err == nil {
		return
	}
	var errs *Errors
	if !errors.As(err, &errs) || len(errs.List) == 0 {
		t.Fatalf("error %v (%T) is not a non-empty *Errors", err, err)
	}
	for _, e := range errs.List {
		if e.Path != path || e.Line < 0 || e.Line > lines || e.Msg == "" {
			t.Fatalf("malformed error %#v (file has %d lines)", e, lines)
		}
		if !strings.HasPrefix(e.Error(), path) {
			t.Fatalf("error %q does not start with the file name", e.Error())
		}
	}
}

// checkHeaderLines checks the lines recorded for the elements of an array of
// tables (mapping or peer): none, when the array was written inline, or the
// line of each element's own [[table]] header, in file order.
func checkHeaderLines(t *testing.T, data []byte, table string, got []int) {
	t.Helper()
	src := strings.Split(trimBOM(string(data)), "\n")
	prev := 0
	for i, n := range got {
		if n == 0 {
			if prev != 0 {
				t.Fatalf("%s[%d] has no line but %s[%d] has", table, i, table, i-1)
			}
			continue
		}
		if n <= prev || n > len(src) {
			t.Fatalf("%s[%d] at line %d after line %d (file has %d lines)", table, i, n, prev, len(src))
		}
		s := strings.TrimSpace(src[n-1])
		parts, rest := parseKeyParts(strings.TrimPrefix(s, "[["))
		if !strings.HasPrefix(s, "[[") || !reflect.DeepEqual(parts, []string{table}) || !strings.HasPrefix(rest, "]]") {
			t.Fatalf("%s[%d] at line %d, which is %q, not its [[%s]] header", table, i, n, s, table)
		}
		prev = n
	}
}

// FuzzParse checks the appliance loader on any input: it never panics, it
// rejects everything BurntSushi/toml rejects, its problems name the file and
// a line it has, and what it accepts is deterministic, carries each
// mapping's header line, holds dates that name a day, and validates again
// without a problem.
func FuzzParse(f *testing.F) {
	mapping := `
[[mapping]]
name = "web"
owner = "me"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
`
	addConfigSeeds(f, []string{"natbox.toml", "natbox-uplink.toml", "natbox-two-relays.toml"}, []string{
		tunBase + mapping,
		tunBase + uplinkTable + mapping + strings.ReplaceAll(mapping, "web", "web2"),
		strings.Replace(uplinkTable, `private_key = "`+testPriv+`"`, `private_key_file = "`+fuzzKeyFile+`"`, 1) + mapping,
		tunBase + `mapping = [{name = "a", protocol = "udp", listen = 53, target = "[fd00::53]:53"}]`,
		"[[uplink]]\n" + strings.TrimPrefix(uplinkTable, "[uplink]\n") + "[[uplink]]\n" +
			strings.NewReplacer("relay.example", "relay2.example", testRelayPub, testPeerPub1).Replace(strings.TrimPrefix(uplinkTable, "[uplink]\n")) + mapping,
		`uplink = [{relay = "a:1", relay_public_key = "` + testRelayPub + `", private_key = "` + testPriv + `", address = "10.77.0.2"}]` + mapping,
		tunBase + "x = \"\"\"\n[[mapping]]\n\"\"\"\n[[mapping]] # c\nname = 'a'\n[[ \"mapping\" ]]\n",
		tunBase + "mtu = = 1500\n",
		"[tun]\naddresses = [\"203.0.113.10/32\",\n  # ]\n]\n[[mapping]]\nlisten = \"1-2\"\ntarget = \"h:3\"\nexpires = 2020-01-01\n",
	})
	dir := fuzzDir(f)
	path := filepath.Join(dir, "natbox.toml")
	f.Fuzz(func(t *testing.T, data []byte) {
		valid, foreign := tomlOracle(data)
		if foreign {
			t.Skip("names a key file other than " + fuzzKeyFile)
		}
		cfg, warns, err := ParseAt(path, data, clock)
		checkProblems(t, path, data, warns, err)
		if !valid {
			if err == nil {
				t.Fatal("BurntSushi/toml rejects the syntax but the loader accepted it")
			}
			return
		}
		if err != nil {
			if cfg != nil {
				t.Fatal("a config came back with an error")
			}
			return
		}
		if cfg.Path != path || cfg.Digest != sha256.Sum256(data) {
			t.Fatal("config does not record its file and digest")
		}
		again, warns2, err := ParseAt(path, data, clock)
		if err != nil || !reflect.DeepEqual(cfg, again) || !reflect.DeepEqual(warns, warns2) {
			t.Fatalf("second parse differs: %v", err)
		}
		lines := make([]int, len(cfg.Mappings))
		for i, m := range cfg.Mappings {
			lines[i] = m.Line
			for _, d := range []time.Time{m.Created, m.ReviewBy, m.Expires} {
				if !d.IsZero() && d.Year() < 1 {
					t.Fatalf("mapping[%d] holds %v, which is no day", i, d)
				}
			}
		}
		checkHeaderLines(t, data, "mapping", lines)
		if len(cfg.Uplinks) > 0 && cfg.Uplinks[0].Key != "uplink" { // [[uplink]], not one [uplink]
			lines = lines[:0]
			for _, u := range cfg.Uplinks {
				lines = append(lines, u.Line)
			}
			checkHeaderLines(t, data, "uplink", lines)
		}
		// Validation of the result is stable. The key file is read again.
		for i := range cfg.Uplinks {
			if cfg.Uplinks[i].PrivateKeyFile != "" {
				cfg.Uplinks[i].PrivateKey = Key{}
			}
		}
		r := &report{file: path, lines: map[string]int{}, names: map[string]string{}}
		cfg.validate(r, clock)
		if _, err := r.result(); err != nil {
			t.Fatalf("accepted config fails validation again:\n%v", err)
		}
		if !reflect.DeepEqual(cfg, again) {
			t.Fatal("validating again changed the config")
		}
	})
}

// FuzzParseRelay is FuzzParse for the relay's config.
func FuzzParseRelay(f *testing.F) {
	addConfigSeeds(f, []string{"relay.toml"}, []string{
		relayWithHome(`["tcp/443", "udp/10000-10100"]`),
		relayWithHome(`["tcp+udp/53", "tcp/53"]`),
		relayWithHome(`"tcp/443"`),
		`[relay]
private_key_file = "` + fuzzKeyFile + `"
address = "fd77::1"
public_bind = []
[[peer]]
name = "a"
public_key = "` + testPeerPub1 + `"
address = "fd77::2"
[[peer]]
name = "b"
public_key = "` + testPeerPub2 + `"
address = "fd77::2"
`,
		relayBase + `peer = [{name = "x", public_key = "` + testPeerPub1 + `", address = "10.77.0.9", ports = ["udp/1-65535"]}]`,
	})
	dir := fuzzDir(f)
	path := filepath.Join(dir, "relay.toml")
	f.Fuzz(func(t *testing.T, data []byte) {
		valid, foreign := tomlOracle(data)
		if foreign {
			t.Skip("names a key file other than " + fuzzKeyFile)
		}
		cfg, warns, err := ParseRelay(path, data)
		checkProblems(t, path, data, warns, err)
		if !valid {
			if err == nil {
				t.Fatal("BurntSushi/toml rejects the syntax but the loader accepted it")
			}
			return
		}
		if err != nil {
			if cfg != nil {
				t.Fatal("a config came back with an error")
			}
			return
		}
		if cfg.Path != path || cfg.Digest != sha256.Sum256(data) {
			t.Fatal("config does not record its file and digest")
		}
		again, warns2, err := ParseRelay(path, data)
		if err != nil || !reflect.DeepEqual(cfg, again) || !reflect.DeepEqual(warns, warns2) {
			t.Fatalf("second parse differs: %v", err)
		}
		lines := make([]int, len(cfg.Peers))
		for i, p := range cfg.Peers {
			lines[i] = p.Line
			for _, s := range p.Ports {
				if s.Proto == 0 || s.Ports.Lo == 0 || s.Ports.Lo > s.Ports.Hi {
					t.Fatalf("peer[%d] holds an invalid port spec %+v", i, s)
				}
			}
		}
		checkHeaderLines(t, data, "peer", lines)
		if cfg.Relay.PrivateKeyFile != "" {
			cfg.Relay.PrivateKey = Key{}
		}
		r := &report{file: path, lines: map[string]int{}, names: map[string]string{}}
		cfg.validate(r)
		if _, err := r.result(); err != nil {
			t.Fatalf("accepted config fails validation again:\n%v", err)
		}
		if !reflect.DeepEqual(cfg, again) {
			t.Fatal("validating again changed the config")
		}
	})
}

// textValue is a config value type with a text form.
type textValue interface {
	UnmarshalText([]byte) error
	MarshalText() ([]byte, error)
}

// FuzzSpecs feeds one string to every parser of a user-facing value (listen,
// target, port spec, port range, protocol, duration, key). None may panic;
// each refusal must be a *valueError (the loader prints it as problem; fix),
// and each accepted value must print to a form that parses back to itself.
func FuzzSpecs(f *testing.F) {
	for _, s := range []string{
		"443", "10000-10100", " 80 - 90 ", "+80", "0", "65536", "90-80", "1-65535",
		"198.51.100.1:8443", "[2001:db8::1]:80-90", "[::ffff:192.0.2.1]:1", "2001:db8::1:80", "[fe80::1%eth0]:80",
		"10.0.0.5:443", "host.example:30000", "[fd00::5]:443-444", "[]:1", "a..b:1", "_srv.x:1",
		"tcp/443", "udp/10000-10100", "tcp+udp/53", "udp+tcp/1-2", "tcp/", "/443",
		"5s", "1m30s", "2h", "-1s", "0s", "9223372036854775807ns",
		testPriv, testPeerPub1 + "\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		check := func(name string, v textValue, fresh func() textValue, ok func() bool) {
			err := v.UnmarshalText([]byte(s))
			if err != nil {
				if _, isValueErr := err.(*valueError); !isValueErr {
					t.Fatalf("%s(%q): error %v is a %T, not a *valueError", name, s, err, err)
				}
				return
			}
			if !ok() {
				t.Fatalf("%s(%q) accepted an invalid value %+v", name, s, v)
			}
			text, err := v.MarshalText()
			if err != nil {
				t.Fatalf("%s(%q): MarshalText: %v", name, s, err)
			}
			w := fresh()
			if err := w.UnmarshalText(text); err != nil {
				t.Fatalf("%s(%q) = %+v prints as %q, which does not parse: %v", name, s, v, text, err)
			}
			if !reflect.DeepEqual(v, w) {
				t.Fatalf("%s(%q) = %+v prints as %q, which parses as %+v", name, s, v, text, w)
			}
		}
		rangeOK := func(r PortRange) bool { return r.Lo >= 1 && r.Lo <= r.Hi }
		protoOK := func(p Proto) bool { return p == TCP || p == UDP || p == TCPUDP }

		var l Listen
		check("Listen", &l, func() textValue { return new(Listen) }, func() bool {
			return rangeOK(l.Ports) && (!l.Addr.IsValid() || l.Addr == l.Addr.Unmap() && l.Addr.Zone() == "")
		})
		var tg Target
		check("Target", &tg, func() textValue { return new(Target) }, func() bool { return rangeOK(tg.Ports) && tg.Host != "" })
		var ps PortSpec
		check("PortSpec", &ps, func() textValue { return new(PortSpec) }, func() bool { return protoOK(ps.Proto) && rangeOK(ps.Ports) })
		var p Proto
		check("Proto", &p, func() textValue { return new(Proto) }, func() bool { return protoOK(p) })
		var d Duration
		check("Duration", &d, func() textValue { return new(Duration) }, func() bool { return d > 0 })
		var k Key
		check("Key", &k, func() textValue { return new(Key) }, func() bool { return true })

		r, err := ParsePortRange(s)
		if err != nil {
			if _, isValueErr := err.(*valueError); !isValueErr {
				t.Fatalf("ParsePortRange(%q): error %v is a %T", s, err, err)
			}
			return
		}
		if !rangeOK(r) {
			t.Fatalf("ParsePortRange(%q) = %+v", s, r)
		}
		if r2, err := ParsePortRange(r.String()); err != nil || r2 != r {
			t.Fatalf("ParsePortRange(%q) = %+v prints as %q, which parses as %+v, %v", s, r, r.String(), r2, err)
		}
	})
}
