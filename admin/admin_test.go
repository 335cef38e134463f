package admin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var testNow = time.Date(2026, 11, 20, 12, 0, 0, 0, time.UTC)

// fakeSource is a Source whose answers the test sets.
type fakeSource struct {
	mu        sync.Mutex
	status    Status
	sessions  []Session
	reloadRes ReloadResult
	reloadErr error
	reloads   int
}

func (f *fakeSource) Status() Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status
}

func (f *fakeSource) Sessions(mapping string) []Session {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Session
	for _, s := range f.sessions {
		if mapping == "" || s.Mapping == mapping {
			out = append(out, s)
		}
	}
	return out
}

func (f *fakeSource) Reload(context.Context) (ReloadResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reloads++
	return f.reloadRes, f.reloadErr
}

func sampleStatus() Status {
	return Status{
		Mappings: []Mapping{
			{
				Name: "web", State: StateActive, Protocol: "tcp", Listen: "8443", Target: "127.0.0.1:443",
				Hits: 45, SessionsOpened: 42, SessionsActive: 3, BytesIn: 1000, BytesOut: 250000,
				LastUsed: testNow.Add(-90 * time.Second),
				Refusals: map[string]uint64{"denied": 2, "dial_failed": 1, "not_allowed": 0}, UDPDropped: 4,
				DialLatency: Histogram{Count: 4, SumSeconds: 0.05, Buckets: []Bucket{
					{UpperBoundSeconds: 0.01, Count: 3}, {UpperBoundSeconds: 0.1, Count: 4},
				}},
				Owner: "it@example.com", Description: "NAS web UI",
				Stats:    Counters{Counters: map[string]uint64{"budget_hits": 5, "evictions": 0}},
				ReviewBy: time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC), ReviewOverdue: true,
			},
			{
				Name: "games", State: StateExpired, Protocol: "udp", Listen: "27015", Target: "127.0.0.1:27015",
				UDPSessionsExpired: 7, Expires: time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC),
			},
		},
		Refusals:   map[string]uint64{"no_match": 9},
		BudgetHits: map[string]uint64{"per_source": 5, "total": 0}, InflightDials: 6,
		Forwarder: Counters{Gauges: map[string]int64{"active_sessions": 3, "shutting_down": 0}},
		Netstack: map[string]Counters{
			"tun": {
				Counters: map[string]uint64{"packets_in": 900, "tcp_requests": 10, "tcp_in_flight_drops": 3, "oversize": 0},
				Gauges:   map[string]int64{"tcp_established": 4},
				Reasons:  map[string]map[string]uint64{"invalid": {"ip_checksum": 2, "tcp_checksum": 0}},
			},
			"uplink": { // only traffic: natbox status shows nothing of it
				Counters: map[string]uint64{"packets_in": 50, "tcp_requests": 1, "tcp_retransmits": 9, "tcp_in_flight_drops": 0},
				Reasons:  map[string]map[string]uint64{"invalid": {"ip_checksum": 0}},
			},
		},
		TUN: &TUN{Name: "natbox0", Up: true, MTU: 1500, TxQueueLen: 2000,
			PacketsIn: 9900, BytesIn: 12000000, PacketsOut: 800, BytesOut: 64000, DroppedIn: 100},
		Uplinks: []Uplink{{
			State: UplinkRegistered, Relay: "relay.example.net:51820", Address: "100.96.0.2",
			LastHandshake: testNow.Add(-30 * time.Second), BytesIn: 5000, BytesOut: 7000,
			Registered: []string{"tcp/8443"},
			Refused:    []PortRefusal{{Port: "udp/27015", Reason: "not in this peer's ports"}},
		}, {
			// A second relay that is down: it never answered.
			State: "connecting", Relay: "relay2.example.net:51820", Address: "100.97.0.2",
		}},
		Relay: &Relay{Listen: "0.0.0.0:51820", Peers: []RelayPeer{
			{Name: "home", Address: "100.96.0.2", BytesIn: 11, BytesOut: 22, SessionsActive: 1, SessionsOpened: 2,
				DialFailures: 3, Registered: []string{"tcp/8443"}, Stats: Counters{Gauges: map[string]int64{"connected": 1}},
				ControlRefusals: map[string]uint64{"replaced": 4, "rate": 1}},
		}, Stats: Counters{Counters: map[string]uint64{"over_limit": 2, "rejected": 0}, Gauges: map[string]int64{"tcp_sessions": 1}}},
	}
}

