// Command bench is the Go peer of moor's bench_switch, bench_chan and bench_scale: the same
// workloads, in the same two call shapes, written as goroutines and channels are written.
//
//	yield_round_trip_asym_ns     two goroutines runtime.Gosched() in turn, a driver and a
//	                             worker running different functions; one Gosched by each
//	yield_round_trip_ns          the same, both goroutines running one function
//	yield_round_trip_fp_asym_ns  the asym shape after both goroutines and main did
//	                             floating-point work that raises exception flags
//	yield_round_trip_fp_ns       the same-function shape after the same work
//	spawn_join_warm_ns           go + run + sync.WaitGroup.Wait of an empty goroutine
//	spawn_join_cold_ns           10,000 spawned before any is waited for (all alive at once)
//	spawn_join_cold_first_ns     (information) that, once, before anything else in the
//	                             process: no dead goroutine is there to be reused
//	chan_round_trip_asym_ns      unbuffered ping-pong over two channels, a server and a
//	                             returner running different functions
//	chan_round_trip_ns           the same, both goroutines running one function
//	sleepers_100k_wall_ms        100,000 goroutines each time.Sleep(1 s): first go statement
//	                             to the last exit (WaitGroup.Wait returning)
//	sleepers_100k_peak_rss_mib   the process's VmHWM over those runs (reset just before)
//
// GOMAXPROCS is 1 unless the environment sets it: one P runs both goroutines of a pair, as
// one moor executor runs both fibers (the fair single-core comparison). With more Ps,
// Gosched and the channel hand-off cross threads and measure something else.
//
// Each micro figure is the median of 11 repetitions after a warm-up round that is thrown
// away; a round runs every measurement once, as moor's bench.h does. The sleepers run 3
// times, first, so that the peak RSS is theirs.
//
// Usage: bench [scale]    scale multiplies every iteration count (0.1: a quick run).
package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	reps        = 11
	sleeperReps = 3
	yieldN      = 1000000
	spawnN      = 500000
	coldK       = 10000
	chanN       = 1000000
	sleepers    = 100000
)

// ---- floating point, as bench_switch raises it ------------------------------------------

// Package variables: the compiler cannot fold the arithmetic, so it runs and sets MXCSR's
// flags. (Go's scheduler neither saves nor restores MXCSR; this checks that it costs nothing.)
var fpOne, fpThree, fpZero, fpBig = 1.0, 3.0, 0.0, 1e308
var fpSink float64

func fpRaise(who int) {
	switch who {
	case 0:
		fpSink = fpOne / fpThree // inexact
	case 1:
		fpSink = fpOne / fpZero // divide by zero
	default:
		fpSink = fpBig * fpBig // overflow
	}
}

// ---- yield: two functions (asym) ---------------------------------------------------------

func yieldDriver(warm, n int, fp bool, elapsed *time.Duration, wg *sync.WaitGroup) {
	defer wg.Done()
	for i := 0; i < warm; i++ {
		runtime.Gosched()
	}
	if fp {
		fpRaise(0)
	}
	t0 := time.Now()
	for i := 0; i < n; i++ {
		runtime.Gosched()
	}
	*elapsed = time.Since(t0)
}

func yieldWorker(total int, fp bool, wg *sync.WaitGroup) {
	defer wg.Done()
	if fp {
		fpRaise(1)
	}
	for total > 0 {
		runtime.Gosched()
		total--
	}
}

func benchYieldAsym(n int, fp bool) int64 {
	var wg sync.WaitGroup
	var elapsed time.Duration
	warm := n / 16
	wg.Add(2)
	go yieldDriver(warm, n, fp, &elapsed, &wg)
	go yieldWorker(warm+n, fp, &wg)
	if fp {
		fpRaise(2)
	}
	wg.Wait()
	return psPerOp(elapsed, n)
}

// ---- yield: one function ------------------------------------------------------------------

// Both goroutines run this and suspend at its one Gosched call; the timer (who == 0) times.
func yielder(who, warm, n int, fp bool, elapsed *time.Duration, wg *sync.WaitGroup) {
	defer wg.Done()
	for i := 0; i < warm; i++ {
		runtime.Gosched()
	}
	if fp {
		fpRaise(who)
	}
	t0 := time.Now()
	for i := 0; i < n; i++ {
		runtime.Gosched()
	}
	if who == 0 {
		*elapsed = time.Since(t0)
	}
}

func benchYield(n int, fp bool) int64 {
	var wg sync.WaitGroup
	var elapsed time.Duration
	warm := n / 16
	wg.Add(2)
	go yielder(0, warm, n, fp, &elapsed, &wg)
	go yielder(1, warm, n, fp, &elapsed, &wg)
	if fp {
		fpRaise(2)
	}
	wg.Wait()
	return psPerOp(elapsed, n)
}

