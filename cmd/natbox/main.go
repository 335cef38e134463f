// Command natbox is a userspace port-mapping appliance: it sends traffic that
// arrives at a public address and port to an internal address and port, from a
// kernel TUN (gateway mode) or through a WireGuard uplink to a relay on a
// public server (relay mode, for boxes behind carrier-grade NAT).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/natbox/natbox/conf"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes, the same for every command.
const (
	exitOK      = 0
	exitRuntime = 1
	exitUsage   = 2 // bad config or bad command line
)

// usageError marks an error as the user's input, so it exits 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

const defaultConfigPath = "/etc/natbox/natbox.toml"

var configFlag = &cli.StringFlag{
	Name:      "config",
	Aliases:   []string{"c"},
	Usage:     "config file `FILE`",
	Value:     defaultConfigPath,
	EnvVars:   []string{"NATBOX_CONFIG"},
	TakesFile: true,
}

func newApp(stdout, stderr io.Writer) *cli.App {
	app := &cli.App{
		Name:    "natbox",
		Usage:   "userspace port mapping: expose chosen internal services through a TUN gateway or a WireGuard relay",
		Version: version,
		Description: `natbox maps public ports to internal services. In gateway mode a kernel TUN device
feeds a userspace TCP/IP stack; in relay mode an outbound WireGuard tunnel to
"natbox relay" on a public server carries flows from boxes behind carrier-grade NAT,
with the real client address. One TOML file describes the mappings.

Try it without root or setup:   natbox demo
Check a config:                 natbox check -c natbox.toml
Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage.`,
		Writer:               stdout,
		ErrWriter:            stderr,
		HideHelpCommand:      true,
		Suggest:              true,
		EnableBashCompletion: true,
		// urfave/cli would call os.Exit inside Run for ExitCoder errors, skipping
		// deferred cleanup: main maps errors to exit codes instead.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError:   onUsageError,
		Action:         rootAction,
		Commands: []*cli.Command{
			runCommand(),
			checkCommand(),
			relayCommand(),
			demoCommand(),
			statusCommand(),
			sessionsCommand(),
			reloadCommand(),
			healthCommand(),
			doctorCommand(),
			genkeyCommand(),
			pubkeyCommand(),
			versionCommand(),
		},
	}
	// urfave/cli applies OnUsageError to the root only: a bad flag after a
	// command would otherwise exit 1 with the help text on stdout.
	for _, c := range app.Commands {
		c.OnUsageError = onUsageError
	}
	return app
}

// onUsageError turns a flag parsing error into a usage error (exit 2) that
// says where the flags are documented.
func onUsageError(c *cli.Context, err error, _ bool) error {
	return usageError{fmt.Errorf("%w; see %s --help", err, c.Command.HelpName)}
}

// rootAction runs when no command matched: help for "natbox" and
// "natbox help [COMMAND]" (the help command is hidden), a usage error for
// anything else.
func rootAction(c *cli.Context) error {
	args := c.Args()
	switch {
	case !args.Present():
		return cli.ShowAppHelp(c)
	case args.First() == "help" && args.Len() == 1:
		return cli.ShowAppHelp(c)
	case args.First() == "help" && c.App.Command(args.Get(1)) != nil:
		return cli.ShowCommandHelp(c, args.Get(1))
	}
	name := args.First()
	if name == "help" {
		name = args.Get(1)
	}
	err := fmt.Errorf("unknown command %q; natbox --help lists the commands", name)
	if s := cli.SuggestCommand(c.App.Commands, name); s != "" {
		err = fmt.Errorf("%w. %s", err, s)
	}
	return usageError{err}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newApp(os.Stdout, os.Stderr).RunContext(ctx, os.Args)
	stop()
	os.Exit(report(os.Stderr, err))
}

// report prints err for a person and returns the exit code for it.
func report(w io.Writer, err error) int {
	if err == nil {
		return exitOK
	}
	var ce *conf.Errors
	var ue usageError
	var silent silentExit
	switch {
	case errors.As(err, &silent):
		return silent.code
	case errors.As(err, &ce):
		fmt.Fprintln(w, ce.Error())
		fmt.Fprintf(w, "natbox: %d problem(s) in the config; nothing was applied\n", len(ce.List))
		return exitUsage
	case errors.As(err, &ue):
		fmt.Fprintf(w, "natbox: %v\n", err)
		return exitUsage
	default:
		fmt.Fprintf(w, "natbox: %v\n", err)
		return exitRuntime
	}
}

// silentExit ends a command with a code after it has already said why.
type silentExit struct{ code int }

func (e silentExit) Error() string { return fmt.Sprintf("exit %d", e.code) }
