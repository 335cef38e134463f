package app

import (
	"fmt"
	"sync"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
)

// Reloaded is what a reload did.
type Reloaded struct {
	forwarder.Diff // the mappings (an appliance)
	// Restart lists the changed settings this process cannot apply, each
	// as "restart natbox to apply KEY"; everything else was applied.
	Restart []string
}

// liveSettings are the [log] and [admin] settings of a running natbox. A
// reload applies the log level (when the process logger's level was handed
// over) and the HTTP listener's token (re-read even when token_file is
// unchanged, so a rotated token applies); the log format, socket, listen
// address and watch apply at start only, so a reload that changes them
// says to restart.
type liveSettings struct {
	program string // "natbox" or "natbox relay", for the restart notes

	mu      sync.Mutex
	level   *zap.AtomicLevel // nil: fixed (--log-level)
	admin   *admin.Server    // nil: none
	started struct {
		log   conf.Log
		admin conf.Admin
	}
}

func newLiveSettings(program string, l conf.Log, a conf.Admin) *liveSettings {
	s := &liveSettings{program: program}
	s.started.log, s.started.admin = l, a
	return s
}

// setLevel hands over the process logger's level.
func (s *liveSettings) setLevel(l *zap.AtomicLevel) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.level = l
}

// prepare checks next's [log] and [admin] against what runs. apply makes
// the changes that can be made in place; restart lists the others. An error
// (a token file that cannot be used) must refuse the whole reload: nothing
// has changed yet.
func (s *liveSettings) prepare(next conf.Log, nextAdmin conf.Admin) (apply func(), restart []string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, oldAdmin := s.started.log, s.started.admin
	note := func(key string) { restart = append(restart, fmt.Sprintf("restart %s to apply %s", s.program, key)) }

	var setLevel func()
	if lvl := s.level; lvl != nil {
		l, err := zapcore.ParseLevel(next.Level)
		if err != nil { // conf validated it
			return nil, nil, fmt.Errorf("log.level: %w", err)
		}
		if lvl.Level() != l {
			setLevel = func() { lvl.SetLevel(l) }
		}
	} else if next.Level != old.Level {
		restart = append(restart, fmt.Sprintf("log.level is fixed by --log-level; restart %s without it to apply log.level", s.program))
	}
	if next.Format != old.Format {
		note("log.format")
	}
	if nextAdmin.Socket != oldAdmin.Socket {
		note("admin.socket")
	}
	if nextAdmin.Listen != oldAdmin.Listen {
		note("admin.listen")
	}
	if nextAdmin.Watch != oldAdmin.Watch {
		note("admin.watch")
	}
	setToken := func() {}
	if s.admin != nil && nextAdmin.Listen == oldAdmin.Listen {
		if setToken, err = s.admin.ReloadToken(nextAdmin.TokenFile); err != nil {
			return nil, nil, err
		}
	}
	return func() {
		if setLevel != nil {
			setLevel()
		}
		setToken()
	}, restart, nil
}
