#!/usr/bin/env bash
# Issue 17's one command: build moor and its peers, run every benchmark on this machine in one
# invocation, and print one table — workload, moor, each peer, moor's ratio to each — with the
# spread beside every figure. Peers are built only where their toolchain is (sh .ci/deps bench
# installs them); the table says which were skipped and why.
#
#   tests/bench/run.sh [BUILD_DIR] [REPS] [SCALE]
#
# BUILD_DIR (default build-bench, a Release build), REPS: runs of each micro benchmark program
# (default 3; each run already takes the median of 11 repetitions, the table shows the median
# of the runs and their min..max), SCALE: their iteration-count scale (default 0.5). The micro
# benchmarks run on core 1 (taskset), one program at a time. Writes BUILD_DIR/bench-results/
# (each program's output, results.tsv, and ratios.png when gnuplot is there).
# RUN_SH_TABLE_ONLY=1 prints the table and the plot again from BUILD_DIR's last results.
set -u
cd "$(dirname "$0")/../.."
build=${1:-build-bench} reps=${2:-3} scale=${3:-0.5}
out=$build/bench-results
start=$SECONDS

if [ -n "${RUN_SH_TABLE_ONLY-}" ]; then
    # Print the table and the plot again from an earlier run's results.
    skipped=()
    [ -f "$out/boost.1" ] || skipped+=("Boost.Fiber: no results in $out")
    [ -f "$out/go.1" ] || skipped+=("Go: no results in $out")
else
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null || exit 1
    cmake --build "$build" -j"$(nproc)" >/dev/null || { echo "run.sh: build failed" >&2; exit 1; }
    rm -rf "$out" && mkdir -p "$out"
    absbuild=$(cd "$build" && pwd)
    bench=$build/tests/bench
    pin="taskset -c 1"
    command -v taskset >/dev/null || pin=

    skipped=()
    have_boost=0 have_go=0
    if [ -x "$bench/peers/boost_fiber" ]; then
        have_boost=1
    else
        skipped+=("Boost.Fiber: not built (libboost-fiber-dev or a C++ compiler missing: sh .ci/deps bench)")
    fi
    if command -v go >/dev/null; then
        export GOCACHE=${GOCACHE:-$absbuild/go-cache} GOFLAGS=-buildvcs=false
        if (cd tests/bench/peers/go && go build -o "$absbuild/peers-go/" ./bench ./echo ./chat) \
            >"$out/go-build.log" 2>&1; then
            have_go=1
        else
            skipped+=("Go: go build failed (see $out/go-build.log)")
        fi
    else
        skipped+=("Go: no go toolchain (golang-go: sh .ci/deps bench)")
    fi
    gobin=$build/peers-go

    # ---- run ---------------------------------------------------------------------------------
    echo "run.sh: $reps runs of each micro benchmark at scale $scale, then sleepers, echo, chat" >&2
    for r in $(seq "$reps"); do
        $pin "$bench/bench_switch" "$scale" >"$out/moor-switch.$r" 2>&1
        $pin "$bench/bench_chan" "$scale" >"$out/moor-chan.$r" 2>&1
        [ $have_boost = 1 ] && $pin "$bench/peers/boost_fiber" "$scale" >"$out/boost.$r" 2>&1
        [ $have_go = 1 ] && GOMAXPROCS=1 $pin "$gobin/bench" "$scale" >"$out/go.$r" 2>&1
        echo "run.sh: run $r of $reps done ($((SECONDS - start)) s)" >&2
    done
    # 100,000 sleepers (bench_scale's small phases: 100,000 suspended fibers too)
    $pin "$bench/bench_scale" 100000 >"$out/moor-scale.1" 2>&1

    # Echo: moor and raw libev by bench_echo itself; the Go server pinned to core 0, driven by the
    # same client on core 1.
    "$bench/bench_echo" 2 3 >"$out/moor-echo.1" 2>&1
    if [ $have_go = 1 ]; then
        taskset -c 0 "$gobin/echo" >"$out/go-echo-server" 2>&1 &
        gopid=$!
        for _ in $(seq 50); do grep -q '^listening:' "$out/go-echo-server" && break; sleep 0.1; done
        addr=$(awk '/^listening:/ {print $2}' "$out/go-echo-server")
        $pin "$bench/bench_echo" --external "$addr" 2 3 >"$out/go-echo.1" 2>&1
        kill "$gopid" 2>/dev/null
        wait "$gopid" 2>/dev/null
    fi

    # Chat: moor-chat and the Go server (one core, then Go's default) under moor-chat-load.
    chatb=tests/bench/peers/go/chat_bench.sh
    load=$build/examples/chat/moor-chat-load
    bash "$chatb" "$build/examples/chat/moor-chat" "$load" "$reps" >"$out/moor-chat.1" 2>&1
    if [ $have_go = 1 ]; then
        GOMAXPROCS=1 bash "$chatb" "$gobin/chat" "$load" "$reps" >"$out/go-chat.1" 2>&1
        GOMAXPROCS=$(nproc) bash "$chatb" "$gobin/chat" "$load" "$reps" >"$out/gomp-chat.1" 2>&1
    fi
