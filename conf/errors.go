package conf

import (
	"cmp"
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// Error is one problem in a config file.
type Error struct {
	Path string // the file
	Line int    // 1-based; 0 when the problem has no line (a missing key with no table)
	Key  string // key path as written in TOML, e.g. `mapping "ssh" (mapping[1]).listen`; "" for the file
	Msg  string // what is wrong
	Fix  string // how to fix it
}

// Error formats e as FILE:LINE: key path: problem; fix.
func (e Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Path)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	if e.Path != "" || e.Line > 0 {
		b.WriteString(": ")
	}
	if e.Key != "" {
		b.WriteString(e.Key + ": ")
	}
	b.WriteString(e.Msg)
	if e.Fix != "" {
		b.WriteString("; " + e.Fix)
	}
	return b.String()
}

// Errors is every problem found in one config file, in file order.
type Errors struct {
	List []Error
}

// Error returns one problem per line.
func (e *Errors) Error() string {
	lines := make([]string, len(e.List))
	for i, x := range e.List {
		lines[i] = x.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap exposes each problem to errors.Is and errors.As.
func (e *Errors) Unwrap() []error {
	errs := make([]error, len(e.List))
	for i, x := range e.List {
		errs[i] = x
	}
	return errs
}

// Warning is something that loads but deserves a look (an unowned mapping,
// an open risky port, an expiry date).
type Warning struct {
	Path string
	Line int
	Key  string
	Msg  string
}

// String formats w as FILE:LINE: key path: message.
func (w Warning) String() string {
	return Error{Path: w.Path, Line: w.Line, Key: w.Key, Msg: w.Msg}.Error()
}

// report collects the problems of one file. Paths are raw key paths with
// 0-based indices ("mapping[2].listen"); lines and display names come from
// the source.
type report struct {
	file  string
	lines map[string]int    // raw key path -> line, from scanKeyLines
	names map[string]string // "mapping[2]" -> that table's name, for messages
	errs  []Error
	warns []Warning
	bad   []string // raw paths that already have an error
	// oneTable holds the one_or_many arrays written as a single table.
	oneTable map[string]bool
}

// errorf records a problem at path unless path (or a table that holds it)
// already has one: one mistake should not read as several.
func (r *report) errorf(path, fix, format string, args ...any) {
	if r.failed(path) {
		return
	}
	r.bad = append(r.bad, path)
	r.errs = append(r.errs, Error{Path: r.file, Line: r.line(path), Key: r.display(path), Msg: fmt.Sprintf(format, args...), Fix: fix})
}

// valueError records err, splitting a *valueError into problem and fix.
func (r *report) valueError(path string, err error, fix string) {
	if ve, ok := err.(*valueError); ok {
		r.errorf(path, ve.fix, "%s", ve.problem)
		return
	}
	r.errorf(path, fix, "%s", err.Error())
}

func (r *report) warnf(path, format string, args ...any) {
	r.warns = append(r.warns, Warning{Path: r.file, Line: r.line(path), Key: r.display(path), Msg: fmt.Sprintf(format, args...)})
}

// failed reports whether path, or a table or array holding it, has an error.
func (r *report) failed(path string) bool {
	for _, b := range r.bad {
		if path == b || strings.HasPrefix(path, b+".") || strings.HasPrefix(path, b+"[") {
			return true
		}
	}
	return false
}

// line returns the line of path, or of the nearest table or key holding it.
func (r *report) line(path string) int {
	for path != "" {
		if n, ok := r.lines[path]; ok {
			return n
		}
		path = parentPath(path)
	}
	return 0
}

func parentPath(path string) string {
	i := strings.LastIndexAny(path, ".[")
	if i < 0 {
		return ""
	}
	return path[:i]
}

var namedElem = regexp.MustCompile(`^(mapping|peer)\[\d+\]`)

// display turns a raw path into the one users read: mapping[1].listen
// becomes mapping "ssh" (mapping[1]).listen.
func (r *report) display(path string) string {
	elem := namedElem.FindString(path)
	if elem == "" {
		return path
	}
	name, ok := r.names[elem]
	if !ok || name == "" {
		return path
	}
	kind := elem[:strings.IndexByte(elem, '[')]
	return fmt.Sprintf("%s %q (%s)%s", kind, name, elem, path[len(elem):])
}

// result returns the problems in file order; problems without a line last.
func (r *report) result() ([]Warning, error) {
	byLine := func(a, b int) int {
		if (a == 0) != (b == 0) {
			return cmp.Compare(b, a) // 0 sorts last
		}
		return cmp.Compare(a, b)
	}
	slices.SortStableFunc(r.warns, func(a, b Warning) int { return byLine(a.Line, b.Line) })
	if len(r.errs) == 0 {
		return r.warns, nil
	}
	slices.SortStableFunc(r.errs, func(a, b Error) int { return byLine(a.Line, b.Line) })
	return r.warns, &Errors{List: r.errs}
}

// suggest returns the known key closest to s, if it is close enough to be
// a typo, or if one is the other plus a suffix ("listen_port" for "listen").
func suggest(s string, known []string) (string, bool) {
	slices.Sort(known) // equal distances: the same answer every time
	best, bestDist := "", -1
	for _, k := range known {
		if strings.HasPrefix(s, k+"_") || strings.HasPrefix(k, s+"_") {
			return k, true
		}
	}
	for _, k := range known {
		if d := editDistance(s, k); bestDist < 0 || d < bestDist {
			best, bestDist = k, d
		}
	}
	return best, bestDist >= 0 && (bestDist <= 2 || bestDist <= len(best)/3)
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
