#!/usr/bin/env bash
# The chat benchmark: moor-chat-load against moor-chat on one executor (--threads 1), on two
# (--threads 2), and against two moor-chat instances sharing one room through Redis (--redis,
# the load tool's clients spread over both: half of each line's deliveries cross Redis).
#
#   examples/chat/bench.sh [BUILD_DIR] [REPS]        BUILD_DIR defaults to ./build, REPS to 3
#
# Builds nothing. Each setup (t1, t2, redis) runs each workload REPS times, each time on
# servers of their own (moor-chat -p 0; for redis, a redis-server of its own too):
#   full    100 clients, all talking at full speed (a window of 64 lines each), 1,000 lines each
#   rate    1,000 clients, all talking at 1 line/s for 10 s: ~1M deliveries/s
#   big     (BIG=1 only) 10,000 connected clients, of which 100 talk at 1 line/s for 5 s
# Connecting 10,000 clients costs O(n^2) "joined" lines (50 million): some 20 s of the ~25 s
# the big run takes; without BIG, three repetitions of everything take about 3 minutes on a
# 2-core VM. SETUPS="t1 t2" (say) runs only some setups.
# Beside each run's figures (moor-chat-load's `key: value unit` lines) it prints the servers'
# peak RSS (VmHWM, summed over the instances) and the CPU seconds they spent from just before
# the load tool started to just after it exited (utime + stime, summed; redis-server's apart,
# redis_cpu_s), then stops them. The table at the end gives each figure's median over the
# repetitions. Exit status 1 if any run lost or reordered a line, or failed.
#
# Mind the machine: on 2 cores the load tool (one thread) takes one, so --threads 2 shares
# the other with it, and the redis setup runs three processes on one core.
set -u

build=${1:-./build}
reps=${2:-3}
setups=${SETUPS:-t1 t2 redis}
chat=$build/examples/chat/moor-chat
load=$build/examples/chat/moor-chat-load
for bin in "$chat" "$load"; do
    [ -x "$bin" ] || { echo "bench.sh: $bin: not built (give the build directory)" >&2; exit 2; }
done
case " $setups " in
*" redis "*)
    command -v redis-server >/dev/null ||
        { echo "bench.sh: no redis-server: the redis setup is skipped" >&2; setups=${setups/redis/}; }
esac
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh" # the machinery, shared with chat_bench.sh

# A redis-server on a free loopback port, persistence off: sets redis and redis_port.
start_redis() {
    for _ in $(seq 20); do
        redis_port=$((20000 + RANDOM % 40000))
        redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
            --loglevel warning >/dev/null 2>&1 &
        redis=$!
        for _ in $(seq 50); do
            # ours, not another one that had the port (then ours has died: try another)
            redis-cli -p "$redis_port" info server 2>/dev/null | tr -d '\r' |
                grep -qx "process_id:$redis" && return
            kill -0 "$redis" 2>/dev/null || break
            sleep 0.05
        done
        kill "$redis" 2>/dev/null
        wait "$redis" 2>/dev/null
    done
    echo "bench.sh: redis-server did not start" >&2
    exit 1
}

start_setup() {
    case $1 in
    t1) start_chat --threads 1 ;;
    t2) start_chat --threads 2 ;;
    redis)
        start_redis
        start_chat --redis "127.0.0.1:$redis_port"
        start_chat --redis "127.0.0.1:$redis_port"
        ;;
    esac
}

status=0
# run SETUP NAME REP LOAD_ARGS...: one repetition; its figures go to stdout and to
# $tmp/SETUP-NAME.REP
run() {
    local setup=$1 name=$2 rep=$3
    shift 3
    start_setup "$setup"
    local out=$tmp/$setup-$name.$rep
    echo "# $setup $name ($rep/$reps): moor-chat-load -p $ports $*"
    measure "$out" "$@" || status=1
    cat "$out"
    stop_servers
}

workloads="full rate"
[ "${BIG:-0}" = 1 ] && workloads="$workloads big"
for rep in $(seq "$reps"); do
    for setup in $setups; do
        run "$setup" full "$rep" -c 100 -m 1000
        run "$setup" rate "$rep" -c 1000 -m 10 -r 1
        [ "${BIG:-0}" = 1 ] && run "$setup" big "$rep" -c 10000 -t 100 -m 5 -r 1
    done
done

echo
echo "medians of $reps run(s); lost and reordered: totals; t1/t2: --threads 1/2; redis: two"
echo "instances through one redis-server (cpu_s is theirs, redis-server's apart)"
printf '%-6s %-5s %7s %7s %6s %13s %9s %9s %11s %6s %6s %8s %7s %7s\n' setup run clients \
    talkers rate delivered/s p50_ms p99_ms connect_ms lost reord rss_mib cpu_s redis_s
for setup in $setups; do
    for name in $workloads; do
        r=$setup-$name
        printf '%-6s %-5s %7s %7s %6s %13s %9s %9s %11s %6s %6s %8s %7s %7s\n' "$setup" \
            "$name" "$(median "$r" clients)" "$(median "$r" talkers)" "$(median "$r" rate)" \
            "$(median "$r" delivered_lines_per_s)" "$(median "$r" latency_p50_ms)" \
            "$(median "$r" latency_p99_ms)" "$(median "$r" connect_all_ms)" \
            "$(total "$r" lost)" "$(total "$r" reordered)" \
            "$(median "$r" server_peak_rss_mib)" "$(median "$r" server_cpu_s)" \
            "$(median "$r" redis_cpu_s)"
    done
done
exit $status
