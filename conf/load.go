package conf

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"reflect"
	"time"

	"github.com/BurntSushi/toml"
)

// Load reads, decodes, defaults and validates the appliance config at path.
// On any problem it returns a nil Config and an *Errors listing every one.
func Load(path string) (*Config, []Warning, error) {
	data, err := readConfig(path, "examples/natbox.toml")
	if err != nil {
		return nil, nil, err
	}
	return Parse(path, data)
}

// readConfig reads a config file; failing to is a config problem (exit 2),
// reported like the others with what to do about it.
func readConfig(path, example string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		return data, nil
	}
	fix := "check the path and its permissions, or pass another file with --config"
	if errors.Is(err, fs.ErrNotExist) {
		fix = "create it (start from " + example + ") or pass another file with --config"
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	return nil, &Errors{List: []Error{{Path: path, Msg: "cannot read the config: " + err.Error(), Fix: fix}}}
}

// Parse is Load from bytes; path names the file in messages and anchors
// relative key file paths.
func Parse(path string, data []byte) (*Config, []Warning, error) {
	return ParseAt(path, data, time.Now())
}

// ParseAt is Parse with the clock for date checks (expires, review_by) given.
func ParseAt(path string, data []byte, now time.Time) (*Config, []Warning, error) {
	cfg := &Config{
		Log:    defaultLog(),
		Limits: defaultLimits(),
		Admin:  defaultAdmin(),
	}
	return parseInto(path, data, cfg, &cfg.Path, &cfg.Digest, func(r *report) {
		for i := range cfg.Mappings {
			cfg.Mappings[i].Line = r.lines[fmt.Sprintf("mapping[%d]", i)]
		}
		for i := range cfg.Uplinks {
			u := &cfg.Uplinks[i]
			u.Key = fmt.Sprintf("uplink[%d]", i)
			if r.oneTable["uplink"] {
				u.Key = "uplink"
			}
			u.Line = r.lines[u.Key]
		}
		cfg.applyDefaults()
		cfg.validate(r, now)
	})
}

// parseInto decodes data over cfg (which holds its defaults), records the
// file's path and digest, runs finish (line numbers, defaults, validation)
// and returns cfg only when the file has no errors.
func parseInto[T any](path string, data []byte, cfg *T, cfgPath *string, digest *[sha256.Size]byte, finish func(*report)) (*T, []Warning, error) {
	r, raw, err := begin(path, data)
	if err != nil {
		return nil, nil, err
	}
	r.decode("", raw, reflect.ValueOf(cfg).Elem())
	*cfgPath, *digest = path, sha256.Sum256(data)
	finish(r)
	warns, err := r.result()
	if err != nil {
		return nil, warns, err
	}
	return cfg, warns, nil
}

// LoadRelay reads, decodes, defaults and validates a relay config.
func LoadRelay(path string) (*RelayConfig, []Warning, error) {
	data, err := readConfig(path, "examples/relay.toml")
	if err != nil {
		return nil, nil, err
	}
	return ParseRelay(path, data)
}

// ParseRelay is LoadRelay from bytes.
func ParseRelay(path string, data []byte) (*RelayConfig, []Warning, error) {
	cfg := &RelayConfig{
		Log:   defaultLog(),
		Relay: defaultRelay(),
		Admin: Admin{Socket: DefaultRelayAdminSocket},
	}
	return parseInto(path, data, cfg, &cfg.Path, &cfg.Digest, func(r *report) {
		for i := range cfg.Peers {
			cfg.Peers[i].Line = r.lines[fmt.Sprintf("peer[%d]", i)]
		}
		cfg.validate(r)
	})
}

// begin parses the TOML syntax and indexes the source for messages.
func begin(path string, data []byte) (*report, map[string]any, error) {
	var raw map[string]any
	if _, err := toml.Decode(string(data), &raw); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, nil, &Errors{List: []Error{{
				Path: path,
				Line: pe.Position.Line,
				Msg:  "toml syntax: " + pe.Message,
				Fix:  fmt.Sprintf("fix the syntax at column %d", pe.Position.Col),
			}}}
		}
		return nil, nil, fmt.Errorf("parse %s: %w", path, err)
	}
	r := &report{file: path, lines: scanKeyLines(string(data)), names: make(map[string]string), oneTable: make(map[string]bool)}
	for _, table := range []string{"mapping", "peer"} {
		var elems []any // [[table]] or table = [{...}]
		switch v := raw[table].(type) {
		case []map[string]any:
			for _, m := range v {
				elems = append(elems, m)
			}
		case []any:
			elems = v
		}
		for i, e := range elems {
			m, _ := e.(map[string]any)
			if name, ok := m["name"].(string); ok {
				r.names[fmt.Sprintf("%s[%d]", table, i)] = name
			}
		}
	}
	return r, raw, nil
}

// AdminSocketOf returns the [admin] socket a config file names, or the
// default of its kind (a relay config has a [relay] table). It reads only
// those keys and forgives every other problem, so status and sessions reach
// the running natbox while its file is being edited.
func AdminSocketOf(path string) string {
	var partial struct {
		Admin struct {
			Socket string `toml:"socket"`
		} `toml:"admin"`
	}
	md, err := toml.DecodeFile(path, &partial)
	switch {
	case err == nil && partial.Admin.Socket != "":
		return partial.Admin.Socket
	case err == nil && md.IsDefined("relay"):
		return DefaultRelayAdminSocket
	}
	return DefaultAdminSocket
}

// IsRelayConfig reports whether the file at path is a relay config: it has
// a [relay] table or [[peer]] tables, which an appliance config never has.
// An unreadable or unparsable file is not (conf.Load reports it).
func IsRelayConfig(path string) bool {
	data, err := os.ReadFile(path)
	return err == nil && isRelay(data)
}

func isRelay(data []byte) bool {
	var probe map[string]any
	md, err := toml.Decode(string(data), &probe)
	return err == nil && (md.IsDefined("relay") || md.IsDefined("peer"))
}

// LoadAdmin loads and validates path as the kind of config it is (a relay
// config when it has a [relay] table, else an appliance config) and returns
// its [admin] table. natbox reload uses it so that a file with problems is
// reported, and nothing reloaded, before the running natbox is asked.
func LoadAdmin(path string) (Admin, error) {
	data, err := readConfig(path, "examples/natbox.toml")
	if err != nil {
		return Admin{}, err
	}
	if isRelay(data) {
		cfg, _, err := ParseRelay(path, data)
		if err != nil {
			return Admin{}, err
		}
		return cfg.Admin, nil
	}
	cfg, _, err := Parse(path, data)
	if err != nil {
		return Admin{}, err
	}
	return cfg.Admin, nil
}
