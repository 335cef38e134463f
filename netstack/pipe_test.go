package netstack

import (
	"bytes"
	"errors"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestPipeBatches(t *testing.T) {
	a, b := Pipe(1500)
	defer a.Close()
	if a.BatchSize() != 128 || b.BatchSize() != 128 {
		t.Fatalf("BatchSize = %d/%d, want 128", a.BatchSize(), b.BatchSize())
	}
	if ev := <-a.Events(); ev != 1 { // tun.EventUp
		t.Fatalf("first event %v, want EventUp", ev)
	}
	const offset = 16
	// 200 packets: more than one reader batch, sizes 1..200.
	out := make([][]byte, 200)
	for i := range out {
		out[i] = make([]byte, offset+i+1)
		for j := offset; j < len(out[i]); j++ {
			out[i][j] = byte(i)
		}
	}
	errc := make(chan error, 1)
	go func() {
		n, err := a.Write(out, offset)
		if err == nil && n != len(out) {
			err = errors.New("short write")
		}
		errc <- err
	}()
	bufs := make([][]byte, 128)
	for i := range bufs {
		bufs[i] = make([]byte, 4+1500)
	}
	sizes := make([]int, 128)
	got := 0
	for got < len(out) {
		n, err := b.Read(bufs, sizes, 4)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		for i := 0; i < n; i++ {
			want := out[got][offset:]
			if !bytes.Equal(bufs[i][4:4+sizes[i]], want) {
				t.Fatalf("packet %d: got %d bytes, want %d", got, sizes[i], len(want))
			}
			got++
		}
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
}

func TestPipeTooBig(t *testing.T) {
	a, b := Pipe(100)
	defer a.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := a.Write([][]byte{make([]byte, 50), make([]byte, 101), make([]byte, 100)}, 0)
		errc <- err
	}()
	bufs, sizes := [][]byte{make([]byte, 200), make([]byte, 200), make([]byte, 200)}, make([]int, 3)
	n, err := b.Read(bufs, sizes, 0)
	if err != nil || n != 2 || sizes[0] != 50 || sizes[1] != 100 {
		t.Fatalf("read = %d %v sizes %v, want the 50- and 100-byte packets", n, err, sizes[:2])
	}
	if err := <-errc; !errors.Is(err, ErrPacketTooBig) {
		t.Fatalf("write error %v, want ErrPacketTooBig", err)
	}
}

func TestPipeCloseUnblocks(t *testing.T) {
	a, b := Pipe(1500)
	readErr := make(chan error, 2)
	go func() {
		_, err := a.Read([][]byte{make([]byte, 1500)}, []int{0}, 0)
		readErr <- err
	}()
	go func() {
		// Nobody reads b's input: this Write blocks until Close.
		_, err := a.Write([][]byte{make([]byte, 10)}, 0)
		readErr <- err
	}()
	// Close must find both calls blocked, or it proves nothing.
	waitParked(t, "netstack.(*pipeDir).read(", "netstack.(*pipeDir).write(")
	b.Close() // either end closes both
	for i := 0; i < 2; i++ {
		select {
		case err := <-readErr:
			if !errors.Is(err, os.ErrClosed) {
				t.Fatalf("blocked call returned %v, want os.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not unblock Read/Write")
		}
	}
	if _, err := b.Write([][]byte{make([]byte, 10)}, 0); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("write after close: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

// waitParked polls the goroutine dump until, for each function, a goroutine
// with it on its stack is parked on a sync.Cond.
func waitParked(t *testing.T, funcs ...string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for deadline := time.Now().Add(10 * time.Second); ; {
		dump := string(buf[:runtime.Stack(buf, true)])
		parked := 0
		for _, fn := range funcs {
			for _, g := range strings.Split(dump, "\n\n") {
				header, _, _ := strings.Cut(g, "\n")
				if strings.Contains(header, "[sync.Cond.Wait") && strings.Contains(g, fn) {
					parked++
					break
				}
			}
		}
		if parked == len(funcs) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not every one of %q is parked:\n%s", funcs, dump)
		}
		time.Sleep(time.Millisecond)
	}
}
