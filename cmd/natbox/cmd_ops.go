package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/doctor"
)

var (
	socketFlag = &cli.StringFlag{
		Name:      "socket",
		Usage:     "admin socket `PATH` of the running natbox (default: [admin] socket of --config)",
		TakesFile: true,
	}
	jsonFlag = &cli.BoolFlag{Name: "json", Usage: "print JSON for scripts instead of a table"}
)

// adminSocket finds the running natbox: --socket, else the config's [admin]
// socket. A config that no longer validates still names its socket (so
// "natbox reload" can report the errors from the running process).
func adminSocket(c *cli.Context) string {
	if s := c.String("socket"); s != "" {
		return s
	}
	return conf.AdminSocketOf(c.String("config"))
}

func dialAdmin(c *cli.Context) (*admin.Client, error) { return admin.Dial(adminSocket(c)) }

// showFromAdmin asks the running natbox with get and prints the answer as
// a table with render, or as JSON with --json.
func showFromAdmin[T any](c *cli.Context, get func(*admin.Client, context.Context) (T, error), render func(io.Writer, T) error) error {
	cl, err := dialAdmin(c)
	if err != nil {
		return err
	}
	defer cl.Close()
	v, err := get(cl, c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return admin.WriteJSON(c.App.Writer, v)
	}
	return render(c.App.Writer, v)
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show the running natbox: mappings with state, hits, bytes, sessions, refusals; TUN; uplink or relay",
		Description: `States: active, disabled, expired (its expires date passed), refused_by_relay.
Refusals are counted by reason: no_match, denied, not_allowed, over_limit,
dial_failed. The TUN section counts packets each way and those the kernel
dropped before natbox read them (natbox short of CPU). A relay lists its peers
with the public connections it reset because the appliance refused them.
Finds the running natbox through --socket or the [admin] socket of --config.
--web prints the address of the live status page ([admin] listen of --config)
and how to log in, and asks the running natbox nothing.`,
		Flags: []cli.Flag{configFlag, socketFlag, jsonFlag,
			&cli.BoolFlag{Name: "web", Usage: "print the URL of the status page in a browser ([admin] listen of --config)"},
		},
		Action: func(c *cli.Context) error {
			if c.Bool("web") {
				return printPageHelp(c)
			}
			return showFromAdmin(c, (*admin.Client).Status, admin.RenderStatus)
		},
	}
}

func sessionsCommand() *cli.Command {
	return &cli.Command{
		Name:  "sessions",
		Usage: "list live sessions with the real client address, target, age, bytes and idle time",
		Flags: []cli.Flag{configFlag, socketFlag, jsonFlag,
			&cli.StringFlag{Name: "mapping", Aliases: []string{"m"}, Usage: "only the sessions of mapping `NAME`"},
		},
		Action: func(c *cli.Context) error {
			sessions := func(cl *admin.Client, ctx context.Context) ([]admin.Session, error) {
				return cl.Sessions(ctx, c.String("mapping"))
			}
			return showFromAdmin(c, sessions, admin.RenderSessions)
		},
	}
}

func reloadCommand() *cli.Command {
	return &cli.Command{
		Name:  "reload",
		Usage: "make the running natbox re-read its config; an invalid file changes nothing (exit 2)",
		Description: `The new mapping set is swapped in atomically. Sessions of unchanged mappings keep
running; sessions of removed or disabled mappings close at once; a changed mapping
keeps only the sessions the change cannot widen access for (a narrower allow list
closes the sessions it no longer admits). The same happens on SIGHUP.
The --config file (an appliance's or a relay's) is checked first: if it has
problems they are printed, nothing is reloaded and the exit code is 2. Settings
that apply only at start ([admin] socket, listen, watch; [log] format) are
listed as "restart natbox to apply KEY"; the log level and the HTTP token apply.`,
		Flags: []cli.Flag{configFlag, socketFlag, jsonFlag},
		Action: func(c *cli.Context) error {
			socket := c.String("socket")
			if socket == "" || c.IsSet("config") {
				// A broken file must not send us to a default socket, nor
				// reach the running natbox: report it here.
				adm, err := conf.LoadAdmin(c.String("config"))
				var ce *conf.Errors
				if errors.As(err, &ce) {
					return reloadRefused(c.App.ErrWriter, strings.Split(ce.Error(), "\n"))
				}
				if err != nil {
					return err
				}
				if socket == "" {
					socket = adm.Socket
				}
			}
			cl, err := admin.Dial(socket)
			if err != nil {
				return err
			}
			defer cl.Close()
			res, err := cl.Reload(c.Context)
			var ce *admin.ConfigError
			if errors.As(err, &ce) {
				return reloadRefused(c.App.ErrWriter, ce.Lines)
			}
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return admin.WriteJSON(c.App.Writer, res)
			}
			fmt.Fprintf(c.App.Writer, "reloaded: added %v, changed %v, removed %v; %d session(s) closed\n",
				res.Added, res.Changed, res.Removed, res.SessionsClosed)
			for _, r := range res.Restart {
				fmt.Fprintln(c.App.Writer, "not applied: "+r)
			}
			return nil
		},
	}
}

// reloadRefused prints a refused reload's problems, one per line, and exits 2.
func reloadRefused(w io.Writer, lines []string) error {
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
	fmt.Fprintln(w, "natbox: reload refused, nothing changed; fix the config and reload again")
	return silentExit{exitUsage}
}

func doctorCommand() *cli.Command {
	return &cli.Command{
		Name:  "doctor",
		Usage: "diagnose why a mapping does not work; changes nothing",
		Description: `Checks every mapping's target (listening, refused, timed out, name not resolving),
this box's own addresses (carrier-grade or double NAT), the TUN device, its routes
and permissions, the relay uplink, risky services exposed to everyone, and mappings
whose review date passed or that have no owner. Each finding is ok, warning or
problem, with the fix in plain words. Exit 0 when nothing is a problem, 1 otherwise.`,
		Flags: []cli.Flag{configFlag, socketFlag,
			&cli.DurationFlag{Name: "timeout", Value: 3 * time.Second, Usage: "how long each target probe may take"},
		},
		Action: func(c *cli.Context) error {
			cfg, _, err := conf.Load(c.String("config"))
			if err != nil {
				return err
			}
			socket := adminSocket(c)
			rep := doctor.Run(c.Context, cfg, doctor.Options{
				DialTimeout: c.Duration("timeout"),
				Status: func(ctx context.Context) (admin.Status, error) {
					cl, err := admin.Dial(socket)
					if err != nil {
						return admin.Status{}, err
					}
					defer cl.Close()
					return cl.Status(ctx)
				},
			})
			if err := rep.Write(c.App.Writer); err != nil {
				return err
			}
			if rep.HasProblems() {
				return silentExit{exitRuntime}
			}
			return nil
		},
	}
}

// printPageHelp prints where the status page of --config is.
func printPageHelp(c *cli.Context) error {
	adm, err := conf.LoadAdmin(c.String("config"))
	if err != nil {
		return err
	}
	lines, err := admin.PageHelp(adm)
	if err != nil {
		return err
	}
	for _, l := range lines {
		fmt.Fprintln(c.App.Writer, l)
	}
	return nil
}