fi

# ---- the table -----------------------------------------------------------------------------
# value FILE-PREFIX KEY: "median lo hi" of KEY's value over the runs FILE-PREFIX.*, or "- - -".
# A program run once that takes its own median prints "KEY_spread: lo..hi": that is the spread.
value() {
    local spread
    spread=$(cat "$out/$1".* 2>/dev/null | awk -v k="$2_spread:" '$1 == k {print $2; exit}')
    cat "$out/$1".* 2>/dev/null | awk -v k="$2:" '$1 == k && $2 != "-" {print $2}' | sort -g |
        awk -v sp="$spread" '{v[NR] = $1}
             END {if (!NR) {print "- - -"; exit}
                  m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
                  lo = v[1]; hi = v[NR]
                  if (NR == 1 && split(sp, b, /\.\./) == 2) {lo = b[1]; hi = b[2]}
                  print m, lo, hi}'
}

# workload | unit | better | moor source, key | boost key | go source, key | go (all cores) source
rows=(
    "yield round trip, different functions|ns|lower|moor-switch yield_round_trip_asym_ns|boost yield_round_trip_asym_ns|go yield_round_trip_asym_ns|"
    "yield round trip, same function|ns|lower|moor-switch yield_round_trip_ns|boost yield_round_trip_ns|go yield_round_trip_ns|"
    "yield after FP work, different functions|ns|lower|moor-switch yield_round_trip_fp_asym_ns|boost yield_round_trip_fp_asym_ns|go yield_round_trip_fp_asym_ns|"
    "spawn+run+join, warm|ns|lower|moor-switch spawn_join_warm_ns|boost spawn_join_warm_ns|go spawn_join_warm_ns|"
    "spawn+run+join, cold|ns|lower|moor-switch spawn_join_cold_ns|boost spawn_join_cold_ns|go spawn_join_cold_ns|"
    "channel round trip, different functions|ns|lower|moor-chan chan_round_trip_asym_ns|boost chan_round_trip_asym_ns|go chan_round_trip_asym_ns|"
    "channel round trip, same function|ns|lower|moor-chan chan_round_trip_ns|boost chan_round_trip_ns|go chan_round_trip_ns|"
    "100,000 sleepers of 1 s, wall|ms|lower|moor-scale sleepers_100k_wall_ms|boost sleepers_100k_wall_ms|go sleepers_100k_wall_ms|"
    "100,000 sleepers, peak RSS|MiB|lower|moor-scale sleepers_100k_peak_rss_mib|boost sleepers_100k_peak_rss_mib|go sleepers_100k_peak_rss_mib|"
    "TCP echo, 100 conns, 64 B|msgs/s|higher|moor-echo echo_moor_msgs_per_s||go-echo echo_external_msgs_per_s|"
    "chat, 100 clients, delivered|lines/s|higher|moor-chat chat_100_delivered_lines_per_s||go-chat chat_100_delivered_lines_per_s|gomp-chat chat_100_delivered_lines_per_s"
    "chat, 100 clients, p99 latency|ms|lower|moor-chat chat_100_latency_p99_ms||go-chat chat_100_latency_p99_ms|gomp-chat chat_100_latency_p99_ms"
    "chat, 1,000 clients, delivered|lines/s|higher|moor-chat chat_1000_delivered_lines_per_s||go-chat chat_1000_delivered_lines_per_s|gomp-chat chat_1000_delivered_lines_per_s"
    "chat, 1,000 clients, p99 latency|ms|lower|moor-chat chat_1000_latency_p99_ms||go-chat chat_1000_latency_p99_ms|gomp-chat chat_1000_latency_p99_ms"
    "chat, 1,000 clients, server CPU|s|lower|moor-chat chat_1000_server_cpu_s||go-chat chat_1000_server_cpu_s|gomp-chat chat_1000_server_cpu_s"
    "chat, 1,000 clients, server peak RSS|MiB|lower|moor-chat chat_1000_server_peak_rss_mib||go-chat chat_1000_server_peak_rss_mib|gomp-chat chat_1000_server_peak_rss_mib"
)

