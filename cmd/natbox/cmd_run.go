package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/app"
)

var logLevelFlag = &cli.StringFlag{
	Name:  "log-level",
	Usage: logLevelFlagUsage,
}

func runCommand() *cli.Command {
	return &cli.Command{
		Name:  "run",
		Usage: "run the appliance: serve the config's mappings until SIGINT or SIGTERM",
		Description: `Starts every ingress the config names: [tun] creates (or attaches to) the TUN
device, brings it up and installs its routes (needs CAP_NET_ADMIN and /dev/net/tun);
[uplink] keeps a WireGuard tunnel to a natbox relay (needs no privileges).
SIGHUP or "natbox reload" re-reads the config: an invalid file changes nothing.
SIGINT/SIGTERM stop admitting new flows, drain sessions for [limits] shutdown_grace,
remove the routes natbox added, close the TUN and exit 0.`,
		Flags: []cli.Flag{configFlag, logLevelFlag},
		Action: func(c *cli.Context) error {
			cfg, warnings, err := conf.Load(c.String("config"))
			if err != nil {
				return err
			}
			log, level, stop, err := startDaemon(c, cfg.Log, warnings, cfg.Limits.Runtime(), len(cfg.Uplinks) > 0)
			if err != nil {
				return err
			}
			defer stop()
			a, err := app.NewAppliance(cfg, app.Options{Version: version}, log)
			if err != nil {
				return err
			}
			a.SetLogLevel(level)
			stopHUP := onSIGHUP(c.Context, func() { _, _ = a.Reload() })
			defer stopHUP()
			return runWithShutdownWatchdog(c.Context, cfg.Limits.ShutdownGrace.D(), c.App.ErrWriter, osExit, func() error {
				return a.Run(c.Context)
			})
		},
	}
}

func relayCommand() *cli.Command {
	return &cli.Command{
		Name:  "relay",
		Usage: "run the relay on a public server for appliances behind carrier-grade NAT",
		Description: `Listens for WireGuard from the [[peer]] appliances in the relay config. Each
appliance registers the ports its mappings need; the relay opens public listeners
for those inside the peer's "ports" and refuses the rest. Public flows reach the
appliance with the client's real address. Needs no root, only the right to bind
the public ports (CAP_NET_BIND_SERVICE for ports below 1024).
SIGHUP (or "natbox reload -c FILE") re-reads peers, port allowances, dial_timeout
and max_sessions without dropping other peers' flows. The admin socket defaults to
/run/natbox/relay.sock, so a relay and an appliance share a host with defaults.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Aliases: []string{"c"}, Usage: "relay config `FILE`", Value: "/etc/natbox/relay.toml", EnvVars: []string{"NATBOX_RELAY_CONFIG"}, TakesFile: true},
			logLevelFlag,
		},
		Action: func(c *cli.Context) error {
			cfg, warnings, err := conf.LoadRelay(c.String("config"))
			if err != nil {
				return err
			}
			log, level, stop, err := startDaemon(c, cfg.Log, warnings, cfg.Relay.Runtime(), true)
			if err != nil {
				return err
			}
			defer stop()
			n, err := app.NewRelayNode(cfg, version, log)
			if err != nil {
				return err
			}
			n.SetLogLevel(level)
			stopHUP := onSIGHUP(c.Context, func() { _, _ = n.Reload() })
			defer stopHUP()
			return runWithShutdownWatchdog(c.Context, 0, c.App.ErrWriter, osExit, func() error {
				return n.Run(c.Context)
			})
		},
	}
}

// startDaemon is what "run" and "relay" do before building their node: the
// logger (with the config's warnings), the benchmarks' profiles when their
// environment asks (profile.go), and the Go runtime's settings (runtime.go)
// for a process that carries a relay tunnel or does not. stop writes the
// profiles and flushes the log.
func startDaemon(c *cli.Context, lc conf.Log, warnings []conf.Warning, rt conf.Runtime, tunnel bool) (log *zap.Logger, level *zap.AtomicLevel, stop func(), err error) {
	log, level, err = daemonLogger(c, lc, warnings)
	if err != nil {
		return nil, nil, nil, err
	}
	stopProfile, err := startCPUProfile(os.Getenv(cpuProfileEnv))
	if err != nil {
		log.Sync()
		return nil, nil, nil, err
	}
	stopHeap, err := startHeapProfile(os.Getenv(heapProfileEnv), 50*time.Millisecond)
	if err != nil {
		stopProfile()
		log.Sync()
		return nil, nil, nil, err
	}
	setMemoryLimit(rt.MemoryLimit, log)
	setGC(tunnel, log)
	setProcs(rt.Procs, tunnel, log)
	return log, level, func() {
		stopHeap()
		stopProfile()
		log.Sync()
	}, nil
}

// daemonLogger builds a long-running command's logger and logs the
// config's warnings through it. level is the logger's level for reloads to
// change, or nil when --log-level fixes it.
func daemonLogger(c *cli.Context, lc conf.Log, warnings []conf.Warning) (log *zap.Logger, level *zap.AtomicLevel, err error) {
	log, lvl, err := newLogger(lc, c.String("log-level"), c.App.ErrWriter)
	if err != nil {
		return nil, nil, err
	}
	for _, w := range warnings {
		log.Warn("config", zap.Stringer("warning", w))
	}
	if c.String("log-level") == "" {
		level = &lvl
	}
	return log, level, nil
}

// onSIGHUP calls fn for each SIGHUP until ctx ends or the returned stop is called.
func onSIGHUP(ctx context.Context, fn func()) (stop func()) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGHUP)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			select {
			case <-ch:
				fn()
			case <-ctx.Done():
				return
			case <-done:
				return
			}
		}
	}()
	return func() {
		signal.Stop(ch)
		close(done)
		<-finished
	}
}
