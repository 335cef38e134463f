package app_test

import (
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/natbox/natbox/internal/app"
)

// httpStatus answers GET http://addr/healthz with Authorization: Bearer token.
func httpStatus(t *testing.T, addr, token string) int {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+addr+"/healthz", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("GET /healthz: %v", err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func writeToken(t *testing.T, path, token string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestReloadAppliesLogLevelAndTokenAndNamesWhatNeedsARestart: a reload
// applies [log] level and the HTTP token (a rotated file, same path), applies
// the mappings, and names each [admin]/[log] change it cannot apply.
func TestReloadAppliesLogLevelAndTokenAndNamesWhatNeedsARestart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "admin.token")
	writeToken(t, tokenFile, "first-token")
	listen := freeLoopbackAddr(t)
	adminLines := "listen = \"" + listen + "\"\ntoken_file = \"" + tokenFile + "\""
	target := serveTCP(t, echo)
	s := spec{Admin: adminLines, Mappings: mapping("web", "tcp", "8800", target.String())}
	h := newHarness(t, s, app.Options{})
	level := zap.NewAtomicLevelAt(zapcore.InfoLevel)
	h.app.SetLogLevel(&level)
	h.run()
	if got := httpStatus(t, listen, "first-token"); got != http.StatusOK {
		t.Fatalf("with the token at start: %d", got)
	}

	writeToken(t, tokenFile, "second-token") // rotation: same file, new content
	s.Mappings += mapping("more", "tcp", "8801", target.String())
	h.writeFile(strings.Replace(s.render(h.socket), "[admin]", "[admin]\nwatch = true", 1) +
		"\n[log]\nlevel = \"debug\"\nformat = \"json\"\n")
	res, err := h.app.Reload()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"restart natbox to apply log.format", "restart natbox to apply admin.watch"}
	if !slices.Equal(res.Restart, want) {
		t.Fatalf("restart = %q, want %q", res.Restart, want)
	}
	if !slices.Equal(res.Added, []string{"more"}) {
		t.Fatalf("added = %v: the rest of the reload was not applied", res.Added)
	}
	if level.Level() != zapcore.DebugLevel {
		t.Fatalf("log level after reload: %v, want debug", level.Level())
	}
	if got := httpStatus(t, listen, "first-token"); got != http.StatusUnauthorized {
		t.Fatalf("the rotated-out token: %d, want 401", got)
	}
	if got := httpStatus(t, listen, "second-token"); got != http.StatusOK {
		t.Fatalf("the rotated-in token: %d, want 200", got)
	}

	// A token file that cannot be used refuses the whole reload.
	if err := os.Remove(tokenFile); err != nil {
		t.Fatal(err)
	}
	h.writeFile(s.render(h.socket) + "\n[log]\nlevel = \"warn\"\n")
	if _, err := h.app.Reload(); err == nil || !strings.Contains(err.Error(), "admin.token_file") {
		t.Fatalf("reload with a missing token file: %v, want a refusal naming admin.token_file", err)
	}
	if level.Level() != zapcore.DebugLevel {
		t.Fatalf("a refused reload changed the log level to %v", level.Level())
	}
	if got := httpStatus(t, listen, "second-token"); got != http.StatusOK {
		t.Fatalf("a refused reload changed the token: %d", got)
	}

	// A new socket needs a restart; the running one keeps answering.
	writeToken(t, tokenFile, "second-token")
	other := strings.Replace(s.render(h.socket), h.socket, filepath.Join(dir, "other.sock"), 1)
	h.writeFile(other)
	res, err = h.app.Reload()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Restart, []string{"restart natbox to apply admin.socket"}) {
		t.Fatalf("restart = %q", res.Restart)
	}
	if level.Level() != zapcore.InfoLevel {
		t.Fatalf("log level after a reload without [log] level: %v, want the default info", level.Level())
	}
	if _, err := os.Stat(h.socket); err != nil {
		t.Fatalf("the running socket: %v", err)
	}
}

// Without the logger's level handed over (--log-level), a level change is
// named, not silently dropped.
func TestReloadLevelFixedByFlagIsNamed(t *testing.T) {
	t.Parallel()
	s := spec{Mappings: mapping("web", "tcp", "8802", "127.0.0.1:9")}
	h := newHarness(t, s, app.Options{})
	h.writeFile(s.render(h.socket) + "\n[log]\nlevel = \"debug\"\n")
	res, err := h.app.Reload()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"log.level is fixed by --log-level; restart natbox without it to apply log.level"}
	if !slices.Equal(res.Restart, want) {
		t.Fatalf("restart = %q, want %q", res.Restart, want)
	}
}

// TestReloadNamesRuntimeKeysForRestart: the buffer budget is shared out,
// and the soft memory limit and procs set at start, so a reload that
// changes them applies the rest and names them.
func TestReloadNamesRuntimeKeysForRestart(t *testing.T) {
	t.Parallel()
	target := serveTCP(t, echo)
	s := spec{Mappings: mapping("web", "tcp", "8810", target.String())}
	h := newHarness(t, s, app.Options{})
	s.Limits = "buffer_memory = \"16MiB\"\nmemory_limit = \"128MiB\"\nprocs = 3"
	s.Mappings += mapping("more", "tcp", "8811", target.String())
	h.writeConfig(s)
	res, err := h.app.Reload()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"restart natbox to apply limits.buffer_memory", "restart natbox to apply limits.memory_limit", "restart natbox to apply limits.procs"}
	if !slices.Equal(res.Restart, want) || !slices.Equal(res.Added, []string{"more"}) {
		t.Fatalf("restart = %q, added %v; want %q, [more]", res.Restart, res.Added, want)
	}
}