// ---- spawn + run + join -----------------------------------------------------------------

func empty(wg *sync.WaitGroup) {
	wg.Done()
}

func benchSpawnWarm(n int) int64 {
	var wg sync.WaitGroup
	for i := 0; i < n/16; i++ {
		wg.Add(1)
		go empty(&wg)
		wg.Wait()
	}
	t0 := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go empty(&wg)
		wg.Wait()
	}
	return psPerOp(time.Since(t0), n)
}

// All k alive before the first runs (with one P, none runs until main waits).
func benchSpawnCold(k int) int64 {
	var wg sync.WaitGroup
	t0 := time.Now()
	wg.Add(k)
	for i := 0; i < k; i++ {
		go empty(&wg)
	}
	wg.Wait()
	return psPerOp(time.Since(t0), k)
}

// ---- channel ping-pong, capacity 0 ---------------------------------------------------------

// One function for both: receive, pass on one more. The server puts the ball in play and
// times; the other takes the last ball out and checks the count.
func pinger(in <-chan int, out chan<- int, serves bool, warm, n int, elapsed *time.Duration,
	wg *sync.WaitGroup) {
	defer wg.Done()
	if serves {
		out <- 0
	}
	for i := 0; i < warm; i++ {
		out <- (<-in) + 1
	}
	t0 := time.Now()
	for i := 0; i < n; i++ {
		out <- (<-in) + 1
	}
	if serves {
		*elapsed = time.Since(t0)
	} else if last := <-in; last != 2*(warm+n) {
		panic("ping-pong: a value was lost or duplicated")
	}
}

func benchChan(n int) int64 {
	ab, ba := make(chan int), make(chan int)
	var wg sync.WaitGroup
	var elapsed time.Duration
	warm := n / 16
	wg.Add(2)
	go pinger(ab, ba, false, warm, n, &elapsed, &wg)
	go pinger(ba, ab, true, warm, n, &elapsed, &wg)
	wg.Wait()
	return psPerOp(elapsed, n)
}

// Two functions: the server sends then receives, the returner receives then sends.
func chanServer(out chan<- int, in <-chan int, warm, n int, elapsed *time.Duration,
	wg *sync.WaitGroup) {
	defer wg.Done()
	v := 0
	for i := 0; i < warm; i++ {
		out <- v
		v = <-in + 1
	}
	v = 0
	t0 := time.Now()
	for i := 0; i < n; i++ {
		out <- v
		v = <-in + 1
	}
	*elapsed = time.Since(t0)
	if v != 2*n {
		panic("asymmetric ping-pong: a value was lost or duplicated")
	}
}

func chanReturner(in <-chan int, out chan<- int, total int, wg *sync.WaitGroup) {
	defer wg.Done()
	for ; total > 0; total-- {
		v := <-in
		out <- v + 1
	}
}

func benchChanAsym(n int) int64 {
	ab, ba := make(chan int), make(chan int)
	var wg sync.WaitGroup
	var elapsed time.Duration
	warm := n / 16
	wg.Add(2)
	go chanReturner(ab, ba, warm+n, &wg)
	go chanServer(ab, ba, warm, n, &elapsed, &wg)
	wg.Wait()
	return psPerOp(elapsed, n)
}

// ---- 100,000 sleepers ----------------------------------------------------------------------

func sleeper(wg *sync.WaitGroup) {
	time.Sleep(time.Second)
	wg.Done()
}

// From the first go statement to the last sleeper's exit.
func benchSleepers(n int) time.Duration {
	var wg sync.WaitGroup
	t0 := time.Now()
	wg.Add(n)
	for i := 0; i < n; i++ {
		go sleeper(&wg)
	}
	wg.Wait()
	return time.Since(t0)
}

// ---- plumbing ------------------------------------------------------------------------------

func psPerOp(d time.Duration, n int) int64 {
	return d.Nanoseconds() * 1000 / int64(n)
}

type stats struct{ median, min, max int64 }

func statsOf(v []int64) stats {
	s := append([]int64(nil), v...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return stats{s[len(s)/2], s[0], s[len(s)-1]}
}

func ns(ps int64) string { return fmt.Sprintf("%.1f", float64(ps)/1000) }

func statusKiB(field string) int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, field+":") {
			fs := strings.Fields(line[len(field)+1:])
			if len(fs) > 0 {
				v, _ := strconv.ParseInt(fs[0], 10, 64)
				return v
			}
		}
	}
	return -1
}

// Reset VmHWM to the current RSS (proc(5): clear_refs, 5).
func peakRSSReset() {
	_ = os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "model name") {
			if i := strings.IndexByte(line, ':'); i >= 0 {
				return strings.TrimSpace(line[i+1:])
			}
		}
	}
	return "unknown"
}

