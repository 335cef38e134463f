package forwarder

import (
	"encoding/binary"
	"hash/maphash"
	"net/netip"
	"sync/atomic"
	"time"
)

// A UDP source the engine has no session for, whose session could only be
// made by evicting another (its pool or quota is full), is on probation:
// its first datagram is recorded and dropped (refusal udp_probation), and a
// second one within probationWindow is admitted. Real UDP clients
// retransmit an unanswered datagram (DNS, QUIC, WireGuard, game clients);
// a flood from spoofed sources sends each source once, so under such a
// flood a spoofed datagram costs a table write instead of a socket, two
// goroutines and the eviction of another session.
const (
	probationSlots  = 1 << 18 // 2 MiB: at 50k new sources/s a record survives 1 s with p ≈ 0.8
	probationWindow = 10 * time.Second
	probationTick   = 10 * time.Millisecond // the table's time unit
)

// probation is a fixed-size, lock-free, allocation-free table of the
// sources seen once: a slot holds a 32-bit tag of (mapping, source) and the
// time it was seen, and a new source overwrites whatever its slot held.
type probation struct {
	seed  maphash.Seed
	epoch int64 // unix nanos the table's times count from
	slots []atomic.Uint64
}

func newProbation(now time.Time) *probation {
	return &probation{seed: maphash.MakeSeed(), epoch: now.UnixNano(), slots: make([]atomic.Uint64, probationSlots)}
}

// pass reports whether src on the mapping st may open a session by
// eviction at now: true when it was recorded within probationWindow (and
// the record is spent), false when it is recorded now.
func (p *probation) pass(st *mappingState, src netip.AddrPort, now time.Time) bool {
	var b [26]byte
	a := src.Addr().As16()
	copy(b[:16], a[:])
	binary.LittleEndian.PutUint16(b[16:], src.Port())
	binary.LittleEndian.PutUint64(b[18:], maphash.String(p.seed, st.name))
	h := maphash.Bytes(p.seed, b[:])
	slot := &p.slots[h&(probationSlots-1)]
	tag := uint32(h>>32) | 1 // never 0: an empty slot matches nothing
	t := uint32((now.UnixNano() - p.epoch) / int64(probationTick))
	v := slot.Load()
	if uint32(v>>32) == tag && t-uint32(v) <= uint32(probationWindow/probationTick) {
		slot.Store(0)
		return true
	}
	slot.Store(uint64(tag)<<32 | uint64(t))
	return false
}
