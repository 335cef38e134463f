package app

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sync"

	"go.uber.org/zap"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
)

// newAdmin opens the control socket and the optional HTTP listener. The
// default socket lives in /run, which an unprivileged natbox (an uplink-only
// appliance, a relay) may not write: then it runs without the socket and says
// how to get one, instead of refusing to start.
func newAdmin(c conf.Admin, src admin.Source, ready func() error, log *zap.Logger) (*admin.Server, error) {
	s, err := admin.NewServer(c, src, admin.Options{Ready: ready}, log.Named("admin"))
	isDefault := c.Socket == conf.DefaultAdminSocket || c.Socket == conf.DefaultRelayAdminSocket
	if err != nil && isDefault && errors.Is(err, fs.ErrPermission) {
		log.Warn("no admin socket: permission denied; natbox status/sessions/reload need [admin] socket set to a writable path",
			zap.String("socket", c.Socket), zap.Error(err))
		c.Socket = ""
		if c.Listen == "" {
			return nil, nil
		}
		s, err = admin.NewServer(c, src, admin.Options{Ready: ready}, log.Named("admin"))
	}
	return s, err
}

// goRun runs one piece's Run on its own goroutine, tracked by wg; the first
// failure goes to errc (a piece stopped by Close or ctx is no failure).
func goRun(ctx context.Context, name string, run func(context.Context) error, wg *sync.WaitGroup, errc chan<- error) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := run(ctx); err != nil && !errors.Is(err, context.Canceled) {
			select {
			case errc <- fmt.Errorf("%s: %w", name, err):
			default:
			}
		}
	}()
}

// runAdmin serves s until ctx ends; wg tracks it. A nil server is a no-op.
func runAdmin(ctx context.Context, s *admin.Server, wg *sync.WaitGroup, log *zap.Logger) {
	if s == nil {
		return
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := s.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
			log.Error("admin server stopped", zap.Error(err))
		}
	}()
}
