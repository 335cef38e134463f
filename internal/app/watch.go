package app

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"
)

// watchInterval is how often a watched config file is checked. Polling the
// content (not inotify) survives editors that replace the file by rename and
// config-management tools that rewrite it in place, and costs one small read
// a second.
const watchInterval = time.Second

// goWatchConfig runs watchConfig on its own goroutine, tracked by wg, for
// configs loaded from a file. loaded is the digest of the bytes the running
// config was parsed from, so an edit made while natbox was starting is seen.
func goWatchConfig(ctx context.Context, path string, loaded [sha256.Size]byte, reload func(), wg *sync.WaitGroup, log *zap.Logger) {
	if path == "" {
		return
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(watchInterval)
		defer t.Stop()
		watchConfig(ctx, path, loaded[:], t.C, reload, nil, log)
	}()
}

// watchConfig calls reload whenever the content of path differs from what
// was last applied (starting with applied), until ctx ends. A new content
// must read the same on two consecutive ticks before it is reloaded, so a
// file caught half-written (an editor or a tool that truncates, then writes)
// is not reloaded, and a missing file is ignored.
// tickDone, when not nil, is called after each tick is handled (tests).
func watchConfig(ctx context.Context, path string, applied []byte, ticks <-chan time.Time, reload, tickDone func(), log *zap.Logger) {
	var pending []byte
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticks:
		}
		d := fileDigest(path)
		switch {
		case d == nil || bytes.Equal(d, applied):
			pending = nil
		case !bytes.Equal(d, pending):
			pending = d // changed: wait one tick for it to settle
		default:
			applied, pending = d, nil
			log.Info("config file changed; reloading", zap.String("path", path))
			reload()
		}
		if tickDone != nil {
			tickDone()
		}
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
