package admin

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
)

func noRedirectClient(t *testing.T) *http.Client {
	hc := newHTTPClient(t)
	hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return hc
}

func do(t *testing.T, hc *http.Client, method, url string, body io.Reader, hdr map[string]string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(testCtx(t), method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

func TestPageListsMappings(t *testing.T) {
	st := sampleStatus()
	st.Mappings = append(st.Mappings, Mapping{Name: "ssh", State: StateActive, Protocol: "tcp", Listen: "2222", Target: "10.0.0.5:3389", RiskyExposure: []string{"rdp (3389)"}},
		Mapping{Name: "vpn", State: StateRefusedByRelay, Protocol: "udp", Listen: "51821", Target: "10.0.0.6:51820",
			Allow: []string{"192.0.2.0/24", "198.51.100.0/24", "203.0.113.1"}, RelayRefusal: "port taken"},
		Mapping{Name: "cam", State: StateActive, Protocol: "tcp", Listen: "8554", Target: "10.0.0.7:554", Allow: []string{"192.0.2.0/24"},
			Stats: Counters{Gauges: map[string]int64{"target_down": 1}}})
	st.Warnings = []string{"carrier-grade NAT: 100.72.1.5 on wan0 is in 100.64.0.0/10; use relay mode"}
	src := &fakeSource{status: st}
	s := startServer(t, conf.Admin{Listen: "127.0.0.1:0"}, src, Options{})
	code, body := httpGet(t, newHTTPClient(t), "http://"+s.Addr().String()+"/", "")
	if code != http.StatusOK {
		t.Fatalf("GET /: %d %s", code, body)
	}
	for _, want := range []string{
		`data-mapping="web"`, `data-mapping="games"`, `data-mapping="ssh"`,
		`class="state-expired"`, `>expired<`, `>active<`,
		`href="/sessions?mapping=web"`, "127.0.0.1:443", "NAS web UI",
		`data-reason="denied">denied <b>2</b>`, `data-reason="dial_failed"`, // zero counts left out: not_allowed
		"192.0.2.0/24, 198.51.100.0/24 and 1 more", ">anyone<",
		// warnings
		"games expired on 2026-10-01", "web: review overdue", "ssh exposes rdp (3389) to anyone",
		"vpn: refused by the relay: port taken", "the relay relay.example.net:51820 refused udp/27015: not in this peer",
		"cam: the target 10.0.0.7:554 did not accept the last connection", "carrier-grade NAT: 100.72.1.5 on wan0",
		// uplink, TUN, relay, netstack
		`data-path="uplinks.0.last_handshake" data-fmt="ago">30s ago`, "tcp/8443",
		`<h2>Uplink to relay2.example.net:51820</h2>`, `data-path="uplinks.1.state">connecting<`,
		`data-path="tun.packets_in">9900<`, `data-path="tun.dropped_in">100<`,
		`data-peer="home"`, `dial_failed <b data-k="dial_failures">3</b>`, `data-reason="replaced"`,
		`data-path="netstack.tun.counters.tcp_in_flight_drops">3<`,
		`<script src="/static/app.js"`,
		"budget_hits=5", "over_limit=2", // other counters of a mapping and of the relay
	} {
		if !strings.Contains(body, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Contains(body, `data-reason="not_allowed"`) {
		t.Error("page shows a zero refusal count")
	}
	if strings.Contains(body, "web exposes") {
		t.Error("a mapping to a harmless port got the risky warning")
	}
}

func TestHistoryBoundedAndRates(t *testing.T) {
	var h history
	at := testNow
	st := Status{Mappings: []Mapping{{Name: "a"}, {Name: "b"}}}
	for i := range 3 * sampleKeep {
		st.Mappings[0].BytesIn = uint64(i) * 2000 // 1000 B/s at one sample per 2 s
		st.Mappings[0].BytesOut = uint64(i) * 200
		h.observe(st, at, sampleEvery)
		h.observe(st, at.Add(time.Second), sampleEvery) // too soon: not a sample
		at = at.Add(sampleEvery)
	}
	if n := len(h.by["a"]); n != sampleKeep {
		t.Fatalf("ring holds %d samples, want %d", n, sampleKeep)
	}
	in, out := h.rates("a")
	if len(in) != sampleKeep-1 || in[0] != 1000 || in[len(in)-1] != 1000 || out[0] != 100 {
		t.Fatalf("rates: %d in, first %v last %v, out %v", len(in), in[0], in[len(in)-1], out[0])
	}
	// A counter that goes back (the mapping was replaced) is no negative rate;
	// a mapping gone from the status is forgotten.
	h.observe(Status{Mappings: []Mapping{{Name: "a"}}}, at, sampleEvery)
	if in, _ := h.rates("a"); in[len(in)-1] != 0 {
		t.Errorf("rate after a counter reset: %v", in[len(in)-1])
	}
	if _, ok := h.by["b"]; ok {
		t.Error("a removed mapping's history is kept")
	}
	if pts := sparkline([]float64{0, 5, 10}, 10); !strings.HasSuffix(pts, "150.0,1.0") || !strings.Contains(pts, ",23.0") {
		t.Errorf("sparkline points %q: newest at the right edge, top at 1, zero at 23", pts)
	}
}

func TestPageDrawsTraffic(t *testing.T) {
	src := &fakeSource{status: sampleStatus()}
	var now atomic.Int64 // the sampler goroutine reads the clock too
	now.Store(testNow.UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()).UTC() }
	s := startServer(t, conf.Admin{Listen: "127.0.0.1:0"}, src, Options{Now: clock})
	hc := newHTTPClient(t)
	base := "http://" + s.Addr().String()
	httpGet(t, hc, base+"/", "") // first sample
	src.mu.Lock()
	ms := slices.Clone(src.status.Mappings) // the sampler may hold the old snapshot
	ms[0].BytesIn += uint64(4 * 1024 * sampleEvery.Seconds())
	src.status.Mappings = ms
	src.mu.Unlock()
	now.Add(int64(sampleEvery))
	_, body := httpGet(t, hc, base+"/", "")
	if !strings.Contains(body, `data-k="rate_in">4.0 KiB/s<`) {
		t.Errorf("page lacks the rate of 4 KiB/s:\n%s", body)
	}
	if !strings.Contains(body, `points="150.0,1.0"`) {
		t.Error("page lacks the sparkline point")
	}
}

func TestSessionsPage(t *testing.T) {
	src := &fakeSource{status: sampleStatus(), sessions: sampleSessions()}
	s := startServer(t, conf.Admin{Listen: "127.0.0.1:0"}, src, Options{})
	hc := newHTTPClient(t)
	base := "http://" + s.Addr().String()
	code, body := httpGet(t, hc, base+"/sessions?mapping=web", "")
	if code != http.StatusOK {
		t.Fatalf("GET /sessions: %d", code)
	}
	for _, want := range []string{"203.0.113.7:51000", "127.0.0.1:443", ">2m<", ">5s<", ">10 B<", ">20 B<"} {
		if !strings.Contains(body, want) {
			t.Errorf("sessions page lacks %q", want)
		}
	}
	if strings.Contains(body, "198.51.100.9") {
		t.Error("sessions page of web shows a session of games")
	}
	if code, _ := httpGet(t, hc, base+"/sessions?mapping=nope", ""); code != http.StatusNotFound {
		t.Errorf("sessions of an unknown mapping: %d, want 404", code)
	}
	if code, body := httpGet(t, hc, base+"/static/app.js", ""); code != http.StatusOK || !strings.Contains(body, `fetch("/status"`) {
		t.Errorf("app.js: %d", code)
	}
}

func TestLoginFlow(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("abc123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A token file makes the listener behave as it does off loopback.
	s := startServer(t, conf.Admin{Listen: "127.0.0.1:0", TokenFile: tokenFile}, &fakeSource{status: sampleStatus(), sessions: sampleSessions()}, Options{})
	hc := noRedirectClient(t)
	base := "http://" + s.Addr().String()
	form := map[string]string{"Content-Type": "application/x-www-form-urlencoded"}

	for _, path := range []string{"/", "/sessions?mapping=web"} {
		resp, body := do(t, hc, "GET", base+path, nil, nil)
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(body, `action="/login"`) || strings.Contains(body, "203.0.113.7") || strings.Contains(body, "data-mapping") {
			t.Fatalf("GET %s without a token: %d, want 401 and the login form only\n%s", path, resp.StatusCode, body)
		}
	}
	if resp, _ := do(t, hc, "GET", base+"/static/app.js", nil, nil); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("app.js without a token: %d, want 401", resp.StatusCode)
	}

	resp, body := do(t, hc, "POST", base+"/login", strings.NewReader(url.Values{"token": {"abc12"}}.Encode()), form)
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(body, "Wrong token") || !strings.Contains(body, `action="/login"`) || len(resp.Cookies()) != 0 {
		t.Fatalf("wrong token: %d, cookies %v", resp.StatusCode, resp.Cookies())
	}
	if _, metrics := httpGet(t, hc, base+"/metrics", "abc123"); !strings.Contains(metrics, "natbox_admin_login_failures_total 1") {
		t.Error("the failed login is not counted in /metrics")
	}

	resp, _ = do(t, hc, "POST", base+"/login", strings.NewReader(url.Values{"token": {"abc123"}}.Encode()), form)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/" {
		t.Fatalf("right token: %d to %q, want 303 to /", resp.StatusCode, resp.Header.Get("Location"))
	}
	cookies := resp.Cookies()
	if len(cookies) != 1 {
		t.Fatalf("login set %d cookies", len(cookies))
	}
	c := cookies[0]
	if !c.HttpOnly || c.SameSite != http.SameSiteStrictMode || c.Secure || strings.Contains(c.Value, "abc123") || c.Value == "" {
		t.Fatalf("session cookie %+v: want HttpOnly, SameSite=Strict, not Secure over plain HTTP, not the token", c)
	}
	form["X-Forwarded-Proto"] = "https" // behind a TLS reverse proxy
	resp, _ = do(t, hc, "POST", base+"/login", strings.NewReader(url.Values{"token": {"abc123"}}.Encode()), form)
	if cs := resp.Cookies(); len(cs) != 1 || !cs[0].Secure {
		t.Errorf("login through a TLS proxy: cookies %v, want one Secure", cs)
	}
	withCookie := map[string]string{"Cookie": c.Name + "=" + c.Value}
	for _, path := range []string{"/", "/sessions?mapping=web", "/status", "/static/app.js"} {
		if resp, _ := do(t, hc, "GET", base+path, nil, withCookie); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s with the cookie: %d", path, resp.StatusCode)
		}
	}
	if _, body := do(t, hc, "GET", base+"/sessions?mapping=web", nil, withCookie); !strings.Contains(body, "203.0.113.7:51000") {
		t.Error("sessions page with the cookie lacks the client")
	}
	if code, body := httpGet(t, hc, base+"/", "abc123"); code != http.StatusOK || !strings.Contains(body, `data-mapping="web"`) {
		t.Errorf("page with the bearer token: %d", code)
	}
	if _, body := do(t, hc, "GET", base+"/", nil, withCookie); !strings.Contains(body, `action="/logout"`) {
		t.Error("the page opened with the cookie offers no log out")
	}
	resp, _ = do(t, hc, "POST", base+"/logout", nil, withCookie)
	if cs := resp.Cookies(); resp.StatusCode != http.StatusSeeOther || len(cs) != 1 || cs[0].MaxAge >= 0 {
		t.Errorf("logout: %d, cookies %v; want 303 and the cookie deleted", resp.StatusCode, cs)
	}
	if resp, body := do(t, hc, "GET", base+"/login", nil, nil); resp.StatusCode != http.StatusOK || !strings.Contains(body, `action="/login"`) {
		t.Errorf("GET /login: %d, want the form", resp.StatusCode)
	}
	forged := map[string]string{"Cookie": c.Name + "=" + strings.Repeat("0", len(c.Value))}
	if resp, _ := do(t, hc, "GET", base+"/status", nil, forged); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("forged cookie: %d, want 401", resp.StatusCode)
	}

	// A rotated token logs the old cookie out.
	if err := os.WriteFile(tokenFile, []byte("def456\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	apply, err := s.ReloadToken(tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	apply()
	if resp, _ := do(t, hc, "GET", base+"/", nil, withCookie); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("old cookie after token rotation: %d, want 401", resp.StatusCode)
	}
}

func TestPageOpenOnLoopbackWithoutToken(t *testing.T) {
	s := startServer(t, conf.Admin{Listen: "127.0.0.1:0"}, &fakeSource{status: sampleStatus()}, Options{})
	hc := noRedirectClient(t)
	resp, _ := do(t, hc, "POST", "http://"+s.Addr().String()+"/login", nil, nil)
	if resp.StatusCode != http.StatusSeeOther {
		t.Errorf("login without a token configured: %d, want 303 to the page", resp.StatusCode)
	}
	// Off loopback without a token natbox does not start at all.
	if _, err := NewServer(conf.Admin{Listen: "0.0.0.0:0"}, &fakeSource{}, Options{}, nil); err == nil {
		t.Error("NewServer served the page off loopback without a token")
	}
}

func TestPageHelp(t *testing.T) {
	for _, tt := range []struct {
		cfg       conf.Admin
		want, err string
	}{
		{conf.Admin{Listen: "127.0.0.1:9108"}, "Open http://127.0.0.1:9108/\nNo token", ""},
		{conf.Admin{Listen: "[::1]:9108"}, "Open http://[::1]:9108/", ""},
		{conf.Admin{Listen: "0.0.0.0:9108", TokenFile: "/etc/natbox/admin.token"},
			"Open http://127.0.0.1:9108/ on this machine, or http://<this machine's address>:9108/ from another one.\nLog in with the token in /etc/natbox/admin.token", ""},
		{conf.Admin{Listen: ":9108", TokenFile: "/t"}, "Open http://127.0.0.1:9108/ on this machine", ""},
		{conf.Admin{Listen: "192.0.2.1:80", TokenFile: "/t"}, "Open http://192.0.2.1:80/\nLog in", ""},
		{conf.Admin{}, "", "[admin] listen is not set"},
		{conf.Admin{Listen: "9108"}, "", "write host:port"},
	} {
		lines, err := PageHelp(tt.cfg)
		if got := strings.Join(lines, "\n"); tt.err == "" && (err != nil || !strings.HasPrefix(got, tt.want)) {
			t.Errorf("%+v: %q, %v; want %q...", tt.cfg, got, err, tt.want)
		}
		if tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("%+v: error %v, want %q", tt.cfg, err, tt.err)
		}
	}
}

// The sampler keeps the charts' history while nobody looks, and stops with
// the server (TestMain's goleak would see it otherwise).
func TestSamplerRunsWhileServing(t *testing.T) {
	src := &fakeSource{status: sampleStatus()}
	s, err := NewServer(conf.Admin{Listen: "127.0.0.1:0"}, src, Options{}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	s.web.every = 20 * time.Millisecond
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		src.mu.Lock()
		ms := slices.Clone(src.status.Mappings) // a snapshot handed out is never written
		ms[0].BytesIn += 1000
		src.status.Mappings = ms
		src.mu.Unlock()
		s.web.hist.mu.Lock()
		n := len(s.web.hist.by["web"])
		s.web.hist.mu.Unlock()
		if n >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the sampler took %d samples in 10 s, want 3", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if in, _ := s.web.hist.rates("web"); len(in) < 2 || in[len(in)-1] <= 0 {
		t.Errorf("rates from the sampler: %v, want positive", in)
	}
	s.Close()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}
