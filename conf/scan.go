package conf

import (
	"fmt"
	"strconv"
	"strings"
)

// scanKeyLines maps each table and key of a syntactically valid TOML file to
// its 1-based line, with array-of-tables elements indexed: "tun", "tun.mtu",
// "mapping[2]", "mapping[2].listen". BurntSushi/toml records positions per
// dotted key without the array index, so every [[mapping]] would otherwise
// point at the last one. Keys inside inline tables and multi-line arrays are
// not indexed; lookups fall back to the key holding them.
func scanKeyLines(src string) map[string]int {
	src = trimBOM(src)
	lines := make(map[string]int)
	record := func(path string, n int) {
		if _, ok := lines[path]; !ok {
			lines[path] = n
		}
	}
	arrays := make(map[string]int) // array-of-tables path -> elements seen so far
	table := ""
	var v valueScanner
	for i, line := range strings.Split(src, "\n") {
		n := i + 1
		if v.open() {
			v.feed(line)
			continue
		}
		s := strings.TrimSpace(line)
		switch {
		case s == "" || s[0] == '#':
		case strings.HasPrefix(s, "[["):
			parts, _ := parseKeyParts(s[2:])
			table = resolveTable(parts, arrays, true)
			record(table, n)
		case s[0] == '[':
			parts, _ := parseKeyParts(s[1:])
			table = resolveTable(parts, arrays, false)
			record(table, n)
		default:
			parts, rest := parseKeyParts(s)
			path := table
			for _, p := range parts {
				path = joinPath(path, p)
				record(path, n)
			}
			if _, val, ok := strings.Cut(rest, "="); ok {
				v.feed(val)
			}
		}
	}
	return lines
}

// trimBOM drops a leading byte order mark as BurntSushi/toml does (editors
// on Windows write one). Kept, it would make the first line neither a table
// nor a key, and every later line be found under the wrong path.
func trimBOM(src string) string {
	for _, bom := range []string{"\xef\xbb\xbf", "\xff\xfe", "\xfe\xff"} {
		if strings.HasPrefix(src, bom) {
			return src[len(bom):]
		}
	}
	return src
}

// resolveTable turns a header's key parts into an indexed path: parts that
// name an array of tables refer to its latest element.
func resolveTable(parts []string, arrays map[string]int, isArray bool) string {
	path := ""
	for i, p := range parts {
		path = joinPath(path, p)
		last := i == len(parts)-1
		if last && isArray {
			arrays[path]++
		}
		if c, ok := arrays[path]; ok && (!last || isArray) {
			path = fmt.Sprintf("%s[%d]", path, c-1)
		}
	}
	return path
}

func joinPath(table, key string) string {
	if table == "" {
		return key
	}
	return table + "." + key
}

// parseKeyParts reads a possibly dotted, possibly quoted key from the start
// of s and returns its parts and what follows it.
func parseKeyParts(s string) (parts []string, rest string) {
	for {
		s = strings.TrimLeft(s, " \t")
		if s == "" {
			return parts, s
		}
		var part string
		switch s[0] {
		case '"':
			end := closingQuote(s, 1, '"')
			if end < 0 {
				return parts, ""
			}
			part, s = s[1:end], s[end+1:]
			if u, err := strconv.Unquote(`"` + part + `"`); err == nil {
				part = u
			}
		case '\'':
			end := strings.IndexByte(s[1:], '\'')
			if end < 0 {
				return parts, ""
			}
			part, s = s[1:end+1], s[end+2:]
		default:
			end := strings.IndexFunc(s, func(c rune) bool {
				return !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-')
			})
			if end < 0 {
				end = len(s)
			}
			part, s = s[:end], s[end:]
		}
		parts = append(parts, part)
		s = strings.TrimLeft(s, " \t")
		if !strings.HasPrefix(s, ".") {
			return parts, s
		}
		s = s[1:]
	}
}

// closingQuote returns the index of the quote that ends a basic string
// starting before i, skipping escapes, or -1.
func closingQuote(s string, i int, q byte) int {
	for ; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case q:
			return i
		}
	}
	return -1
}

// valueScanner follows a value across lines: open brackets and multi-line
// strings, so that their lines are not mistaken for keys or headers.
type valueScanner struct {
	depth     int  // open [ and {
	multiline byte // '"' or '\'' inside a multi-line string, else 0
}

func (v *valueScanner) open() bool { return v.depth > 0 || v.multiline != 0 }

func (v *valueScanner) feed(s string) {
	for i := 0; i < len(s); i++ {
		if v.multiline != 0 {
			q := v.multiline
			if q == '"' && s[i] == '\\' {
				i++
				continue
			}
			if strings.HasPrefix(s[i:], strings.Repeat(string(q), 3)) {
				v.multiline = 0
				i += 2
			}
			continue
		}
		switch c := s[i]; c {
		case '#':
			return
		case '"', '\'':
			if strings.HasPrefix(s[i:], strings.Repeat(string(c), 3)) {
				v.multiline = c
				i += 2
				continue
			}
			end := -1
			if c == '"' {
				end = closingQuote(s, i+1, '"')
			} else if j := strings.IndexByte(s[i+1:], '\''); j >= 0 {
				end = i + 1 + j
			}
			if end < 0 {
				return
			}
			i = end
		case '[', '{':
			v.depth++
		case ']', '}':
			v.depth--
		}
	}
}
