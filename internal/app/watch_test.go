package app

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

func TestWatchConfigReloadsOnSettledContentChange(t *testing.T) {
	path := filepath.Join(t.TempDir(), "natbox.toml")
	write := func(content string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("a = 1\n")
	loaded := fileDigest(path) // what the caller parsed, before the watcher starts
	ticks := make(chan time.Time)
	reloads := 0
	reloaded := make(chan struct{}, 1)
	handled := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchConfig(ctx, path, loaded, ticks, func() { reloads++; reloaded <- struct{}{} }, func() { handled <- struct{}{} }, zaptest.NewLogger(t))
	}()
	defer func() { cancel(); <-done }()

	// tick hands the watcher one tick and reports whether it reloaded on it.
	tick := func() bool {
		ticks <- time.Now()
		<-handled
		select {
		case <-reloaded:
			return true
		default:
			return false
		}
	}
	steps := []struct {
		what   string
		change func()
		want   []bool // reload on each following tick
	}{
		{"same bytes rewritten", func() { write("a = 1\n") }, []bool{false, false}},
		{"new content, settled", func() { write("a = 2\n") }, []bool{false, true, false}},
		{"caught half-written (empty), then complete", func() { write("") }, nil},
		{"...complete", func() { write("a = 3\n") }, []bool{false, true, false}},
		{"saved by rename", func() {
			write("a = 3\n")
			tmp := path + ".swp"
			if err := os.WriteFile(tmp, []byte("a = 4\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, path); err != nil {
				t.Fatal(err)
			}
		}, []bool{false, true}},
		{"removed", func() { os.Remove(path) }, []bool{false, false}},
		{"back with the applied content", func() { write("a = 4\n") }, []bool{false}},
	}
	for _, st := range steps {
		st.change()
		if st.want == nil {
			// One single tick sees the half-written file: pending, no reload.
			if tick() {
				t.Fatalf("%s: reloaded", st.what)
			}
			continue
		}
		for i, want := range st.want {
			if got := tick(); got != want {
				t.Fatalf("%s: tick %d reloaded = %v, want %v", st.what, i, got, want)
			}
		}
	}
	if reloads != 3 {
		t.Fatalf("reloads = %d, want 3", reloads)
	}
}

// An edit made between loading the config and starting the watcher (natbox
// can take seconds to bring its TUN up) is still reloaded.
func TestWatchConfigSeesEditMadeDuringStartup(t *testing.T) {
	path := filepath.Join(t.TempDir(), "natbox.toml")
	if err := os.WriteFile(path, []byte("a = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	loaded := fileDigest(path)
	if err := os.WriteFile(path, []byte("a = 2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ticks := make(chan time.Time)
	handled := make(chan struct{})
	reloads := 0
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchConfig(ctx, path, loaded, ticks, func() { reloads++ }, func() { handled <- struct{}{} }, zaptest.NewLogger(t))
	}()
	for i := 0; i < 3; i++ {
		ticks <- time.Now()
		<-handled
	}
	cancel()
	<-done
	if reloads != 1 {
		t.Fatalf("reloads = %d, want 1 (the edit made before the watcher started)", reloads)
	}
}
