package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"
)

// clientSpec is the measuring client: real connections and exchanges at a
// steady pace over a window, while a flood runs.
type clientSpec struct {
	tcpAddr    string
	tcpN       int
	udpAddr    string
	udpN       int
	window     time.Duration // attempts are spread evenly over it
	tcpTimeout time.Duration // per connection: dial plus the echo
	udpTimeout time.Duration // per exchange
	// ready, when set, is called once the pre-flood UDP session is open
	// and the window starts, so the caller can start the flood.
	ready func()
}

// tcpResult is what the real TCP clients saw.
type tcpResult struct {
	Addr       string         `json:"addr"`
	Attempts   int            `json:"attempts"`
	OK         int            `json:"ok"`
	Errors     map[string]int `json:"errors,omitempty"` // refused, reset, timeout, other
	FirstError string         `json:"first_error,omitempty"`
	ConnectP50 float64        `json:"connect_p50_ms"`
	ConnectP99 float64        `json:"connect_p99_ms"`
	ConnectMax float64        `json:"connect_max_ms"`
	// MaxGap is the longest time without a completed connection, from the
	// window's start to its end.
	MaxGap float64 `json:"max_gap_ms"`
	// AnswerMax is the longest any attempt waited for the gateway's first
	// answer (SYN-ACK or RST): a refused connection is answered, a stalled
	// gateway is not, so this tells refusal and stall apart.
	AnswerMax float64 `json:"answer_max_ms"`
}

// udpResult is what the real UDP client saw: Existing exchanges run on one
// socket opened (and answered once) before the window, so they measure a
// session that existed before the flood; Fresh exchanges each use a new
// socket, a new session the gateway must admit during the flood.
type udpResult struct {
	Addr            string `json:"addr"`
	ExistingOpened  bool   `json:"existing_opened"`
	Existing        int    `json:"existing_sent"`
	ExistingReplies int    `json:"existing_replies"`
	Fresh           int    `json:"fresh_sent"`
	FreshReplies    int    `json:"fresh_replies"`
	FirstError      string `json:"first_error,omitempty"`
}

type clientResult struct {
	WindowS float64    `json:"window_s"`
	TCP     *tcpResult `json:"tcp,omitempty"`
	UDP     *udpResult `json:"udp,omitempty"`
}

func runClient(ctx context.Context, s clientSpec) clientResult {
	res := clientResult{WindowS: s.window.Seconds()}
	var wg sync.WaitGroup
	var existing *net.UDPConn
	if s.udpAddr != "" && s.udpN > 0 {
		res.UDP = &udpResult{Addr: s.udpAddr}
		// The session must exist before the flood starts; the caller starts
		// the client before the flood.
		var err error
		existing, err = udpSocket(s.udpAddr)
		if err == nil {
			res.UDP.ExistingOpened, err = udpExchange(existing, []byte("open"), s.udpTimeout)
		}
		if err != nil {
			res.UDP.FirstError = err.Error()
		}
	}
	start := time.Now()
	if s.ready != nil {
		s.ready()
	}
	if s.tcpAddr != "" && s.tcpN > 0 {
		wg.Go(func() { res.TCP = runTCPClients(ctx, s, start) })
	}
	if res.UDP != nil {
		wg.Go(func() { runUDPClients(ctx, s, start, existing, res.UDP) })
	}
	wg.Wait()
	if existing != nil {
		existing.Close()
	}
	return res
}

