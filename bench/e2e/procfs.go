package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"
)

// procSchedNS is the run time in nanoseconds of the live threads of pid,
// summed from /proc/PID/task/*/schedstat (finer than procCPU's ticks).
func procSchedNS(pid int) (time.Duration, error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		return 0, fmt.Errorf("no schedstat for %d", pid)
	}
	var sum uint64
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // thread exited
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseUint(f[0], 10, 64)
		if err == nil {
			sum += v
		}
	}
	return time.Duration(sum), nil
}

// procStatusKiB reads a "Name:   123 kB" field of /proc/PID/status.
func procStatusKiB(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, field+":") {
			fs := strings.Fields(line[len(field)+1:])
			if len(fs) == 0 {
				break
			}
			return strconv.ParseInt(fs[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("%s not found for %d", field, pid)
}

func procRSSKiB(pid int) (int64, error) { return procStatusKiB(pid, "VmRSS") }

func procFDs(pid int) int {
	d, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(d)
}

func procThreads(pid int) int {
	d, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return -1
	}
	return len(d)
}

// cpuTotals reads the machine's idle and total jiffies (/proc/stat).
func cpuTotals() (idle, total uint64) { return benchkit.CPUTotals() }

// waitIdle waits (at most maxWait) until the machine is idle: less than
// maxBusy of all CPUs busy over a 200 ms window. It returns the busy
// fraction of the last window and, if the machine was still busy, the
// process that used the most CPU in it.
func waitIdle(maxWait time.Duration, maxBusy float64) (float64, string) {
	deadline := time.Now().Add(maxWait)
	busy := 1.0
	for {
		i0, t0 := cpuTotals()
		p0 := allProcCPU()
		time.Sleep(200 * time.Millisecond)
		i1, t1 := cpuTotals()
		if t1 > t0 {
			busy = 1 - float64(i1-i0)/float64(t1-t0)
		}
		if busy < maxBusy {
			return busy, ""
		}
		if time.Now().After(deadline) {
			top, topd := "", time.Duration(0)
			for pid, c1 := range allProcCPU() {
				if d := c1.cpu - p0[pid].cpu; d > topd {
					top, topd = fmt.Sprintf("%s[%d] %s", c1.name, pid, d), d
				}
			}
			return busy, top
		}
	}
}

type procSample struct {
	name string
	cpu  time.Duration
}

// allProcCPU samples the CPU time of every process.
func allProcCPU() map[int]procSample {
	m := map[int]procSample{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil {
			continue
		}
		c, err := benchkit.ProcCPU(pid)
		if err != nil {
			continue
		}
		m[pid] = procSample{strings.TrimSpace(string(b)), c}
	}
	return m
}

// listening reports whether a TCP socket listens on 127.0.0.1:port.
func listening(port int) bool { return benchkit.Listening(port) }

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func kernelRelease() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

func memTotal() string {
	b, _ := os.ReadFile("/proc/meminfo")
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.Join(strings.Fields(line)[1:], " ")
}
