package main

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// pace is how many packets to send, how fast, and for how long at most.
type pace struct {
	rate    int           // packets per second
	count   int           // packets in total
	maxTime time.Duration // stop here even if count is not reached
}

func (p pace) validate() error {
	switch {
	case p.rate <= 0 || p.rate > maxRate:
		return fmt.Errorf("-rate %d: want 1..%d", p.rate, maxRate)
	case p.count <= 0 || p.count > maxCount:
		return fmt.Errorf("-count %d: want 1..%d", p.count, maxCount)
	case p.maxTime <= 0 || p.maxTime > maxTime:
		return fmt.Errorf("-max-time %s: want up to %s", p.maxTime, maxTime)
	}
	return nil
}

// floodStats is what one flood did.
type floodStats struct {
	Sent       int     `json:"sent"`
	SendErrors int     `json:"send_errors"`
	FirstError string  `json:"first_error,omitempty"`
	ElapsedS   float64 `json:"elapsed_s"`
	RatePPS    float64 `json:"rate_achieved_pps"`
	StoppedBy  string  `json:"stopped_by"` // "count" or "time"
}

// clock is the pacer's view of time; tests give it a fake one.
type clock interface {
	Now() time.Time
	Sleep(time.Duration)
}

type realClock struct{}

func (realClock) Now() time.Time        { return time.Now() }
func (realClock) Sleep(d time.Duration) { time.Sleep(d) }

// tick is how long the pacer sleeps between bursts: short enough that a
// burst at 200k/s stays small (a few hundred packets), long enough that the
// sleep itself costs little.
const tick = time.Millisecond

// run sends p.count packets made by next at p.rate, evenly spread (each
// tick sends what is due since the start), until the count is reached or
// p.maxTime has passed. A failed send is counted and not retried.
func run(p pace, c clock, next func() []byte, send func([]byte) error) floodStats {
	var st floodStats
	start := c.Now()
	deadline := start.Add(p.maxTime)
	maxBurst := max(p.rate/100, 1) // catch up at most 10 ms worth per tick
	attempts := 0
	st.StoppedBy = "count"
	for attempts < p.count {
		now := c.Now()
		if !now.Before(deadline) {
			st.StoppedBy = "time"
			break
		}
		due := min(int(float64(p.rate)*now.Sub(start).Seconds())+1, p.count)
		for n := 0; attempts < due && n < maxBurst; n++ {
			if n > 0 && n%16 == 0 && !c.Now().Before(deadline) {
				break // a slow sender must not overrun the deadline by a whole burst
			}
			attempts++
			if err := send(next()); err != nil {
				if st.SendErrors == 0 {
					st.FirstError = err.Error()
				}
				st.SendErrors++
				continue
			}
			st.Sent++
		}
		if attempts < due {
			continue // still behind: no sleep
		}
		c.Sleep(tick)
	}
	st.ElapsedS = c.Now().Sub(start).Seconds()
	if st.ElapsedS > 0 {
		st.RatePPS = float64(st.Sent) / st.ElapsedS
	}
	return st
}

// rawSocket sends whole IPv4 packets (IP_HDRINCL) by the routing table of
// the namespace it was opened in.
type rawSocket struct{ fd int }

func openRaw() (*rawSocket, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return nil, fmt.Errorf("raw socket (needs CAP_NET_RAW): %w", err)
	}
	// IPPROTO_RAW implies IP_HDRINCL; a larger send buffer absorbs bursts.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
	return &rawSocket{fd: fd}, nil
}

func (r *rawSocket) sendTo(dst netip.Addr) func([]byte) error {
	sa := &unix.SockaddrInet4{Addr: dst.As4()}
	return func(b []byte) error {
		for {
			err := unix.Sendto(r.fd, b, 0, sa)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return err
		}
	}
}

func (r *rawSocket) Close() error { return unix.Close(r.fd) }
