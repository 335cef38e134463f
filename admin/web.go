package admin

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/hex"
	"fmt"
	"html/template"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/natbox/natbox/conf"
)

// The status page: server-rendered HTML at / of the HTTP listener, refreshed
// by a small script that polls /status. Everything it needs is embedded.

//go:embed web
var webFiles embed.FS

var pageTemplates = template.Must(template.New("").Funcs(template.FuncMap{
	"bytes":   formatBytes,
	"ago":     formatAgo,
	"date":    formatDate,
	"seconds": formatSeconds,
	"counts":  sortedCounts,
	"list":    formatList,
	"rate":    formatRate,
	"stats":   func(c Counters) string { return formatStats(c, nil) },
}).ParseFS(webFiles, "web/*.html"))

const (
	// sampleEvery is the spacing of the byte counter samples the charts
	// are drawn from, and sampleKeep how many are kept per mapping (5
	// minutes): a mapping's history is sampleKeep fixed-size samples, so
	// the memory is bounded by the number of configured mappings.
	sampleEvery = 2 * time.Second
	sampleKeep  = 150
	// sessionCookie holds a MAC of the admin token, never the token.
	sessionCookie = "natbox_session"
)

// byteSample is one reading of a mapping's byte counters.
type byteSample struct {
	at      time.Time
	in, out uint64
}

// history keeps the last sampleKeep byte samples of each mapping.
type history struct {
	mu   sync.Mutex
	last time.Time
	by   map[string][]byteSample
}

// observe records st's byte counters unless the last sample is younger than
// every (less a tenth, for the jitter of the ticker and of page loads). Mappings no longer in st are forgotten.
func (h *history) observe(st Status, now time.Time, every time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.last.IsZero() && now.Sub(h.last) < every-every/10 {
		return
	}
	h.last = now
	next := make(map[string][]byteSample, len(st.Mappings))
	for _, m := range st.Mappings {
		ring := h.by[m.Name]
		if len(ring) >= sampleKeep {
			ring = slices.Delete(ring, 0, len(ring)-sampleKeep+1)
		}
		next[m.Name] = append(ring, byteSample{at: now, in: m.BytesIn, out: m.BytesOut})
	}
	h.by = next
}

// rates returns the bytes per second each way between consecutive samples of
// mapping, oldest first.
func (h *history) rates(mapping string) (in, out []float64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ring := h.by[mapping]
	for i := 1; i < len(ring); i++ {
		dt := ring[i].at.Sub(ring[i-1].at).Seconds()
		if dt <= 0 {
			continue
		}
		in = append(in, delta(ring[i].in, ring[i-1].in)/dt)
		out = append(out, delta(ring[i].out, ring[i-1].out)/dt)
	}
	return in, out
}

// delta is b-a, or 0 when a counter went back (a mapping replaced by a reload).
func delta(b, a uint64) float64 {
	if b < a {
		return 0
	}
	return float64(b - a)
}

// web is the page's state on a Server.
type web struct {
	hist  history
	every time.Duration // the sampler's period: sampleEvery
	// key MACs the token into the session cookie; a restart or a new
	// token logs everyone out.
	key          [32]byte
	loginFailed  atomic.Uint64
	stopSampling chan struct{}
	sampling     sync.WaitGroup
}

func newWeb() *web {
	w := &web{every: sampleEvery}
	rand.Read(w.key[:]) // never fails (crypto/rand panics rather)
	return w
}

// startSampler samples the byte counters every sampleEvery until stop is
// called, so the charts have a history when the page is opened.
func (s *Server) startSampler() (stop func()) {
	if s.tcpSrv == nil {
		return func() {} // no page to draw for
	}
	done := make(chan struct{})
	s.web.sampling.Add(1)
	go func() {
		defer s.web.sampling.Done()
		t := time.NewTicker(s.web.every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				s.web.hist.observe(s.src.Status(), s.opts.Now(), s.web.every)
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(done) })
		s.web.sampling.Wait()
	}
}

// webRoutes adds the page to the HTTP listener's mux.
func (s *Server) webRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /{$}", s.handlePage)
	mux.HandleFunc("GET /sessions", s.handleSessionsPage)
	static, _ := fs.Sub(webFiles, "web/static")
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	mux.HandleFunc("GET /login", func(w http.ResponseWriter, r *http.Request) { s.loginForm(w, http.StatusOK, "") })
	mux.HandleFunc("POST /login", s.handleLogin)
	mux.HandleFunc("POST /logout", s.handleLogout)
}

// webGate lets a request through with the bearer token or a valid session
// cookie; the page and the login form answer a browser without either with
// the form, everything else with the bearer 401.
func (s *Server) webGate(next http.Handler) http.Handler {
	bearer := s.gate.wrap(next)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		want := s.gate.want.Load()
		switch {
		case want == nil, s.validCookie(r, want):
			next.ServeHTTP(w, r)
		case r.URL.Path == "/login" || r.URL.Path == "/static/style.css":
			next.ServeHTTP(w, r) // the form and its style need no token
		case r.Header.Get("Authorization") == "" && r.Method == http.MethodGet && (r.URL.Path == "/" || r.URL.Path == "/sessions"):
			s.loginForm(w, http.StatusUnauthorized, "")
		default:
			bearer.ServeHTTP(w, r)
		}
	})
}

