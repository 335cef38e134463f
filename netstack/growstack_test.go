package netstack

import (
	"net/netip"
	"testing"
	"unsafe"
)

// deepFrame needs about 6 KiB of stack below its caller: more than a new
// goroutine starts with, less than handlerStack.
//
//go:noinline
func deepFrame() byte {
	var b [6 << 10]byte
	if growStackUse {
		keepStack(b[:])
	}
	return b[len(b)-1]
}

// stackMoves reports whether deepFrame, called after prepare, copied the
// calling goroutine's stack (a local's address changes when it does).
func stackMoves(prepare func()) bool {
	var x byte
	prepare()
	before := uintptr(unsafe.Pointer(&x))
	deepFrame()
	return uintptr(unsafe.Pointer(&x)) != before
}

func TestGrowStack(t *testing.T) {
	moved := make(chan bool)
	go func() { moved <- stackMoves(func() {}) }()
	if !<-moved {
		t.Skip("a new goroutine's stack already holds 6 KiB (adaptive start size); nothing to measure")
	}
	go func() { moved <- stackMoves(growStack) }()
	if <-moved {
		t.Fatal("the stack was copied again after growStack")
	}
}

// A SYN's handler runs on a stack grown before the handler is called, so the
// dial and the handshake do not grow it from deep inside.
func TestHandlerStackPregrown(t *testing.T) {
	moved := make(chan bool, 1)
	client, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		moved <- stackMoves(func() {})
		r.Reject()
	}})
	ctx := testContext(t)
	if _, err := client.DialTCP(ctx, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:80")); err == nil {
		t.Fatal("dial succeeded; the handler rejected it")
	}
	if <-moved {
		t.Fatal("the handler's stack grew in the handler: not grown up front")
	}
}
