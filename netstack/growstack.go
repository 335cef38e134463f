package netstack

// handlerStack is the stack a SYN's handler goroutine is grown to before it
// runs the handler: the target dial (the net package's resolver) and gVisor's
// handshake (sendTCP) each grew it by doubling from deep inside, and every
// doubling copies and re-walks all frames in use; grown here, at the
// goroutine's first frame, it is one copy of a near-empty stack. A
// long-lived session's goroutine is shrunk back by the GC as usual.
const handlerStack = 8 << 10

// growStackUse is never true; it keeps the compiler from dropping the frame.
var growStackUse bool

// growStack makes the calling goroutine's stack at least handlerStack bytes.
//
//go:noinline
func growStack() {
	var pad [handlerStack - 1<<10]byte // the frame, less room for the caller's frames
	if growStackUse {
		keepStack(pad[:])
	}
}

//go:noinline
func keepStack(b []byte) { b[0]++ }
