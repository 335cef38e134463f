package main

import (
	"io"
	"os"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/natbox/natbox/conf"
)

// newLogger builds the process logger from the [log] table; levelOverride
// (from --log-level) wins when set. Logs go to stderr so stdout stays for
// command output.
func newLogger(c conf.Log, levelOverride string, w io.Writer) (*zap.Logger, zap.AtomicLevel, error) {
	name := c.Level
	if levelOverride != "" {
		name = levelOverride
	}
	if name == "" {
		name = "info"
	}
	level, err := zap.ParseAtomicLevel(name)
	if err != nil {
		return nil, level, usagef("log level %q: use debug, info, warn or error", name)
	}
	var enc zapcore.Encoder
	switch c.Format {
	case "json":
		ec := zap.NewProductionEncoderConfig()
		ec.EncodeTime = zapcore.ISO8601TimeEncoder
		enc = zapcore.NewJSONEncoder(ec)
	case "", "console":
		ec := zap.NewDevelopmentEncoderConfig()
		ec.EncodeTime = zapcore.TimeEncoderOfLayout("2006-01-02T15:04:05.000Z0700")
		ec.EncodeCaller = nil
		ec.CallerKey = ""
		ec.StacktraceKey = ""
		enc = zapcore.NewConsoleEncoder(ec)
	default:
		return nil, level, usagef("log format %q: use console or json", c.Format)
	}
	if w == nil {
		w = os.Stderr
	}
	core := zapcore.NewCore(enc, zapcore.AddSync(w), level)
	// Production sampling keeps a flood of identical warnings (limit hits) from
	// drowning the log: the first 100 per second, then every 100th.
	core = zapcore.NewSamplerWithOptions(core, 1e9, 100, 100)
	return zap.New(core), level, nil
}

// logLevelFlagUsage is shared by every long-running command.
const logLevelFlagUsage = "override [log] level: debug, info, warn or error"
