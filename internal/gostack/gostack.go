// Package gostack grows a goroutine's stack up front, at its first frame.
//
// A goroutine that dials a target (the net package's resolver) or runs
// gVisor's handshake (sendTCP) grows its stack by doubling from deep inside,
// and every doubling copies and re-walks all frames in use; grown at the
// goroutine's first frame, it is one copy of a near-empty stack. The GC
// shrinks an idle goroutine's stack again, so a goroutine that waited long
// (a warm stream's, tunnel/warm.go) grows it anew before its work.
package gostack

// Size is the stack Grow makes sure of.
const Size = 8 << 10

// use is never true; it keeps the compiler from dropping the frame.
var use bool

// Grow makes the calling goroutine's stack at least Size bytes.
//
//go:noinline
func Grow() {
	var pad [Size - 1<<10]byte // the frame, less room for the caller's frames
	if use {
		keep(pad[:])
	}
}

//go:noinline
func keep(b []byte) { b[0]++ }
