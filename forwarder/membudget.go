package forwarder

import (
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// bufBudget bounds the engine's flow buffers that grow with traffic: the
// large splice buffers of bulk transfers (copyBufSize each) and the
// datagrams queued in UDP sessions, toward targets and toward clients.
// What is always there stays outside it (a session's two small splice
// buffers, an idle queue), as the session pools bound those. When the budget
// is spent a splice keeps reading into its small buffer, so the flow goes on
// at a lower rate and TCP's windows slow its sender, and a datagram that
// would need new queue memory is dropped and counted, as a full queue's is.
// A nil *bufBudget is unlimited. Its methods are safe for concurrent use.
type bufBudget struct {
	limit   int64
	used    atomic.Int64
	denied  atomic.Uint64 // takes refused
	lastLog atomic.Int64  // unix nanos of the last exhaustion warning
	log     *zap.Logger
}

// budgetLogEvery rate-limits the exhaustion warning.
const budgetLogEvery = 10 * time.Second

// newBufBudget returns a budget of limit bytes, or nil (unlimited) for
// limit <= 0.
func newBufBudget(limit int, log *zap.Logger) *bufBudget {
	if limit <= 0 {
		return nil
	}
	return &bufBudget{limit: int64(limit), log: log}
}

// take reserves n bytes and reports whether they fit.
func (b *bufBudget) take(n int) bool {
	if b == nil {
		return true
	}
	if b.used.Add(int64(n)) <= b.limit {
		return true
	}
	b.used.Add(-int64(n))
	if c := b.denied.Add(1); b.log != nil {
		now := time.Now().UnixNano()
		if last := b.lastLog.Load(); now-last >= int64(budgetLogEvery) && b.lastLog.CompareAndSwap(last, now) {
			b.log.Warn("buffer budget exhausted: bulk flows slowed, datagrams dropped",
				zap.Int64("budget_bytes", b.limit), zap.Int64("used_bytes", b.used.Load()), zap.Uint64("count", c))
		}
	}
	return false
}

// give returns n bytes taken before.
func (b *bufBudget) give(n int) {
	if b != nil && n > 0 {
		b.used.Add(-int64(n))
	}
}

// fill copies the budget's state into st.
func (b *bufBudget) fill(st *Status) {
	if b == nil {
		return
	}
	st.BufferBudgetBytes, st.BufferUsedBytes, st.BufferDenied = b.limit, b.used.Load(), b.denied.Load()
}