// cookieValue is the session cookie for the token whose digest is want.
func (s *Server) cookieValue(want *[sha256.Size]byte) string {
	mac := hmac.New(sha256.New, s.web.key[:])
	mac.Write(want[:])
	return hex.EncodeToString(mac.Sum(nil))
}

func (s *Server) validCookie(r *http.Request, want *[sha256.Size]byte) bool {
	c, err := r.Cookie(sessionCookie)
	if err != nil {
		return false
	}
	return hmac.Equal([]byte(c.Value), []byte(s.cookieValue(want)))
}

func (s *Server) handleLogin(w http.ResponseWriter, r *http.Request) {
	want := s.gate.want.Load()
	if want == nil {
		http.Redirect(w, r, "/", http.StatusSeeOther) // no token required here
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 4096)
	got := sha256.Sum256([]byte(strings.TrimSpace(r.PostFormValue("token"))))
	if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
		s.web.loginFailed.Add(1)
		s.loginForm(w, http.StatusUnauthorized, "Wrong token.")
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name: sessionCookie, Value: s.cookieValue(want), Path: "/",
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: overTLS(r),
	})
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

func (s *Server) handleLogout(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Path: "/", MaxAge: -1,
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: overTLS(r)})
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

// overTLS reports whether the browser reached natbox over HTTPS, directly or
// through a TLS reverse proxy. A forged header only makes the cookie stricter.
func overTLS(r *http.Request) bool {
	return r.TLS != nil || strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
}

func (s *Server) loginForm(w http.ResponseWriter, code int, problem string) {
	render(w, code, "login.html", struct{ Problem string }{problem})
}

