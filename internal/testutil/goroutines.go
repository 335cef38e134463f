package testutil

import (
	"bytes"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// GoroutineSet is the live goroutines that natbox's own (non-test) code
// started, by id, each with its stack. Goroutines of gVisor, wireguard-go
// and the standard library are left out: a lifecycle test compares what
// natbox starts, and documents the third-party ones it cannot avoid.
type GoroutineSet map[uint64]string

const module = "github.com/natbox/natbox/"

// Goroutines takes a GoroutineSet of the goroutines alive now.
func Goroutines() GoroutineSet {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	set := make(GoroutineSet)
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		text := string(g)
		head, _, _ := strings.Cut(text, " [")
		id, err := strconv.ParseUint(strings.TrimPrefix(head, "goroutine "), 10, 64)
		if err != nil || !ours(text) {
			continue
		}
		set[id] = text
	}
	return set
}

// ours reports whether natbox code outside tests and this package made the
// goroutine whose stack is text.
func ours(text string) bool {
	_, created, ok := strings.Cut(text, "\ncreated by ")
	if !ok || !strings.HasPrefix(created, module) || strings.HasPrefix(created, module+"internal/testutil.") {
		return false
	}
	_, where, _ := strings.Cut(created, "\n")
	file, _, _ := strings.Cut(strings.TrimSpace(where), ":")
	return !strings.HasSuffix(file, "_test.go")
}

// Started returns the stacks of the goroutines in s that are not in before.
func (s GoroutineSet) Started(before GoroutineSet) []string {
	var out []string
	for id, st := range s {
		if _, ok := before[id]; !ok {
			out = append(out, st)
		}
	}
	return out
}

// WaitGoroutines waits (up to 10 s) until exactly n of natbox's goroutines
// are alive that were not in before, and fails the test with their stacks
// if that does not happen.
func WaitGoroutines(t testing.TB, before GoroutineSet, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		extra := Goroutines().Started(before)
		if len(extra) == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines started since the baseline, want %d:\n%s", len(extra), n, strings.Join(extra, "\n\n"))
		}
		time.Sleep(5 * time.Millisecond)
	}
}
