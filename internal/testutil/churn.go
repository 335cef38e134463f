package testutil

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ChurnCount is how many connections a churn test makes: the environment
// variable env when set, else full, or reduced under the race detector or
// -short (the race detector slows gVisor about tenfold).
func ChurnCount(t testing.TB, env string, full, reduced int, race bool) int {
	if s := os.Getenv(env); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("%s=%q: want a positive integer", env, s)
		}
		return n
	}
	if race || testing.Short() {
		return reduced
	}
	return full
}

// ChurnResult is what Churn saw.
type ChurnResult struct {
	Started, Failures int64
	FirstErr          error
	Elapsed           time.Duration
}

// Rate is connections per second.
func (r ChurnResult) Rate() float64 { return float64(r.Started) / r.Elapsed.Seconds() }

// Churn makes total connections from workers goroutines until ctx ends,
// connection i from source port firstPort + i%ports (few ports, so every
// port is reused: the TIME_WAIT trap). connect makes one connection.
func Churn(ctx context.Context, total, workers, ports int, firstPort uint16, connect func(ctx context.Context, srcPort uint16) error) ChurnResult {
	var next, failures atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := next.Add(1) - 1
				if i >= int64(total) {
					return
				}
				port := firstPort + uint16(i%int64(ports))
				if err := connect(ctx, port); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Errorf("connection %d from port %d: %w", i, port, err))
				}
			}
		}()
	}
	wg.Wait()
	r := ChurnResult{Started: min(next.Load(), int64(total)), Failures: failures.Load(), Elapsed: time.Since(start)}
	if e, ok := firstErr.Load().(error); ok {
		r.FirstErr = e
	}
	return r
}

// OneByteExchange sends one byte on c and expects it back, then EOF: the
// client half of a connect-request-response churn (the server closes first).
func OneByteExchange(c net.Conn) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{'x'}); err != nil {
		return err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if string(b) != "x" {
		return fmt.Errorf("reply %q, want x", b)
	}
	return nil
}

// EchoRoundTrip writes 64 bytes of value i on c, an echo's connection, and
// fails t unless exactly those come back: one request-response round trip.
func EchoRoundTrip(t testing.TB, c net.Conn, i int) {
	t.Helper()
	msg := bytes.Repeat([]byte{byte(i)}, 64)
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || !bytes.Equal(buf, msg) {
		t.Fatalf("round trip %d: read %x, %v; want %x", i, buf, err, msg)
	}
}