func render(w http.ResponseWriter, code int, name string, data any) {
	var b strings.Builder
	if err := pageTemplates.ExecuteTemplate(&b, name, data); err != nil {
		http.Error(w, "render "+name+": "+err.Error(), http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
	w.WriteHeader(code)
	fmt.Fprint(w, b.String())
}

// snapshot is the Source's status with its time filled, sampled for the charts.
func (s *Server) snapshot() Status {
	st := s.src.Status()
	now := s.opts.Now()
	if st.Time.IsZero() {
		st.Time = now
	}
	s.web.hist.observe(st, now, s.web.every)
	return st
}

// pageMapping is a mapping as the page shows it.
type pageMapping struct {
	Mapping
	AllowSummary      string
	RateIn, RateOut   float64 // bytes/s over the last sample
	SparkIn, SparkOut string  // SVG polyline points
	HistIn, HistOut   string  // the rates, for the script to continue the chart
}

// warning is one line at the top of the page.
type warning struct {
	Kind, Text string
}

type pageData struct {
	Status
	Mappings []pageMapping
	Warnings []warning
	// LoggedIn: the page was opened with the session cookie, so it offers
	// to log out.
	LoggedIn bool
}

func (s *Server) handlePage(w http.ResponseWriter, r *http.Request) {
	st := s.snapshot()
	_, err := r.Cookie(sessionCookie)
	d := pageData{Status: st, Warnings: warnings(st), LoggedIn: err == nil && s.gate.want.Load() != nil}
	for _, m := range st.Mappings {
		in, out := s.web.hist.rates(m.Name)
		top := 0.0 // one scale for both ways
		for _, r := range slices.Concat(in, out) {
			top = max(top, r)
		}
		pm := pageMapping{Mapping: m, AllowSummary: allowSummary(m.Allow),
			SparkIn: sparkline(in, top), SparkOut: sparkline(out, top), HistIn: joinRates(in), HistOut: joinRates(out)}
		if len(in) > 0 {
			pm.RateIn, pm.RateOut = in[len(in)-1], out[len(out)-1]
		}
		d.Mappings = append(d.Mappings, pm)
	}
	render(w, http.StatusOK, "page.html", d)
}

func (s *Server) handleSessionsPage(w http.ResponseWriter, r *http.Request) {
	name := r.URL.Query().Get("mapping")
	st := s.snapshot()
	sessions := s.src.Sessions(name)
	for i := range sessions {
		fillAges(&sessions[i], st.Time)
	}
	sort.Slice(sessions, func(i, j int) bool { return sessions[i].Started.Before(sessions[j].Started) })
	var m *Mapping
	for i := range st.Mappings {
		if st.Mappings[i].Name == name {
			m = &st.Mappings[i]
		}
	}
	code := http.StatusOK
	if name != "" && m == nil {
		code = http.StatusNotFound
	}
	render(w, code, "sessions.html", struct {
		Name     string
		Mapping  *Mapping
		Sessions []Session
		Time     time.Time
	}{name, m, sessions, st.Time})
}

// warnings are what the operator should look at first.
func warnings(st Status) []warning {
	var ws []warning
	for _, m := range st.Mappings {
		if m.State == StateExpired {
			ws = append(ws, warning{"expired", fmt.Sprintf("%s expired on %s%s; natbox no longer serves it", m.Name, formatDate(m.Expires), whoWhat(m))})
		}
		if m.ReviewOverdue {
			ws = append(ws, warning{"review", fmt.Sprintf("%s: review overdue (review by %s%s)", m.Name, formatDate(m.ReviewBy), whoWhat(m))})
		}
		if m.State == StateRefusedByRelay || m.RelayRefusal != "" {
			ws = append(ws, warning{"relay", fmt.Sprintf("%s: refused by the relay: %s", m.Name, orDash(m.RelayRefusal))})
		}
		if m.State == StateActive && m.Stats.Gauges["target_down"] != 0 {
			ws = append(ws, warning{"target", fmt.Sprintf("%s: the target %s did not accept the last connection (dial_failed): check that the service runs; natbox doctor tells refused from timing out", m.Name, m.Target)})
		}
		if m.State == StateActive && len(m.RiskyExposure) > 0 {
			ws = append(ws, warning{"risky", fmt.Sprintf("%s exposes %s to anyone: set allow to the addresses that need it, or acknowledge_risk", m.Name, strings.Join(m.RiskyExposure, ", "))})
		}
	}
	for _, w := range st.Warnings {
		ws = append(ws, warning{"host", w})
	}
	for _, u := range st.Uplinks {
		for _, r := range u.Refused {
			ws = append(ws, warning{"relay", fmt.Sprintf("the relay %s refused %s: %s", u.Relay, r.Port, r.Reason)})
		}
	}
	return ws
}

func allowSummary(allow []string) string {
	switch len(allow) {
	case 0:
		return "anyone"
	case 1, 2:
		return strings.Join(allow, ", ")
	default:
		return fmt.Sprintf("%s, %s and %d more", allow[0], allow[1], len(allow)-2)
	}
}

// sparkW and sparkH are the chart's viewBox; a point per sample.
const sparkW, sparkH = 150.0, 24.0

// sparkline is the points of an SVG polyline of rates, scaled so that top
// is the full height, the newest at the right.
func sparkline(rates []float64, top float64) string {
	if len(rates) == 0 {
		return ""
	}
	if top <= 0 {
		top = 1
	}
	var b strings.Builder
	x0 := sparkW - float64(len(rates)-1)*sparkW/(sampleKeep-1)
	for i, r := range rates {
		x := x0 + float64(i)*sparkW/(sampleKeep-1)
		y := sparkH - 1 - r/top*(sparkH-2)
		fmt.Fprintf(&b, "%.1f,%.1f ", x, y)
	}
	return strings.TrimSpace(b.String())
}

func joinRates(rates []float64) string {
	parts := make([]string, len(rates))
	for i, r := range rates {
		parts[i] = strconv.FormatFloat(r, 'f', 0, 64)
	}
	return strings.Join(parts, " ")
}

func formatRate(r float64) string {
	return formatBytes(uint64(r)) + "/s"
}

type count struct {
	Key   string
	Value uint64
}

// sortedCounts is m's non-zero counts by key.
func sortedCounts(m map[string]uint64) []count {
	var out []count
	for k, v := range m {
		if v > 0 {
			out = append(out, count{k, v})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// webCollector exports the failed logins to /metrics.
func (s *Server) webCollector() prometheus.Collector {
	return prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "natbox_admin_login_failures_total",
		Help: "Logins to the status page refused for a wrong token.",
	}, func() float64 { return float64(s.web.loginFailed.Load()) })
}

// PageHelp tells the user where the status page of cfg is and how to get
// in: the lines `natbox status --web` prints.
func PageHelp(cfg conf.Admin) ([]string, error) {
	if cfg.Listen == "" {
		return nil, fmt.Errorf(`[admin] listen is not set, so there is no status page; set it (e.g. listen = "127.0.0.1:9108") and restart natbox`)
	}
	host, port, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("admin.listen %q: %w; write host:port, e.g. \"127.0.0.1:9108\"", cfg.Listen, err)
	}
	var lines []string
	if addr, err := netip.ParseAddr(host); host == "" || (err == nil && addr.IsUnspecified()) {
		lines = append(lines, fmt.Sprintf("Open http://%s/ on this machine, or http://<this machine's address>:%s/ from another one.",
			net.JoinHostPort("127.0.0.1", port), port))
	} else {
		lines = append(lines, fmt.Sprintf("Open http://%s/", net.JoinHostPort(host, port)))
	}
	if cfg.TokenFile != "" {
		lines = append(lines, fmt.Sprintf("Log in with the token in %s (the page asks for it; scripts send Authorization: Bearer).", cfg.TokenFile))
	} else {
		lines = append(lines, "No token: the page is open to this machine only (listen is a loopback address).")
	}
	return lines, nil
}
