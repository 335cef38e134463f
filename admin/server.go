package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

const (
	socketDirMode  = 0o755
	socketFileMode = 0o660
	// staleProbeTimeout bounds the dial that tells a live socket from a stale one.
	staleProbeTimeout = time.Second
	// shutdownGrace lets an answer in flight finish when the server stops.
	shutdownGrace = 2 * time.Second
)

// Options are the admin server's optional dependencies.
type Options struct {
	// Registry receives natbox's collector; /metrics serves it. nil: a private
	// registry with the Go runtime and process collectors. Never the global one,
	// so two servers in one process (tests, natbox demo) do not collide.
	Registry *prometheus.Registry
	// Ready reports whether every ingress is up; /readyz answers 503 with its
	// error otherwise. nil: ready whenever the server runs.
	Ready func() error
	// Now is the clock for snapshot times and ages. nil: time.Now.
	Now func() time.Time
}

// Server serves the control API on a unix socket and, optionally, metrics,
// health and status over HTTP on TCP.
type Server struct {
	src  Source
	opts Options
	log  *zap.Logger

	unixLn, tcpLn   net.Listener // nil when not configured
	unixSrv, tcpSrv *http.Server
	listen          string    // [admin] listen the HTTP listener was opened with
	gate            tokenGate // the HTTP listener's bearer token
	web             *web      // the status page at / (web.go)

	reloadMu  sync.Mutex // serializes reloads
	closeOnce sync.Once
	closed    chan struct{}
}

// NewServer opens the listeners of cfg, so that a busy socket or a bad listen
// address is a startup error, and returns a server that serves them in Run.
// An empty cfg.Socket means no control socket (tests, natbox demo).
func NewServer(cfg conf.Admin, src Source, opts Options, log *zap.Logger) (*Server, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Registry == nil {
		opts.Registry = prometheus.NewRegistry()
		opts.Registry.MustRegister(
			collectors.NewGoCollector(),
			collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		)
	}
	if err := opts.Registry.Register(NewCollector(src, opts.Now)); err != nil {
		return nil, fmt.Errorf("register natbox metrics: %w", err)
	}
	s := &Server{src: src, opts: opts, log: log, closed: make(chan struct{}), web: newWeb()}
	if err := opts.Registry.Register(s.webCollector()); err != nil {
		return nil, fmt.Errorf("register natbox metrics: %w", err)
	}

	var token string
	if cfg.Listen != "" {
		var err error
		if token, err = listenToken(cfg); err != nil {
			return nil, err
		}
	}
	if cfg.Socket != "" {
		ln, err := listenSocket(cfg.Socket)
		if err != nil {
			return nil, err
		}
		s.unixLn = ln
		s.unixSrv = newHTTPServer(s.socketMux())
	}
	if cfg.Listen != "" {
		ln, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			s.closeListeners()
			return nil, fmt.Errorf("admin http listen %s: %w; pick a free address for [admin] listen", cfg.Listen, err)
		}
		s.tcpLn, s.listen = ln, cfg.Listen
		s.gate.set(token)
		mux := s.httpMux()
		s.webRoutes(mux)
		s.tcpSrv = newHTTPServer(s.webGate(mux))
	}
	return s, nil
}

func newHTTPServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       60 * time.Second,
	}
}

// ReloadToken reads the HTTP listener's bearer token from tokenFile again,
// for a reload (a rotated token, another token_file). It returns apply,
// which makes the listener require that token from the next request on, or
// the problem, and then nothing changes. Without an HTTP listener apply does
// nothing.
func (s *Server) ReloadToken(tokenFile string) (apply func(), err error) {
	if s.tcpSrv == nil {
		return func() {}, nil
	}
	token, err := listenToken(conf.Admin{Listen: s.listen, TokenFile: tokenFile})
	if err != nil {
		return nil, err
	}
	return func() { s.gate.set(token) }, nil
}

// Addr returns the HTTP listener's address, or nil without [admin] listen.
func (s *Server) Addr() net.Addr {
	if s.tcpLn == nil {
		return nil
	}
	return s.tcpLn.Addr()
}

// ErrClosed is returned by Run on a closed Server.
var ErrClosed = errors.New("admin: server closed")

// Run serves until ctx is done or Close is called, then stops, letting
// answers in flight finish for a short grace, and returns once its
// goroutines have stopped. It returns nil on a clean stop, and ErrClosed
// at once after Close.
func (s *Server) Run(ctx context.Context) error {
	select {
	case <-s.closed:
		return ErrClosed
	default:
	}
	type served struct {
		srv *http.Server
		ln  net.Listener
	}
	var all []served
	if s.unixSrv != nil {
		all = append(all, served{s.unixSrv, s.unixLn})
		s.log.Info("admin socket listening", zap.String("socket", s.unixLn.Addr().String()))
	}
	if s.tcpSrv != nil {
		all = append(all, served{s.tcpSrv, s.tcpLn})
		s.log.Info("admin http listening", zap.Stringer("listen", s.tcpLn.Addr()))
	}
	stopSampler := s.startSampler()
	defer stopSampler()
	errc := make(chan error, len(all))
	for _, a := range all {
		go func() { errc <- serveErr(a.srv.Serve(a.ln)) }()
	}
	pending := len(all)
	var err error
	select {
	case <-ctx.Done():
	case <-s.closed:
	case err = <-errc:
		pending--
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	for _, a := range all {
		if a.srv.Shutdown(sctx) != nil {
			a.srv.Close()
		}
	}
	for ; pending > 0; pending-- {
		if e := <-errc; err == nil {
			err = e
		}
	}
	s.closeListeners()
	return err
}

func serveErr(err error) error {
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Close stops the server and removes its socket. It is idempotent and safe to
// call before, during or after Run.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		close(s.closed)
		for _, srv := range []*http.Server{s.unixSrv, s.tcpSrv} {
			if srv != nil {
				srv.Close()
			}
		}
		s.closeListeners()
	})
	return nil
}

