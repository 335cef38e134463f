package app

import (
	"errors"
	"sync"
)

// teardown closes what a program started, newest first, exactly once: each
// piece is registered as soon as it starts, so a start-up that fails half
// way closes exactly what it had opened.
type teardown struct {
	mu   sync.Mutex // guards fns, done and ch
	fns  []func() error
	done bool
	ch   chan struct{} // closed when run begins; made on first use
}

// closed returns a channel that is closed once run has begun.
func (t *teardown) closed() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ch == nil {
		t.ch = make(chan struct{})
		if t.done {
			close(t.ch)
		}
	}
	return t.ch
}

// isDone reports whether run has begun.
func (t *teardown) isDone() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.done
}

func (t *teardown) add(fn func() error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.fns = append(t.fns, fn)
}

// run calls every registered function in reverse order; later calls do nothing.
func (t *teardown) run() error {
	t.mu.Lock()
	fns := t.fns
	t.fns = nil
	done := t.done
	t.done = true
	if !done && t.ch != nil {
		close(t.ch)
	}
	t.mu.Unlock()
	if done {
		return nil
	}
	var errs []error
	for i := len(fns) - 1; i >= 0; i-- {
		errs = append(errs, fns[i]())
	}
	return errors.Join(errs...)
}
