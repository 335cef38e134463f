package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/app"
)

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:  "demo",
		Usage: "run a relay, an appliance and an internal web service in one process, on loopback, no root",
		Description: `Shows relay mode end to end on this machine: a natbox relay listens on loopback,
an appliance with no public address keeps a WireGuard uplink to it, and a small
internal HTTP service sits behind the appliance. The relay's public port answers
with the internal service's page, which shows the client address natbox delivered
(the real one, carried through the tunnel and handed over with PROXY protocol).
Nothing leaves 127.0.0.1. Stop it with Ctrl-C.`,
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "port", Value: 8080, Usage: "public `PORT` the relay opens on 127.0.0.1"},
			&cli.BoolFlag{Name: "once", Usage: "make one request through natbox, print it and exit (for scripts)"},
			logLevelFlag,
		},
		Action: runDemo,
	}
}

func runDemo(c *cli.Context) error {
	ctx := c.Context
	out := c.App.Writer
	level := c.String("log-level")
	if level == "" {
		level = "warn"
	}
	log, _, err := newLogger(conf.Log{}, level, c.App.ErrWriter)
	if err != nil {
		return err
	}
	defer log.Sync()
	port := c.Int("port")
	if port < 1 || port > 65535 {
		return usagef("--port %d: use 1-65535", port)
	}
	if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err != nil {
		return usagef("127.0.0.1:%d is busy (%v); pick another with --port", port, err)
	} else {
		l.Close()
	}

	svc, err := startDemoService()
	if err != nil {
		return err
	}
	defer svc.Close()

	dir, err := os.MkdirTemp("", "natbox-demo-")
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	defer os.RemoveAll(dir)
	relayCfg, appCfg, err := demoConfigs(dir, port, svc.Addr().(*net.TCPAddr).Port)
	if err != nil {
		return err
	}
	relay, err := app.NewRelayNode(relayCfg, version, log.Named("relay"))
	if err != nil {
		return fmt.Errorf("start demo relay: %w", err)
	}
	appliance, err := app.NewAppliance(appCfg, app.Options{Version: version}, log.Named("appliance"))
	if err != nil {
		relay.Close()
		return fmt.Errorf("start demo appliance: %w", err)
	}
	// The appliance stops before the relay, as on a real deployment where
	// the relay outlives its appliances: stopped the other way round, the
	// appliance would log its lost control connection at shutdown.
	relayCtx, stopRelay := context.WithCancel(context.WithoutCancel(ctx))
	defer stopRelay()
	appCtx, stopAppliance := context.WithCancel(ctx)
	defer stopAppliance()
	relayDone, appDone := make(chan error, 1), make(chan error, 1)
	go func() { relayDone <- relay.Run(relayCtx) }()
	go func() { appDone <- appliance.Run(appCtx) }()
	defer func() {
		stopAppliance()
		<-appDone
		stopRelay()
		<-relayDone
	}()

	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	fmt.Fprintf(out, "natbox demo: a relay (WireGuard on UDP %s, public ports on 127.0.0.1), an appliance behind it\nwith no public port of its own, and an ", strings.TrimPrefix(relayCfg.Relay.Listen, ":"))
	fmt.Fprintf(out, "internal web service on %s that only natbox reaches.\n", svc.Addr())
	fmt.Fprintf(out, "waiting for the uplink to register tcp/%d on the relay...\n", port)
	body, err := fetchUntilReady(ctx, url, 20*time.Second)
	if err != nil {
		return fmt.Errorf("demo: %s did not answer through natbox: %w (rerun with --log-level debug to see why)", url, err)
	}
	fmt.Fprintf(out, "\n$ curl %s\n%s\n", url, body)
	if c.Bool("once") {
		return nil
	}
	fmt.Fprintf(out, "Public URL: %s   (try: curl %s)\n", url, url)
	fmt.Fprintf(out, "Watch it:   natbox status --socket %s   |   natbox sessions --socket %s\n", appCfg.Admin.Socket, appCfg.Admin.Socket)
	fmt.Fprintf(out, "The relay:  natbox status --socket %s\nCtrl-C to stop.\n", relayCfg.Admin.Socket)
	<-ctx.Done()
	fmt.Fprintln(out, "natbox demo: stopping")
	return nil
}