// at waits until start + i/n of the window, or ctx is done.
func at(ctx context.Context, start time.Time, window time.Duration, i, n int) bool {
	t := time.NewTimer(time.Until(start.Add(window * time.Duration(i) / time.Duration(n))))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func runTCPClients(ctx context.Context, s clientSpec, start time.Time) *tcpResult {
	res := &tcpResult{Addr: s.tcpAddr, Errors: map[string]int{}}
	var (
		mu       sync.Mutex
		connects []float64 // ms, successful ones
		doneAt   []float64 // ms since start, successful ones
		wg       sync.WaitGroup
	)
	for i := range s.tcpN {
		if !at(ctx, start, s.window, i, s.tcpN) {
			break
		}
		res.Attempts++
		wg.Go(func() {
			connect, err := tcpEcho(ctx, s.tcpAddr, s.tcpTimeout)
			end := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			res.AnswerMax = max(res.AnswerMax, ms(connect))
			if err != nil {
				res.Errors[errKind(err)]++
				if res.FirstError == "" {
					res.FirstError = err.Error()
				}
				return
			}
			res.OK++
			connects = append(connects, ms(connect))
			doneAt = append(doneAt, ms(end))
		})
	}
	wg.Wait()
	slices.Sort(connects)
	res.ConnectP50 = percentile(connects, 50)
	res.ConnectP99 = percentile(connects, 99)
	if len(connects) > 0 {
		res.ConnectMax = connects[len(connects)-1]
	}
	res.MaxGap = maxGap(doneAt, ms(s.window))
	return res
}

// tcpEcho connects, sends one byte and waits for it to come back (so the
// connection crossed the gateway to the target and back), then closes. It
// returns the time the connect took, successful or not.
func tcpEcho(ctx context.Context, addr string, timeout time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t0 := time.Now()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp4", addr)
	connect := time.Since(t0)
	if err != nil {
		return connect, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	_ = c.SetDeadline(dl)
	b := []byte{'x'}
	if _, err := c.Write(b); err != nil {
		return connect, fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, b); err != nil {
		return connect, fmt.Errorf("read echo: %w", err)
	}
	return connect, nil
}

func runUDPClients(ctx context.Context, s clientSpec, start time.Time, existing *net.UDPConn, res *udpResult) {
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	note := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		if err != nil && res.FirstError == "" {
			res.FirstError = err.Error()
		}
	}
	if existing != nil && res.ExistingOpened {
		// Sequential on the one socket, on its own goroutine so a slow
		// reply does not hold back the fresh sessions' pace.
		wg.Go(func() {
			for i := range s.udpN {
				if !at(ctx, start, s.window, i, s.udpN) {
					return
				}
				ok, err := udpExchange(existing, fmt.Appendf(nil, "existing %d", i), s.udpTimeout)
				note(err)
				mu.Lock()
				res.Existing++
				if ok {
					res.ExistingReplies++
				}
				mu.Unlock()
			}
		})
	}
	for i := range s.udpN {
		if !at(ctx, start, s.window, i, s.udpN) {
			break
		}
		mu.Lock()
		res.Fresh++
		mu.Unlock()
		wg.Go(func() {
			c, err := udpSocket(s.udpAddr)
			if err != nil {
				note(err)
				return
			}
			defer c.Close()
			ok, err := udpExchange(c, fmt.Appendf(nil, "fresh %d", i), s.udpTimeout)
			note(err)
			if ok {
				mu.Lock()
				res.FreshReplies++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
}

func udpSocket(addr string) (*net.UDPConn, error) {
	ua, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return nil, err
	}
	return net.DialUDP("udp4", nil, ua)
}

// udpRetransmit is how long the real UDP client waits for a reply before
// it sends the datagram again, as real UDP clients do (DNS stubs, QUIC,
// WireGuard), though theirs usually wait longer (0.4 to 5 s).
const udpRetransmit = 300 * time.Millisecond

// udpExchange sends msg, again every udpRetransmit while unanswered, and
// reports whether the same bytes came back within timeout; stale replies
// to earlier messages are skipped.
func udpExchange(c *net.UDPConn, msg []byte, timeout time.Duration) (bool, error) {
	end := time.Now().Add(timeout)
	buf := make([]byte, 2048)
	for {
		if _, err := c.Write(msg); err != nil {
			return false, fmt.Errorf("udp write: %w", err)
		}
		next := time.Now().Add(udpRetransmit)
		last := !next.Before(end)
		if last {
			next = end
		}
		_ = c.SetReadDeadline(next)
		for {
			n, err := c.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break
				}
				return false, fmt.Errorf("udp read: %w", err)
			}
			if string(buf[:n]) == string(msg) {
				return true, nil
			}
		}
		if last {
			return false, nil
		}
	}
}

func errKind(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.EOF):
		return "reset"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "other"
}

// percentile is the nearest-rank percentile of sorted xs (0 when empty).
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	k := int(float64(len(sorted))*p/100+0.999999) - 1
	return sorted[max(0, min(k, len(sorted)-1))]
}

// maxGap is the longest interval in [0, window] not broken by one of the
// event times (ms); events past the window extend it.
func maxGap(events []float64, window float64) float64 {
	ev := slices.Clone(events)
	slices.Sort(ev)
	prev, gap := 0.0, 0.0
	for _, e := range ev {
		gap = max(gap, e-prev)
		prev = e
	}
	return max(gap, window-prev)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
