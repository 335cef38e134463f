package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// watchResult is a process's memory and CPU over a watch.
type watchResult struct {
	PID       int     `json:"pid"`
	Samples   int     `json:"samples"`
	WallS     float64 `json:"wall_s"`
	RSSStartK int64   `json:"rss_start_kb"`
	RSSPeakK  int64   `json:"rss_peak_kb"`
	RSSEndK   int64   `json:"rss_end_kb"`
	VmHWMK    int64   `json:"vmhwm_kb"` // peak since the process started; the kernel updates it lazily
	CPUS      float64 `json:"cpu_s"`    // utime+stime over the watch
	Cores     float64 `json:"cores"`    // CPUS / WallS
	// MaxSampleGap is the longest time between two samples; the sampler
	// shares the cores, so a long gap means the machine, not only the
	// watched process, was starved.
	MaxSampleGapMS float64 `json:"max_sample_gap_ms"`
	Exited         bool    `json:"exited,omitempty"` // the process went away during the watch
}

// clkTck is USER_HZ, 100 on every Linux architecture Go supports.
const clkTck = 100

// watch samples pid every interval until ctx is done.
func watch(ctx context.Context, pid int, interval time.Duration) (watchResult, error) {
	res := watchResult{PID: pid}
	rss, err := statusKB(pid, "VmRSS")
	if err != nil {
		return res, err
	}
	ticks0, err := cpuTicks(pid)
	if err != nil {
		return res, err
	}
	res.RSSStartK, res.RSSPeakK, res.RSSEndK = rss, rss, rss
	start, last := time.Now(), time.Now()
	ticks := ticks0
	t := time.NewTicker(interval)
	defer t.Stop()
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-t.C:
		}
		rss, err := statusKB(pid, "VmRSS")
		if err != nil {
			res.Exited = true
			break
		}
		if tk, err := cpuTicks(pid); err == nil {
			ticks = tk
		}
		if hwm, err := statusKB(pid, "VmHWM"); err == nil {
			res.VmHWMK = hwm
		}
		now := time.Now()
		res.MaxSampleGapMS = max(res.MaxSampleGapMS, ms(now.Sub(last)))
		last = now
		res.Samples++
		res.RSSEndK = rss
		res.RSSPeakK = max(res.RSSPeakK, rss)
	}
	res.WallS = time.Since(start).Seconds()
	res.CPUS = float64(ticks-ticks0) / clkTck
	if res.WallS > 0 {
		res.Cores = res.CPUS / res.WallS
	}
	return res, nil
}

// statusKB reads one "Key: N kB" line of /proc/PID/status.
func statusKB(pid int, key string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), key+":"); ok {
			return strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return 0, errors.New(key + " not in /proc/" + strconv.Itoa(pid) + "/status")
}

// cpuTicks is utime+stime of pid, in clock ticks.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatTicks(string(b))
}

// parseStatTicks reads utime and stime (fields 14 and 15) from a
// /proc/PID/stat line; the command name (field 2) may hold spaces and
// parentheses, so fields are counted from its last ')'.
func parseStatTicks(s string) (int64, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc/PID/stat")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state): utime is field 14 -> f[11], stime f[12].
	if len(f) < 13 {
		return 0, errors.New("short /proc/PID/stat")
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/PID/stat: %w", err)
	}
	return u + st, nil
}