func sampleSessions() []Session {
	return []Session{
		{ID: 1, Mapping: "web", Protocol: "tcp", Client: "203.0.113.7:51000", Target: "127.0.0.1:443",
			Started: testNow.Add(-2 * time.Minute), LastActive: testNow.Add(-5 * time.Second), BytesIn: 10, BytesOut: 20},
		{ID: 2, Mapping: "games", Protocol: "udp", Client: "198.51.100.9:40000", Target: "127.0.0.1:27015",
			Started: testNow.Add(-10 * time.Second)},
	}
}

// socketPath returns a short socket path in a fresh temp dir (unix socket
// paths are limited to 108 bytes), under a directory that does not exist yet.
func socketPath(t *testing.T) string {
	dir, err := os.MkdirTemp("", "nbadm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "run", "natbox.sock")
}

// startServer runs a server until the test ends.
func startServer(t *testing.T, cfg conf.Admin, src Source, opts Options) *Server {
	t.Helper()
	if opts.Now == nil {
		opts.Now = func() time.Time { return testNow }
	}
	s, err := NewServer(cfg, src, opts, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return s
}

func dialClient(t *testing.T, path string) *Client {
	t.Helper()
	c, err := Dial(path)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestSocketRoundTrip(t *testing.T) {
	path := socketPath(t)
	src := &fakeSource{status: sampleStatus(), sessions: sampleSessions(),
		reloadRes: ReloadResult{Added: []string{"ssh"}, Changed: []string{"web"}, Removed: []string{"old"}, SessionsClosed: 2}}
	startServer(t, conf.Admin{Socket: path}, src, Options{})
	ctx := testCtx(t)

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != socketFileMode {
		t.Errorf("socket mode = %o, want %o", got, socketFileMode)
	}
	if di, _ := os.Stat(filepath.Dir(path)); di == nil || di.Mode().Perm() != socketDirMode {
		t.Errorf("socket directory not created with mode %o", socketDirMode)
	}

	c := dialClient(t, path)
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if !st.Time.Equal(testNow) {
		t.Errorf("status time = %v, want the server clock %v", st.Time, testNow)
	}
	if len(st.Mappings) != 2 {
		t.Fatalf("got %d mappings, want 2", len(st.Mappings))
	}
	web := st.Mappings[0]
	if web.Name != "web" || web.SessionsOpened != 42 || web.BytesOut != 250000 || web.Refusals["denied"] != 2 ||
		!web.ReviewOverdue || web.Owner != "it@example.com" || !web.LastUsed.Equal(testNow.Add(-90*time.Second)) {
		t.Errorf("web mapping came back as %+v", web)
	}
	if len(st.Uplinks) != 2 || st.Uplinks[0].Refused[0].Port != "udp/27015" || st.Uplinks[1].Relay != "relay2.example.net:51820" ||
		st.Relay == nil || st.Relay.Peers[0].Name != "home" {
		t.Errorf("uplinks/relay came back as %+v / %+v", st.Uplinks, st.Relay)
	}

	ss, err := c.Sessions(ctx, "web")
	if err != nil {
		t.Fatalf("Sessions: %v", err)
	}
	if len(ss) != 1 || ss[0].Client != "203.0.113.7:51000" || ss[0].AgeSeconds != 120 || ss[0].IdleSeconds != 5 {
		t.Errorf("sessions for web = %+v, want the one with age 120s idle 5s", ss)
	}
	all, err := c.Sessions(ctx, "")
	if err != nil || len(all) != 2 {
		t.Fatalf("all sessions = %v, %v; want 2", all, err)
	}
	if all[1].IdleSeconds != 10 {
		t.Errorf("a session with no activity yet is idle since it started: got %v, want 10", all[1].IdleSeconds)
	}
	none, err := c.Sessions(ctx, "no such")
	if err != nil || none == nil || len(none) != 0 {
		t.Errorf("sessions of an unknown mapping = %#v, %v; want an empty list", none, err)
	}

	res, err := c.Reload(ctx)
	if err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if fmt.Sprint(res.Added, res.Changed, res.Removed, res.SessionsClosed) != "[ssh] [web] [old] 2" {
		t.Errorf("reload result = %+v", res)
	}

	src.mu.Lock()
	src.reloadErr = InvalidConfig(errors.New("natbox.toml:3: mapping \"x\".listen: bad; fix it\nnatbox.toml:9: limits.max_sessions: -1 is negative; use 0\n"))
	src.mu.Unlock()
	_, err = c.Reload(ctx)
	var ce *ConfigError
	if !errors.As(err, &ce) {
		t.Fatalf("invalid reload: err = %v, want a *ConfigError", err)
	}
	if len(ce.Lines) != 2 || !strings.HasPrefix(ce.Lines[1], "natbox.toml:9:") {
		t.Errorf("config error lines = %q", ce.Lines)
	}

	src.mu.Lock()
	src.reloadErr = errors.New("relay registration failed")
	src.mu.Unlock()
	if _, err = c.Reload(ctx); err == nil || errors.As(err, &ce) || !strings.Contains(err.Error(), "relay registration failed") {
		t.Errorf("failed reload: err = %v, want the source's error", err)
	}
	if src.reloads != 3 {
		t.Errorf("source saw %d reloads, want 3", src.reloads)
	}
}

func TestSocketRemovedOnClose(t *testing.T) {
	path := socketPath(t)
	s, err := NewServer(conf.Admin{Socket: path}, &fakeSource{}, Options{}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	c := dialClient(t, path)
	if _, err := c.Status(testCtx(t)); err != nil {
		t.Fatalf("Status: %v", err)
	}
	c.Close()
	s.Close()
	if err := <-done; err != nil {
		t.Errorf("Run after Close: %v", err)
	}
	s.Close() // idempotent
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("socket still there after Close: %v", err)
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	path := socketPath(t)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	// A natbox that died leaves its socket file with nobody listening.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()

	// The client says so, in words.
	c := dialClient(t, path)
	_, err = c.Status(testCtx(t))
	if !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "stale") {
		t.Errorf("status on a stale socket: err = %v, want ErrNotRunning mentioning the stale socket", err)
	}

	startServer(t, conf.Admin{Socket: path}, &fakeSource{status: sampleStatus()}, Options{})
	c2 := dialClient(t, path)
	st, err := c2.Status(testCtx(t))
	if err != nil || len(st.Mappings) != 2 {
		t.Fatalf("status after replacing the stale socket: %v, %v", st, err)
	}
}

func TestLiveSocketRefused(t *testing.T) {
	path := socketPath(t)
	startServer(t, conf.Admin{Socket: path}, &fakeSource{status: sampleStatus()}, Options{})

	_, err := NewServer(conf.Admin{Socket: path}, &fakeSource{}, Options{}, zaptest.NewLogger(t))
	if err == nil || !strings.Contains(err.Error(), "already running") || !strings.Contains(err.Error(), path) {
		t.Fatalf("second server on a live socket: err = %v, want a clear 'already running' error", err)
	}
	// The first one still answers: its socket was not removed.
	c := dialClient(t, path)
	if _, err := c.Status(testCtx(t)); err != nil {
		t.Errorf("first server after the second failed: %v", err)
	}
}

func TestSocketPathIsNotASocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "natbox.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := NewServer(conf.Admin{Socket: path}, &fakeSource{}, Options{}, zaptest.NewLogger(t))
	if err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("err = %v, want 'not a socket'", err)
	}
	if data, _ := os.ReadFile(path); string(data) != "precious" {
		t.Error("the file in the way was changed")
	}
}

func TestDialNotRunning(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.sock")
	_, err := Dial(path)
	if !errors.Is(err, ErrNotRunning) {
		t.Fatalf("err = %v, want ErrNotRunning", err)
	}
	want := "natbox is not running (no socket at " + path + "); start it with natbox run, or pass --socket"
	if err.Error() != want {
		t.Errorf("err = %q\nwant  %q", err, want)
	}
}

// httpGet fetches url with an optional bearer token and returns status and body.
func httpGet(t *testing.T, hc *http.Client, url, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(testCtx(t), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func newHTTPClient(t *testing.T) *http.Client {
	hc := &http.Client{Transport: &http.Transport{}}
	t.Cleanup(hc.CloseIdleConnections)
	return hc
}

func TestMetricsScrape(t *testing.T) {
	src := &fakeSource{status: sampleStatus()}
	src.status.Uplinks[0].LastHandshake = testNow.Add(-30 * time.Second)
	s := startServer(t, conf.Admin{Listen: "127.0.0.1:0"}, src, Options{})
	code, body := httpGet(t, newHTTPClient(t), "http://"+s.Addr().String()+"/metrics", "")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	for _, want := range []string{
		`natbox_mapping_sessions_opened_total{mapping="web"} 42`,
		`natbox_mapping_sessions_active{mapping="web"} 3`,
		`natbox_mapping_hits_total{mapping="web"} 45`,
		`natbox_mapping_bytes_total{direction="in",mapping="web"} 1000`,
		`natbox_mapping_bytes_total{direction="out",mapping="web"} 250000`,
		`natbox_refusals_total{mapping="web",reason="denied"} 2`,
		`natbox_refusals_total{mapping="web",reason="dial_failed"} 1`,
		`natbox_refusals_total{mapping="",reason="no_match"} 9`,
		`natbox_dial_latency_seconds_bucket{mapping="web",le="0.01"} 3`,
		`natbox_dial_latency_seconds_bucket{mapping="web",le="0.1"} 4`,
		`natbox_dial_latency_seconds_bucket{mapping="web",le="+Inf"} 4`,
		`natbox_dial_latency_seconds_sum{mapping="web"} 0.05`,
		`natbox_dial_latency_seconds_count{mapping="web"} 4`,
		`natbox_udp_sessions_expired_total{mapping="games"} 7`,
		`natbox_inflight_budget_hits_total{limit="per_source"} 5`,
		`natbox_inflight_budget_hits_total{limit="total"} 0`,
		`natbox_refusals_total{mapping="web",reason="not_allowed"} 0`,
		`natbox_udp_datagrams_dropped_total{mapping="web"} 4`,
		`natbox_inflight_dials 6`,
		`natbox_mapping_review_overdue{mapping="web"} 1`,
		`natbox_mapping_review_overdue{mapping="games"} 0`,
		`natbox_mapping_expired{mapping="games"} 1`,
		`natbox_mapping_expired{mapping="web"} 0`,
		`natbox_mapping_active{mapping="web"} 1`,
		`natbox_tun_up{tun="natbox0"} 1`,
		`natbox_tun_packets_total{direction="in",tun="natbox0"} 9900`,
		`natbox_tun_bytes_total{direction="out",tun="natbox0"} 64000`,
		`natbox_tun_dropped_packets_total{tun="natbox0"} 100`,
		`natbox_uplink_handshake_age_seconds{uplink="relay.example.net:51820"} 30`,
		`natbox_uplink_bytes_total{direction="in",uplink="relay.example.net:51820"} 5000`,
		`natbox_uplink_bytes_total{direction="out",uplink="relay.example.net:51820"} 7000`,
		`natbox_uplink_ports_refused{uplink="relay.example.net:51820"} 1`,
		`natbox_uplink_handshake_age_seconds{uplink="relay2.example.net:51820"} +Inf`,
		`natbox_uplink_registered{uplink="relay2.example.net:51820"} 0`,
		`natbox_uplink_bytes_total{direction="in",uplink="relay2.example.net:51820"} 0`,
		`natbox_relay_peer_handshake_age_seconds{peer="home"} +Inf`,
		`natbox_relay_peer_bytes_total{direction="out",peer="home"} 22`,
		`natbox_relay_peer_sessions_active{peer="home"} 1`,
		`natbox_relay_peer_ports_registered{peer="home"} 1`,
		`natbox_relay_peer_dial_failures_total{peer="home"} 3`,
		`natbox_netstack_tcp_in_flight_drops_total{stack="tun"} 3`,
		`natbox_netstack_packets_in_total{stack="uplink"} 50`,
		`natbox_netstack_tcp_established{stack="tun"} 4`,
		`natbox_netstack_invalid_total{reason="ip_checksum",stack="tun"} 2`,
		`natbox_netstack_invalid_total{reason="tcp_checksum",stack="tun"} 0`,
		`natbox_mapping_budget_hits_total{mapping="web"} 5`,
		`natbox_forwarder_active_sessions 3`,
		`natbox_forwarder_shutting_down 0`,
		`natbox_uplink_registered{uplink="relay.example.net:51820"} 1`,
		`natbox_relay_over_limit_total 2`,
		`natbox_relay_tcp_sessions 1`,
		`natbox_relay_peer_connected{peer="home"} 1`,
		"# TYPE natbox_netstack_tcp_in_flight_drops_total counter",
		"# TYPE natbox_netstack_tcp_established gauge",
		`natbox_relay_peer_control_refusals_total{peer="home",reason="replaced"} 4`,
		`natbox_relay_peer_control_refusals_total{peer="home",reason="rate"} 1`,
		"go_goroutines ", // the private registry also has the runtime collectors
		// procs (cmd/natbox/runtime.go) as the runtime runs it
		"go_sched_gomaxprocs_threads " + strconv.Itoa(runtime.GOMAXPROCS(0)),
	} {
		if !strings.Contains(body, "\n"+want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// The metrics change with the source: they are read at scrape time.
	src.mu.Lock()
	src.status.Mappings[0].SessionsOpened = 43
	src.mu.Unlock()
	_, body = httpGet(t, newHTTPClient(t), "http://"+s.Addr().String()+"/metrics", "")
	if !strings.Contains(body, `natbox_mapping_sessions_opened_total{mapping="web"} 43`) {
		t.Error("second scrape did not see the new count")
	}
}

func TestHTTPEndpoints(t *testing.T) {
	var mu sync.Mutex
	readyErr := errors.New("tun natbox0 is down")
	ready := func() error { mu.Lock(); defer mu.Unlock(); return readyErr }
	s := startServer(t, conf.Admin{Listen: "127.0.0.1:0"}, &fakeSource{status: sampleStatus()}, Options{Ready: ready})
	hc := newHTTPClient(t)
	base := "http://" + s.Addr().String()

	if code, body := httpGet(t, hc, base+"/healthz", ""); code != 200 || body != "ok\n" {
		t.Errorf("/healthz = %d %q", code, body)
	}
	if code, body := httpGet(t, hc, base+"/readyz", ""); code != 503 || !strings.Contains(body, "tun natbox0 is down") {
		t.Errorf("/readyz while not ready = %d %q, want 503 with the reason", code, body)
	}
	mu.Lock()
	readyErr = nil
	mu.Unlock()
	if code, _ := httpGet(t, hc, base+"/readyz", ""); code != 200 {
		t.Errorf("/readyz when ready = %d", code)
	}
	code, body := httpGet(t, hc, base+"/status", "")
	if code != 200 || !strings.Contains(body, `"name": "web"`) || !strings.Contains(body, `"sessions_opened": 42`) {
		t.Errorf("/status = %d %s", code, body)
	}
	// Sessions carry client addresses and reload changes things: socket only.
	if code, _ := httpGet(t, hc, base+"/v1/sessions", ""); code != http.StatusNotFound {
		t.Errorf("/v1/sessions over TCP = %d, want 404", code)
	}
	resp, err := hc.Post(base+"/v1/reload", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		t.Error("reload over TCP succeeded; it must be socket only")
	}
}

func TestIsLoopbackListen(t *testing.T) {
	tests := []struct {
		listen string
		want   bool
	}{
		{"127.0.0.1:9108", true},
		{"127.0.0.2:9108", true},
		{"[::1]:9108", true},
		{"localhost:9108", true},
		{"[::ffff:127.0.0.1]:9108", true},
		{"0.0.0.0:9108", false},
		{":9108", false},
		{"[::]:9108", false},
		{"192.168.1.10:9108", false},
		{"metrics.example.net:9108", false},
	}
	for _, tt := range tests {
		got, err := isLoopbackListen(tt.listen)
		if err != nil || got != tt.want {
			t.Errorf("isLoopbackListen(%q) = %v, %v; want %v", tt.listen, got, err, tt.want)
		}
	}
	if _, err := isLoopbackListen("9108"); err == nil {
		t.Error("a listen address without a host part was accepted")
	}
}

func TestListenToken(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte("s3cret-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	emptyFile := filepath.Join(dir, "empty")
	if err := os.WriteFile(emptyFile, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		cfg     conf.Admin
		want    string
		wantErr string
	}{
		{"loopback open", conf.Admin{Listen: "127.0.0.1:9108"}, "", ""},
		{"loopback with token", conf.Admin{Listen: "127.0.0.1:9108", TokenFile: tokenFile}, "s3cret-token", ""},
		{"wildcard needs token", conf.Admin{Listen: "0.0.0.0:9108"}, "", "set [admin] token_file"},
		{"wildcard with token", conf.Admin{Listen: "0.0.0.0:9108", TokenFile: tokenFile}, "s3cret-token", ""},
		{"missing token file", conf.Admin{Listen: "0.0.0.0:9108", TokenFile: filepath.Join(dir, "nope")}, "", "create it"},
		{"empty token file", conf.Admin{Listen: "0.0.0.0:9108", TokenFile: emptyFile}, "", "is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := listenToken(tt.cfg)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
	// NewServer refuses to start open off loopback.
	if _, err := NewServer(conf.Admin{Listen: "0.0.0.0:0"}, &fakeSource{}, Options{}, zaptest.NewLogger(t)); err == nil {
		t.Error("NewServer started a non-loopback listener without a token")
	}
}

func TestRequireToken(t *testing.T) {
	h := requireToken("s3cret", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "inside")
	}))
	tests := []struct {
		header string
		want   int
	}{
		{"", http.StatusUnauthorized},
		{"Bearer", http.StatusUnauthorized},
		{"Bearer ", http.StatusUnauthorized},
		{"Bearer wrong", http.StatusUnauthorized},
		{"Bearer s3cre", http.StatusUnauthorized},
		{"Bearer s3cret2", http.StatusUnauthorized},
		{"Basic s3cret", http.StatusUnauthorized},
		{"s3cret", http.StatusUnauthorized},
		{"Bearer s3cret", http.StatusOK},
	}
	for _, tt := range tests {
		req, _ := http.NewRequest(http.MethodGet, "/metrics", nil)
		if tt.header != "" {
			req.Header.Set("Authorization", tt.header)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tt.want {
			t.Errorf("Authorization %q: %d, want %d", tt.header, rec.Code, tt.want)
		}
		if (rec.Body.String() == "inside") != (tt.want == http.StatusOK) {
			t.Errorf("Authorization %q: body %q", tt.header, rec.Body.String())
		}
	}
}

func TestHTTPTokenOnRealListener(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("abc123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, conf.Admin{Listen: "127.0.0.1:0", TokenFile: tokenFile}, &fakeSource{status: sampleStatus()}, Options{})
	hc := newHTTPClient(t)
	base := "http://" + s.Addr().String()
	for _, path := range []string{"/metrics", "/healthz", "/readyz", "/status"} {
		if code, _ := httpGet(t, hc, base+path, ""); code != http.StatusUnauthorized {
			t.Errorf("%s without token: %d, want 401", path, code)
		}
		if code, _ := httpGet(t, hc, base+path, "wrong"); code != http.StatusUnauthorized {
			t.Errorf("%s with a wrong token: %d, want 401", path, code)
		}
		if code, _ := httpGet(t, hc, base+path, "abc123"); code != http.StatusOK {
			t.Errorf("%s with the token: %d, want 200", path, code)
		}
	}
}