# cell "median lo hi": "median (lo..hi)"
cell() { [ "$1" = - ] && echo "—" || echo "$1 ($2..$3)"; }
# ratio MOOR PEER BETTER: how many times better moor is (>1: moor ahead), or —
ratio() {
    awk -v m="$1" -v p="$2" -v b="$3" 'BEGIN {
        if (m == "-" || p == "-" || m + 0 == 0 || p + 0 == 0) { print "—"; exit }
        printf "%.2f x\n", b == "lower" ? p / m : m / p }'
}

raw=$(value moor-switch raw_switch_round_trip_ns)
tsv=$out/results.tsv
: >"$tsv"
{
    echo "| workload | moor | Boost.Fiber | Go (1 core) | Go (all cores) | moor vs Boost.Fiber | moor vs Go (1 core) |"
    echo "|---|---|---|---|---|---|---|"
    for row in "${rows[@]}"; do
        IFS='|' read -r name unit better msrc bsrc gsrc gmsrc <<<"$row"
        read -r mm ml mh <<<"$(value ${msrc% *} ${msrc#* })"
        bm=- bl=- bh=- gm=- gl=- gh=- xm=- xl=- xh=-
        [ -n "$bsrc" ] && read -r bm bl bh <<<"$(value ${bsrc% *} ${bsrc#* })"
        [ -n "$gsrc" ] && read -r gm gl gh <<<"$(value ${gsrc% *} ${gsrc#* })"
        [ -n "$gmsrc" ] && read -r xm xl xh <<<"$(value ${gmsrc% *} ${gmsrc#* })"
        rb=$(ratio "$mm" "$bm" "$better") rg=$(ratio "$mm" "$gm" "$better")
        echo "| $name ($unit, $better is better) | $(cell $mm $ml $mh) | $(cell $bm $bl $bh) | $(cell $gm $gl $gh) | $(cell $xm $xl $xh) | $rb | $rg |"
        printf '%s\t%s\t%s\n' "$name" "${rb% x}" "${rg% x}" >>"$tsv"
    done
    read -r rm rl rh <<<"$raw"
    echo "| reference: raw \`jump_fcontext\` round trip (ns) | $(cell $rm $rl $rh) | | | | | |"
    read -r lm ll lh <<<"$(value moor-echo echo_libev_msgs_per_s)"
    echo "| reference: raw libev echo server (msgs/s) | $(cell $lm $ll $lh) | | | | | |"
} | tee "$out/table.md"

echo
for s in "${skipped[@]+"${skipped[@]}"}"; do echo "skipped: $s"; done
echo "ratios: how many times better moor is (above 1: moor ahead); medians of $reps runs (min..max)"
echo "machine: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(nproc) cores; $(date -u +%Y-%m-%d)"

# ---- the plot ------------------------------------------------------------------------------
if command -v gnuplot >/dev/null; then
    gnuplot <<EOF 2>"$out/gnuplot.log" && echo "plot: $out/ratios.png"
set terminal pngcairo size 1200,720 font ",10"
set output "$out/ratios.png"
set title "moor against its peers: how many times better moor is (log scale; above 1: moor ahead)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y 2
set yrange [1.0/64:256]
set grid ytics
set ytics ("1/64" 1.0/64, "1/16" 1.0/16, "1/4" 0.25, "1/2" 0.5, "1" 1, "2" 2, "4" 4, "16" 16, "64" 64, "256" 256)
set xtics rotate by 40 right noenhanced
set bmargin 13
set lmargin 22
set key outside top center horizontal
set datafile separator "\t"
set datafile missing "—"
plot "$tsv" using 2:xtic(1) title "vs Boost.Fiber", "" using 3 title "vs Go (GOMAXPROCS=1)", 1 notitle lw 2 lc rgb "black"
EOF
else
    echo "plot: skipped (no gnuplot: sh .ci/deps bench)"
fi
echo "run.sh: $((SECONDS - start)) s" >&2
