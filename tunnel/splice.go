package tunnel

import (
	"context"
	"io"
	"net"
	"sync"
	"time"
)

// splice copies both ways between a and b with half-close until both
// directions end or ctx is done.
// TODO(tunnel): replace with forwarder.Splice once forwarder lands (issue 3).
func splice(ctx context.Context, a, b net.Conn, idle time.Duration) (aToB, bToA int64, err error) {
	stop := context.AfterFunc(ctx, func() { a.Close(); b.Close() })
	defer stop()
	var wg sync.WaitGroup
	var e1, e2 error
	wg.Add(1)
	go func() {
		defer wg.Done()
		aToB, e1 = io.Copy(b, a)
		closeWrite(b)
	}()
	bToA, e2 = io.Copy(a, b)
	closeWrite(a)
	wg.Wait()
	if e1 != nil {
		return aToB, bToA, e1
	}
	return aToB, bToA, e2
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		c.Close()
	}
}
