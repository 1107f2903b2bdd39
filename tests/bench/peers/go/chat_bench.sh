#!/usr/bin/env bash
# Workload 6 of issue 17: moor-chat-load against a chat server, a fresh one per run. Any server
# with moor-chat's command line (-p 0, then "listening on HOST:PORT") will do: moor-chat
# itself or this directory's Go peer, so both are measured the same way.
#
#   chat_bench.sh SERVER LOAD [REPS]      SERVER: the server binary; LOAD: moor-chat-load
#
# Two runs, each REPS times (default 3), on a fresh server each time:
#   chat_100    100 clients, all talking at full speed (a window of 64 lines each), 1,000 lines
#               each (moor-chat-load -c 100 -m 1000), as examples/chat/bench.sh's "full"
#   chat_1000   1,000 clients, all talking 1 line/s for 10 s (-c 1000 -m 10 -r 1), its "rate"
# For each, the median and spread of: delivered_lines_per_s, latency_p99_ms, the server's CPU
# seconds from just before the load tool started to just after it exited (utime + stime), and
# its peak RSS (VmHWM). The server gets the environment as it is: GOMAXPROCS=1 is the Go
# peer's default, `GOMAXPROCS=2 chat_bench.sh ...` gives it Go's own default on 2 cores.
# Exit status 1 if a run lost or reordered a line, dropped a client, or failed.
set -u
[ $# -ge 2 ] || { echo "usage: $0 SERVER LOAD [REPS]" >&2; exit 2; }
chat=$1 load=$2 reps=${3:-3}
for bin in "$chat" "$load"; do
    [ -x "$bin" ] || { echo "chat_bench.sh: $bin: not executable" >&2; exit 2; }
done
ulimit -n "$(ulimit -Hn)"

tick=$(getconf CLK_TCK)
tmp=$(mktemp -d)
server=
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

start_server() {
    "$chat" -p 0 >"$tmp/listen" 2>"$tmp/server.err" &
    server=$!
    for _ in $(seq 100); do
        grep -q '^listening on ' "$tmp/listen" && break
        sleep 0.05
    done
    port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$tmp/listen")
    [ -n "$port" ] || { echo "chat_bench.sh: $chat did not start" >&2; cat "$tmp/server.err" >&2; exit 1; }
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

status=0
run() { # run NAME REP LOAD_ARGS...
    local name=$1 rep=$2 out before after
    shift 2
    start_server
    out=$tmp/$name.$rep
    echo "# $name ($rep/$reps): $(basename "$chat"), moor-chat-load -p $port $*" >&2
    before=$(cpu_ticks "$server")
    "$load" -p "$port" "$@" >"$out" || status=1
    after=$(cpu_ticks "$server")
    awk '/^VmHWM:/ {printf "server_peak_rss_mib: %.1f MiB\n", $2 / 1024}' \
        "/proc/$server/status" >>"$out"
    awk -v t=$((after - before)) -v hz="$tick" \
        'BEGIN {printf "server_cpu_s: %.2f s\n", t / hz}' >>"$out"
    kill -TERM "$server"
    wait "$server" 2>/dev/null
    server=
}

for rep in $(seq "$reps"); do
    run chat_100 "$rep" -c 100 -m 1000
    run chat_1000 "$rep" -c 1000 -m 10 -r 1
done

# report RUN KEY UNIT: the median over the repetitions, then the spread (min..max).
report() {
    cat "$tmp/$1".* | awk -v k="$2:" '$1 == k {print $2}' | sort -g | awk -v key="$1_$2" -v u="$3" '
        {v[NR] = $1}
        END {
            if (NR == 0) { printf "%s: - %s\n", key, u; exit }
            m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%s: %s %s\n%s_spread: %s..%s %s\n", key, m, u, key, v[1], v[NR], u
        }'
}

for name in chat_100 chat_1000; do
    report "$name" delivered_lines_per_s lines/s
    report "$name" latency_p99_ms ms
    report "$name" server_cpu_s s
    report "$name" server_peak_rss_mib MiB
    cat "$tmp/$name".* | awk -v k="$name" '
        $1 == "lost:" {l += $2} $1 == "reordered:" {r += $2} $1 == "disconnected:" {d += $2}
        END {printf "%s_lost_reordered_disconnected: %d %d %d\n", k, l, r, d}'
done
exit $status