func scaled(base int, scale float64) int {
	n := int(float64(base) * scale)
	if n < 1 {
		n = 1
	}
	return n
}

type figure struct {
	key  string
	iter int
	run  func(n int) int64
}

func main() {
	scale, scaleArg := 1.0, "1"
	if len(os.Args) > 2 {
		fmt.Fprintf(os.Stderr, "usage: %s [scale]   (scale multiplies iteration counts; default 1)\n", os.Args[0])
		os.Exit(2)
	}
	if len(os.Args) == 2 {
		scaleArg = os.Args[1]
		s, err := strconv.ParseFloat(scaleArg, 64)
		if err != nil || !(s > 0) || s > 1000 {
			fmt.Fprintf(os.Stderr, "%s: scale must be a number in (0, 1000], not %q\n", os.Args[0], scaleArg)
			os.Exit(2)
		}
		scale = s
	}
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}

	// Before anything else has made (and left dead) goroutines for the runtime to reuse.
	coldFirst := benchSpawnCold(scaled(coldK, scale))

	// The sleepers next: the process's peak RSS is theirs.
	nSleepers := sleepers
	peakRSSReset()
	rss0 := statusKiB("VmRSS")
	var sleepNs []int64
	for i := 0; i < sleeperReps; i++ {
		sleepNs = append(sleepNs, benchSleepers(nSleepers).Nanoseconds())
	}
	hwm := statusKiB("VmHWM")

	figs := []figure{
		{"yield_round_trip_asym_ns", scaled(yieldN, scale), func(n int) int64 { return benchYieldAsym(n, false) }},
		{"yield_round_trip_ns", scaled(yieldN, scale), func(n int) int64 { return benchYield(n, false) }},
		{"yield_round_trip_fp_asym_ns", scaled(yieldN, scale), func(n int) int64 { return benchYieldAsym(n, true) }},
		{"yield_round_trip_fp_ns", scaled(yieldN, scale), func(n int) int64 { return benchYield(n, true) }},
		{"spawn_join_warm_ns", scaled(spawnN, scale), benchSpawnWarm},
		{"spawn_join_cold_ns", scaled(coldK, scale), benchSpawnCold},
		{"chan_round_trip_asym_ns", scaled(chanN, scale), benchChanAsym},
		{"chan_round_trip_ns", scaled(chanN, scale), benchChan},
	}
	results := make([][]int64, len(figs))
	for round := -1; round < reps; round++ {
		for i, f := range figs {
			r := f.run(f.iter)
			if round >= 0 {
				results[i] = append(results[i], r)
			}
		}
	}

	fmt.Printf("peer: go %s\n", runtime.Version())
	fmt.Printf("gomaxprocs: %d\n", runtime.GOMAXPROCS(0))
	st := make([]stats, len(figs))
	for i, f := range figs {
		st[i] = statsOf(results[i])
		fmt.Printf("%s: %s ns\n", f.key, ns(st[i].median))
		fmt.Printf("%s_spread: %s..%s ns\n", f.key, ns(st[i].min), ns(st[i].max))
	}
	fmt.Printf("spawn_join_cold_first_ns: %s ns\n", ns(coldFirst))
	ss := statsOf(sleepNs)
	ms := func(v int64) string { return fmt.Sprintf("%.1f", float64(v)/1e6) }
	fmt.Printf("sleepers_100k_wall_ms: %s ms\n", ms(ss.median))
	fmt.Printf("sleepers_100k_wall_ms_spread: %s..%s ms\n", ms(ss.min), ms(ss.max))
	fmt.Printf("sleepers_100k_peak_rss_mib: %d MiB\n", (hwm+512)/1024)
	fmt.Printf("sleepers_100k_peak_rss_growth_mib: %d MiB\n", (hwm-rss0+512)/1024)
	fmt.Printf("cpu_model: %s\n", cpuModel())

	fmt.Printf("\n%d repetitions, median shown, after one warm-up round; scale %s; GOMAXPROCS %d\n",
		reps, scaleArg, runtime.GOMAXPROCS(0))
	fmt.Printf("%-28s %10s %10s %10s %8s %10s\n", "figure (ns)", "median", "min", "max", "spread", "iterations")
	for i, f := range figs {
		spread := int64(0)
		if st[i].median > 0 {
			spread = (st[i].max - st[i].min) * 100 / st[i].median
		}
		fmt.Printf("%-28s %10s %10s %10s %7d%% %10d\n", f.key, ns(st[i].median), ns(st[i].min),
			ns(st[i].max), spread, f.iter)
	}
	fmt.Printf("%d sleepers of 1 s, %d runs: wall median %s ms\n", nSleepers, sleeperReps, ms(ss.median))
}
