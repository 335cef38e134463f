// Command idle measures a proxy's memory per idle TCP session: it opens -n
// connections through the proxy to an echo server, sends one byte on each and
// waits for the echo (so every session is spliced end to end), holds them all
// open, and reads the proxy's RSS from /proc/PID/status before, while held and
// after closing. One JSON object on stdout. Bounded by -timeout.
//
//	idle -addr 198.19.0.1:8081 -n 10000 -pid 1234
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type result struct {
	Addr            string  `json:"addr"`
	Requested       int     `json:"requested"`
	Open            int     `json:"open"`
	Errors          int64   `json:"errors"`
	FirstError      string  `json:"first_error,omitempty"`
	OpenSeconds     float64 `json:"open_s"`
	RSSBeforeKB     int64   `json:"rss_before_kb"`
	RSSHeldKB       int64   `json:"rss_held_kb"`
	RSSAfterCloseKB int64   `json:"rss_after_close_kb"`
	VmHWMKB         int64   `json:"vmhwm_kb"`
	KiBPerSession   float64 `json:"kib_per_session"`
}

func main() {
	addr := flag.String("addr", "", "proxy host:port that maps to a TCP echo server")
	n := flag.Int("n", 10000, "sessions to open")
	pid := flag.Int("pid", 0, "PID of the proxy whose RSS is measured")
	workers := flag.Int("workers", 32, "concurrent dials (stay under the proxy's per-source in-flight budget)")
	hold := flag.Duration("hold", 3*time.Second, "how long to hold the sessions before reading RSS")
	timeout := flag.Duration("timeout", 120*time.Second, "overall bound")
	flag.Parse()
	if *addr == "" || *pid <= 0 || *n <= 0 {
		fmt.Fprintln(os.Stderr, "usage: idle -addr HOST:PORT -pid PID [-n 10000]")
		os.Exit(2)
	}
	deadline := time.Now().Add(*timeout)
	res := result{Addr: *addr, Requested: *n}
	var err error
	if res.RSSBeforeKB, err = statusKB(*pid, "VmRSS"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}

	conns, errs, firstErr := open(*addr, *n, *workers, deadline)
	res.Open, res.Errors, res.FirstError = len(conns), errs, firstErr
	res.OpenSeconds = time.Since(deadline.Add(-*timeout)).Seconds()

	// let the proxy settle (goroutine stacks, buffers) before reading, but stay in the bound
	if wait := time.Until(deadline); wait < *hold {
		*hold = max(wait, 0)
	}
	time.Sleep(*hold)
	res.RSSHeldKB, _ = statusKB(*pid, "VmRSS")
	for _, c := range conns {
		c.Close()
	}
	time.Sleep(min(2*time.Second, max(time.Until(deadline), 0)))
	res.RSSAfterCloseKB, _ = statusKB(*pid, "VmRSS")
	res.VmHWMKB, _ = statusKB(*pid, "VmHWM")
	if res.Open > 0 {
		res.KiBPerSession = float64(res.RSSHeldKB-res.RSSBeforeKB) / float64(res.Open)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	_ = enc.Encode(res)
	if res.Open < *n {
		os.Exit(1)
	}
}

// open dials n sessions with a bounded number of workers, each confirmed by a
// one-byte echo, and returns the ones that are open.
func open(addr string, n, workers int, deadline time.Time) ([]net.Conn, int64, string) {
	var (
		mu       sync.Mutex
		conns    = make([]net.Conn, 0, n)
		next     atomic.Int64
		errs     atomic.Int64
		firstErr atomic.Value
		wg       sync.WaitGroup
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := net.Dialer{Timeout: 3 * time.Second}
			buf := []byte{'x'}
			for next.Add(1) <= int64(n) && time.Now().Before(deadline) {
				c, err := session(&d, addr, buf)
				if err != nil {
					if errs.Add(1) == 1 {
						firstErr.Store(err.Error())
					}
					continue
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	fe, _ := firstErr.Load().(string)
	return conns, errs.Load(), fe
}

func session(d *net.Dialer, addr string, buf []byte) (net.Conn, error) {
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write(buf); err != nil {
		c.Close()
		return nil, fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		c.Close()
		return nil, fmt.Errorf("read echo: %w", err)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// statusKB reads one "Key: N kB" line of /proc/PID/status.
func statusKB(pid int, key string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read the proxy's memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), key+":"); ok {
			return strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return 0, errors.New(key + " not found in /proc/" + strconv.Itoa(pid) + "/status")
}
