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
# shellcheck source-path=SCRIPTDIR source=../../../../examples/chat/bench-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../../../examples/chat/bench-lib.sh" # shared with bench.sh

status=0
run() { # run NAME REP LOAD_ARGS...: one repetition, its figures into $tmp/NAME.REP
    local name=$1 rep=$2
    shift 2
    # shellcheck disable=SC2119 # -p 0 and no other flags: the Go peer has none
    start_chat
    echo "# $name ($rep/$reps): $(basename "$chat"), moor-chat-load -p $ports $*" >&2
    measure "$tmp/$name.$rep" "$@" || status=1
    stop_servers
}

for rep in $(seq "$reps"); do
    run chat_100 "$rep" -c 100 -m 1000
    run chat_1000 "$rep" -c 1000 -m 10 -r 1
done

# report RUN KEY UNIT: the median over the repetitions, then the spread (min..max).
report() {
    local v
    v=$(values "$1" "$2")
    echo "$1_$2: $(median "$1" "$2") $3"
    [ -z "$v" ] || echo "$1_$2_spread: $(head -n 1 <<<"$v")..$(tail -n 1 <<<"$v") $3"
}

for name in chat_100 chat_1000; do
    report "$name" delivered_lines_per_s lines/s
    report "$name" latency_p99_ms ms
    report "$name" server_cpu_s s
    report "$name" server_peak_rss_mib MiB
    echo "${name}_lost_reordered_disconnected: $(total "$name" lost) $(total "$name" reordered)" \
        "$(total "$name" disconnected)"
done
exit $status
