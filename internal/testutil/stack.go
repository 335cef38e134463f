package testutil

import "unsafe"

// deepFrame needs about 6 KiB of stack below its caller: more than a new
// goroutine starts with, less than gostack.Size.
//
//go:noinline
func deepFrame() byte {
	var b [6 << 10]byte
	if deepFrameUse {
		b[0]++
	}
	return b[len(b)-1]
}

// deepFrameUse is never true; it keeps the compiler from dropping the frame.
var deepFrameUse bool

// StackMoves reports whether a call 6 KiB deep, made after prepare, copied
// the calling goroutine's stack (a local's address changes when it does).
func StackMoves(prepare func()) bool {
	var x byte
	prepare()
	before := uintptr(unsafe.Pointer(&x))
	deepFrame()
	return uintptr(unsafe.Pointer(&x)) != before
}
