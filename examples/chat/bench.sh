#!/usr/bin/env bash
# The chat benchmark of issue 15: moor-chat-load against a fresh moor-chat per run.
#
#   examples/chat/bench.sh [BUILD_DIR] [REPS]        BUILD_DIR defaults to ./build, REPS to 3
#
# Builds nothing. Three runs, each REPS times, each on a server of its own (moor-chat -p 0):
#   full    100 clients, all talking at full speed (a window of 64 lines each), 1,000 lines each
#   rate    1,000 clients, all talking at 1 line/s for 10 s: ~1M deliveries/s
#   big     10,000 connected clients, of which 100 talk at 1 line/s for 5 s: ~1M deliveries/s
# Connecting 10,000 clients costs O(n^2) "joined" lines (50 million): some 20 s of the
# ~25 s the big run takes. Three repetitions take about 2 minutes on a 2-core VM.
# Beside each run's figures (moor-chat-load's `key: value unit` lines) it prints the server's
# peak RSS (VmHWM) and the CPU seconds it spent from just before the load tool started to
# just after it exited (utime + stime), then stops the server. The table at the end gives
# each figure's median over the repetitions. Exit status 1 if any run lost or reordered a
# line, or failed.
set -u

build=${1:-./build}
reps=${2:-3}
chat=$build/examples/chat/moor-chat
load=$build/examples/chat/moor-chat-load
for bin in "$chat" "$load"; do
    [ -x "$bin" ] || { echo "bench.sh: $bin: not built (give the build directory)" >&2; exit 2; }
done
ulimit -n "$(ulimit -Hn)" # the server raises its own limit, but the tool's child may need it

tick=$(getconf CLK_TCK)
tmp=$(mktemp -d)
server=
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

# Start a server, wait for its "listening on" line, and set $server and $port.
start_server() {
    "$chat" -p 0 >"$tmp/listen" 2>"$tmp/server.err" &
    server=$!
    for _ in $(seq 100); do
        grep -q '^listening on ' "$tmp/listen" && break
        sleep 0.05
    done
    port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$tmp/listen")
    [ -n "$port" ] || { echo "bench.sh: moor-chat did not start" >&2; cat "$tmp/server.err" >&2; exit 1; }
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

status=0
# run NAME LOAD_ARGS...: one repetition; its figures go to stdout and to $tmp/NAME.N
run() {
    local name=$1 rep=$2
    shift 2
    start_server
    local out=$tmp/$name.$rep before after
    echo "# $name ($rep/$reps): moor-chat-load -p $port $*"
    before=$(cpu_ticks "$server")
    "$load" -p "$port" "$@" >"$out" || status=1
    after=$(cpu_ticks "$server")
    awk '/^VmHWM:/ {printf "server_peak_rss_mib: %.1f MiB\n", $2 / 1024}' \
        "/proc/$server/status" >>"$out"
    echo "server_cpu_s: $(awk -v t=$((after - before)) -v hz="$tick" \
        'BEGIN {printf "%.2f", t / hz}') s" >>"$out"
    cat "$out"
    kill -TERM "$server"
    wait "$server" 2>/dev/null
    server=
}

for rep in $(seq "$reps"); do
    run full "$rep" -c 100 -m 1000
    run rate "$rep" -c 1000 -m 10 -r 1
    run big "$rep" -c 10000 -t 100 -m 5 -r 1
done

# The median of key $2 over the repetitions of run $1.
median() {
    cat "$tmp/$1".* | awk -v k="$2:" '$1 == k {print $2}' | sort -g |
        awk '{v[NR] = $1} END {if (NR == 0) print "-";
             else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# The sum of key $2 over the repetitions of run $1 (for lost and reordered).
total() { cat "$tmp/$1".* | awk -v k="$2:" '$1 == k {s += $2} END {print s + 0}'; }

echo
echo "medians of $reps run(s); lost and reordered: totals"
printf '%-5s %7s %7s %6s %13s %9s %9s %11s %6s %6s %8s %7s\n' run clients talkers rate \
    delivered/s p50_ms p99_ms connect_ms lost reord rss_mib cpu_s
for name in full rate big; do
    printf '%-5s %7s %7s %6s %13s %9s %9s %11s %6s %6s %8s %7s\n' "$name" \
        "$(median $name clients)" "$(median $name talkers)" "$(median $name rate)" \
        "$(median $name delivered_lines_per_s)" "$(median $name latency_p50_ms)" \
        "$(median $name latency_p99_ms)" "$(median $name connect_all_ms)" \
        "$(total $name lost)" "$(total $name reordered)" \
        "$(median $name server_peak_rss_mib)" "$(median $name server_cpu_s)"
done
exit $status
