package app

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"time"

	"go.uber.org/zap"
)

// watchInterval is how often a watched config file is checked. Polling the
// content (not inotify) survives editors that replace the file by rename and
// config-management tools that rewrite it in place, and costs one small read
// a second.
const watchInterval = time.Second

// watchConfig calls reload whenever the content of path changes, until ctx
// ends. A file that is briefly missing or half-written is simply read again
// on the next tick: reload validates before it applies anything.
func watchConfig(ctx context.Context, path string, interval time.Duration, reload func(), log *zap.Logger) {
	last := fileDigest(path)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d := fileDigest(path)
		if d == nil || bytes.Equal(d, last) {
			continue
		}
		last = d
		log.Info("config file changed; reloading", zap.String("path", path))
		reload()
	}
}

// fileDigest is the SHA-256 of path's content, or nil if it cannot be read.
func fileDigest(path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	sum := sha256.Sum256(b)
	return sum[:]
}
