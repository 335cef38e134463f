package tunnel

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"time"
)

// FailIpcSetPartway makes r's next WireGuard configuration apply only its
// first n peer blocks and then fail, as wireguard-go does when it refuses a
// line in the middle; with rollbackFails the one after it (the rollback)
// fails the same way. mid returns the device's peers as the first failure
// left them.
func FailIpcSetPartway(r *Relay, n int, rollbackFails bool) (mid func() map[string][]string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	set := r.ipcSet
	var state map[string][]string
	calls := 0
	r.ipcSet = func(uapi string) error {
		if calls++; calls == 2 || !rollbackFails {
			r.ipcSet = set // the caller holds r.mu
		}
		if calls == 2 {
			state0 := state
			defer func() { state = state0 }()
		}
		blocks := strings.SplitAfter(uapi, "\n")
		var head strings.Builder
		seen := 0
		for _, line := range blocks {
			if strings.HasPrefix(line, "public_key=") {
				if seen++; seen > n {
					break
				}
			}
			head.WriteString(line)
		}
		if err := set(head.String()); err != nil {
			return err
		}
		state = WireGuardPeers(r)
		return errors.New("injected failure after part of the peers")
	}
	return func() map[string][]string { return state }
}

// WireGuardPeers returns the device's peers: public key (hex) -> sorted
// allowed IPs.
func WireGuardPeers(r *Relay) map[string][]string {
	text, err := r.dev.IpcGet()
	if err != nil {
		return nil
	}
	out := make(map[string][]string)
	var cur string
	for line := range strings.Lines(text) {
		k, v, _ := strings.Cut(strings.TrimSpace(line), "=")
		switch k {
		case "public_key":
			cur = v
			out[cur] = []string{}
		case "allowed_ip":
			out[cur] = append(out[cur], v)
		}
	}
	for _, ips := range out {
		slices.Sort(ips)
	}
	return out
}

// Limits returns the dial timeout and session cap r applies now.
func Limits(r *Relay) (time.Duration, int64) {
	l := r.limits.Load()
	return l.dialTimeout, l.maxSessions
}

// HoldRelayLock takes r's global lock, as a long reconciliation would, and
// returns its release; coalesced reads peer's coalesced-register count
// without that lock.
func HoldRelayLock(r *Relay, peer string) (release func(), coalesced func() uint64) {
	r.mu.Lock()
	p := r.peers[peer]
	return r.mu.Unlock, p.regCoalesced.Load
}

// BlockApplies makes peer's register applies on r wait, after reserving
// their ports and before opening their sockets, until release is called;
// entered receives when an apply reached the wait.
func BlockApplies(r *Relay, peer string) (entered <-chan struct{}, release func()) {
	in := make(chan struct{}, 16)
	gate := make(chan struct{})
	r.mu.Lock()
	r.beforeOpen = func(name string) {
		if name != peer {
			return
		}
		select {
		case in <- struct{}{}:
		default:
		}
		<-gate
	}
	r.mu.Unlock()
	var once sync.Once
	return in, func() { once.Do(func() { close(gate) }) }
}

// AppendWarmHeader and ReadWarmHeader are the warm streams' header (warm.go).
var (
	AppendWarmHeader = appendWarmHeader
	ReadWarmHeader   = readWarmHeader
)
