package netstack

import (
	"net/netip"
	"runtime/debug"
	"testing"

	"github.com/natbox/natbox/internal/testutil"
)

// A SYN's handler runs on a stack grown before the handler is called, so the
// dial and the handshake do not grow it from deep inside.
func TestHandlerStackPregrown(t *testing.T) {
	// A GC between the growth and the handler may shrink the stack back
	// (it uses little): no GC while this runs.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	moved := make(chan bool, 1)
	client, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		moved <- testutil.StackMoves(func() {})
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