// closeListeners closes both listeners; closing the unix one unlinks its socket.
func (s *Server) closeListeners() {
	for _, ln := range []net.Listener{s.unixLn, s.tcpLn} {
		if ln != nil {
			ln.Close()
		}
	}
}

// listenSocket creates the control socket at path, replacing a stale socket
// file only when nothing answers on it.
func listenSocket(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), socketDirMode); err != nil {
		return nil, fmt.Errorf("create admin socket directory: %w; create it, or set [admin] socket to a writable path", err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w; set [admin] socket to a writable path", err)
	}
	// Owner and group only: the socket can reload the config.
	if err := os.Chmod(path, socketFileMode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	return ln, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("admin socket %s exists and is not a socket; remove it, or set [admin] socket to another path", path)
	}
	c, err := net.DialTimeout("unix", path, staleProbeTimeout)
	if err == nil {
		c.Close()
		return fmt.Errorf("another natbox is already running with admin socket %s (it answered); stop it first, or give this one another [admin] socket", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("check admin socket %s: %w", path, err)
	}
	// Left behind by a natbox that died: nothing listens on it.
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale admin socket: %w", err)
	}
	return nil
}

// socketMux is the control API: everything, including reload.
func (s *Server) socketMux() *http.ServeMux {
	mux := s.httpMux()
	mux.HandleFunc("GET /v1/sessions", s.handleSessions)
	mux.HandleFunc("POST /v1/reload", s.handleReload)
	return mux
}

// httpMux is the read-only surface served on TCP.
func (s *Server) httpMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.opts.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", s.handleReady)
	mux.HandleFunc("GET /status", s.handleStatus)
	mux.HandleFunc("GET /v1/status", s.handleStatus)
	return mux
}

func (s *Server) handleReady(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if s.opts.Ready != nil {
		if err := s.opts.Ready(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: %v\n", err)
			return
		}
	}
	fmt.Fprintln(w, "ready")
}

func (s *Server) handleStatus(w http.ResponseWriter, _ *http.Request) {
	st := s.src.Status()
	if st.Time.IsZero() {
		st.Time = s.opts.Now()
	}
	if st.Mappings == nil {
		st.Mappings = []Mapping{}
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) handleSessions(w http.ResponseWriter, r *http.Request) {
	sessions := s.src.Sessions(r.URL.Query().Get("mapping"))
	now := s.opts.Now()
	for i := range sessions {
		fillAges(&sessions[i], now)
	}
	if sessions == nil {
		sessions = []Session{}
	}
	writeJSON(w, http.StatusOK, sessions)
}

func fillAges(ss *Session, now time.Time) {
	if ss.AgeSeconds == 0 && !ss.Started.IsZero() {
		ss.AgeSeconds = now.Sub(ss.Started).Seconds()
	}
	if ss.IdleSeconds == 0 {
		last := ss.LastActive
		if last.IsZero() {
			last = ss.Started
		}
		if !last.IsZero() {
			ss.IdleSeconds = now.Sub(last).Seconds()
		}
	}
}

// errorBody is the JSON of every non-2xx answer.
type errorBody struct {
	Error string `json:"error"`
	// Errors are the config problems of a refused reload, one per line.
	Errors []string `json:"errors,omitempty"`
}

func (s *Server) handleReload(w http.ResponseWriter, r *http.Request) {
	s.reloadMu.Lock()
	// A reload that started finishes even if natbox reload is interrupted.
	res, err := s.src.Reload(context.WithoutCancel(r.Context()))
	s.reloadMu.Unlock()
	var ce *ConfigError
	switch {
	case errors.As(err, &ce):
		s.log.Debug("admin reload refused", zap.Int("count", len(ce.Lines)))
		writeJSON(w, http.StatusUnprocessableEntity, errorBody{Error: "invalid config, nothing changed", Errors: ce.Lines})
	case err != nil:
		s.log.Debug("admin reload failed", zap.Error(err))
		writeJSON(w, http.StatusInternalServerError, errorBody{Error: err.Error()})
	default:
		s.log.Debug("admin reload done", zap.Int("added", len(res.Added)),
			zap.Int("changed", len(res.Changed)), zap.Int("removed", len(res.Removed)))
		writeJSON(w, http.StatusOK, res)
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v) // the client went away if this fails; nothing to do
}
