package app

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

func TestWatchConfigReloadsOnContentChange(t *testing.T) {
	path := filepath.Join(t.TempDir(), "natbox.toml")
	if err := os.WriteFile(path, []byte("a = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	reloads := make(chan struct{}, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchConfig(ctx, path, 5*time.Millisecond, func() { reloads <- struct{}{} }, zaptest.NewLogger(t))
	}()
	defer func() { cancel(); <-done }()

	expectReloads := func(want int) {
		t.Helper()
		deadline := time.After(10 * 5 * time.Millisecond * 4)
		got := 0
		for {
			select {
			case <-reloads:
				got++
			case <-deadline:
				if got != want {
					t.Fatalf("reloads = %d, want %d", got, want)
				}
				return
			}
		}
	}
	// Rewriting the same bytes (a touch, an editor saving unchanged) is no change.
	if err := os.WriteFile(path, []byte("a = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	expectReloads(0)
	// An editor's save by rename is a change.
	tmp := path + ".swp"
	if err := os.WriteFile(tmp, []byte("a = 2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	expectReloads(1)
	// Truncate-then-write in place (config management tools) reloads once,
	// whether or not a tick catches the file empty in between.
	for i := 0; i < 20; i++ {
		if err := os.WriteFile(path, []byte("a = 2\n"+strings.Repeat("# padding\n", i+1)), 0o600); err != nil {
			t.Fatal(err)
		}
		expectReloads(1)
	}
	// A file missing for a moment triggers nothing until it is back, changed.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	expectReloads(0)
	if err := os.WriteFile(path, []byte("a = 3\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	expectReloads(1)
}
