package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/natbox/natbox/admin"
)

func healthCommand() *cli.Command {
	return &cli.Command{
		Name:  "health",
		Usage: "exit 0 when the running natbox answers on its admin socket and is ready, 1 otherwise (container and service health checks)",
		Description: `Asks the running natbox (or natbox relay) for /readyz over its admin socket:
ready means every ingress is up, so an appliance with an [uplink] is ready only
while the relay has registered it (with several [[uplink]]s: while at least one
relay has). Needs no shell or HTTP client, so it serves as
a container HEALTHCHECK:
  HEALTHCHECK CMD ["/natbox", "health"]
For a relay pass its config: natbox health --config /etc/natbox/relay.toml.
Finds the running natbox through --socket or the [admin] socket of --config.`,
		Flags: []cli.Flag{configFlag, socketFlag,
			&cli.DurationFlag{Name: "timeout", Value: 5 * time.Second, Usage: "how long to wait for the answer"},
		},
		Action: func(c *cli.Context) error {
			ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
			defer cancel()
			cl, err := dialAdmin(c)
			if err != nil {
				return err
			}
			defer cl.Close()
			if err := cl.Ready(ctx); err != nil {
				if errors.Is(err, admin.ErrNotRunning) {
					return err
				}
				return fmt.Errorf("natbox on %s is not healthy: %w", adminSocket(c), err)
			}
			fmt.Fprintf(c.App.Writer, "ok: natbox on %s is ready\n", adminSocket(c))
			return nil
		},
	}
}
