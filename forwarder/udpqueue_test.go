package forwarder

import "testing"

func TestDatagramQueue(t *testing.T) {
	q := newDatagramQueue(200, nil)
	for i := range 200 {
		if !q.push(datagram{n: i}) {
			t.Fatalf("push %d refused below the limit", i)
		}
	}
	if q.push(datagram{n: 200}) {
		t.Fatal("push beyond the limit accepted")
	}
	select {
	case <-q.ready:
	default:
		t.Fatal("no ready signal after the first push")
	}
	var got []datagram
	for len(got) < 200 {
		b := q.take(nil, 64)
		if len(b) == 0 || len(b) > 64 {
			t.Fatalf("take returned %d datagrams with %d queued", len(b), 200-len(got))
		}
		got = append(got, b...)
	}
	for i, d := range got {
		if d.n != i {
			t.Fatalf("datagram %d came out as %d: order lost", i, d.n)
		}
	}
	// Drained after a burst: the grown backing array is released, and the
	// queue takes a full burst again.
	if cap(q.items) != 0 {
		t.Fatalf("drained queue keeps capacity %d", cap(q.items))
	}
	if !q.push(datagram{n: 1}) || len(q.take(nil, 64)) != 1 {
		t.Fatal("queue unusable after draining")
	}
}