// demoConfigs writes the two configs a user would write, and loads them
// through the same validation as natbox run.
func demoConfigs(dir string, publicPort, svcPort int) (*conf.RelayConfig, *conf.Config, error) {
	relayKey, err := conf.GenerateKey()
	if err != nil {
		return nil, nil, err
	}
	appKey, err := conf.GenerateKey()
	if err != nil {
		return nil, nil, err
	}
	wgPort, err := freeUDPPort()
	if err != nil {
		return nil, nil, err
	}
	relayTOML := fmt.Sprintf(`
[relay]
listen      = ":%d"                 # WireGuard binds every address; its peers are keys, not addresses
private_key = %q
address     = "100.96.0.1"
public_bind = ["127.0.0.1"]

[admin]
socket = %q

[[peer]]
name       = "demo-home"
public_key = %q
address    = "100.96.0.2"
ports      = ["tcp/%d"]
`, wgPort, relayKey, filepath.Join(dir, "relay.sock"), appKey.Public(), publicPort)
	appTOML := fmt.Sprintf(`
[uplink]
relay            = "127.0.0.1:%d"
relay_public_key = %q
private_key      = %q
address          = "100.96.0.2"
keepalive        = "5s"

[limits]
shutdown_grace = "1s"

[admin]
socket = %q

[[mapping]]
name           = "demo-web"
protocol       = "tcp"
listen         = "%d"
target         = "127.0.0.1:%d"
proxy_protocol = "v1"
description    = "natbox demo: internal web service"
owner          = "demo"
`, wgPort, relayKey.Public(), appKey, filepath.Join(dir, "appliance.sock"), publicPort, svcPort)
	rc, _, err := conf.ParseRelay("demo-relay.toml", []byte(relayTOML))
	if err != nil {
		return nil, nil, fmt.Errorf("demo relay config: %w", err)
	}
	ac, _, err := conf.Parse("demo-appliance.toml", []byte(appTOML))
	if err != nil {
		return nil, nil, fmt.Errorf("demo appliance config: %w", err)
	}
	return rc, ac, nil
}

func freeUDPPort() (int, error) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free UDP port on loopback: %w", err)
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).Port, nil
}

func fetchUntilReady(ctx context.Context, url string, limit time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	// No keep-alive: an idle kept connection would be a live session that
	// the demo's shutdown waits on.
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err == nil {
			b, rerr := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				return string(b), nil
			}
			err = errors.Join(rerr, fmt.Errorf("status %s", resp.Status))
		}
		last = err
		select {
		case <-ctx.Done():
			return "", last
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// demoService is the "internal" web service: it reads the PROXY v1 line
// natbox sends and reports the client address it names.
type demoService struct {
	net.Listener
	srv *http.Server
}

func startDemoService() (*demoService, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("internal demo service: %w", err)
	}
	pl := &proxyV1Listener{Listener: l}
	s := &demoService{Listener: l}
	s.srv = &http.Server{
		ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "Hello from the internal service at %s.\n", l.Addr())
			fmt.Fprintf(w, "natbox delivered your request from %s (your real address, via the relay and PROXY protocol).\n", r.RemoteAddr)
		}),
		ErrorLog: zap.NewStdLog(zap.NewNop()),
	}
	go s.srv.Serve(pl)
	return s, nil
}

func (s *demoService) Close() error { return s.srv.Close() }

// proxyV1Listener accepts connections that begin with a PROXY protocol v1
// line and reports the address it carries as the connection's RemoteAddr.
type proxyV1Listener struct{ net.Listener }

func (l *proxyV1Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		br := bufio.NewReaderSize(c, 256)
		line, err := br.ReadString('\n')
		c.SetReadDeadline(time.Time{})
		f := strings.Fields(line)
		if err != nil || len(f) != 6 || f[0] != "PROXY" {
			c.Close() // not from natbox: the demo service is reachable only through it
			continue
		}
		return &proxiedConn{Conn: c, r: br, remote: &net.TCPAddr{IP: net.ParseIP(f[2]), Port: atoiOr0(f[4])}}, nil
	}
}

type proxiedConn struct {
	net.Conn
	r      *bufio.Reader
	remote net.Addr
}

func (c *proxiedConn) Read(b []byte) (int, error) { return c.r.Read(b) }
func (c *proxiedConn) RemoteAddr() net.Addr       { return c.remote }

func atoiOr0(s string) int {
	n := 0
	for _, ch := range s {
		if ch < '0' || ch > '9' {
			return 0
		}
		n = n*10 + int(ch-'0')
	}
	return n
}
