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
ulimit -n "$(ulimit -Hn)" # the server raises its own limit, but the tool's child may need it

tick=$(getconf CLK_TCK)
tmp=$(mktemp -d)
servers=() # pids of the moor-chat instances of the run
redis=
cleanup() {
    [ ${#servers[@]} -gt 0 ] && kill "${servers[@]}" 2>/dev/null
    [ -n "$redis" ] && kill "$redis" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

# Start a moor-chat with the given arguments, wait for its "listening on" line; append its
# pid to servers and its port to ports.
start_chat() {
    local n=${#servers[@]}
    "$chat" -p 0 "$@" >"$tmp/listen.$n" 2>"$tmp/server.err.$n" &
    servers+=($!)
    local port=
    for _ in $(seq 300); do # 15 s: with --redis it first tries to reach Redis (up to 5 s)
        # the whole line, its newline included (a read may catch the write half done)
        if [ -s "$tmp/listen.$n" ] && [ -z "$(tail -c 1 "$tmp/listen.$n")" ]; then
            port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$tmp/listen.$n")
            break
        fi
        sleep 0.05
    done
    [ -n "$port" ] || { echo "bench.sh: moor-chat did not start" >&2; cat "$tmp/server.err.$n" >&2; exit 1; }
    ports=${ports:+$ports,}$port
}

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
    servers=()
    ports=
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

stop_setup() {
    kill -TERM "${servers[@]}"
    wait "${servers[@]}" 2>/dev/null
    servers=()
    if [ -n "$redis" ]; then
        kill "$redis"
        wait "$redis" 2>/dev/null
        redis=
    fi
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sum_cpu() {
    local s=0 p
    for p in "$@"; do s=$((s + $(cpu_ticks "$p"))); done
    echo "$s"
}

status=0
# run SETUP NAME REP LOAD_ARGS...: one repetition; its figures go to stdout and to
# $tmp/SETUP-NAME.REP
run() {
    local setup=$1 name=$2 rep=$3
    shift 3
    start_setup "$setup"
    local out=$tmp/$setup-$name.$rep before after rbefore=0 rafter=0
    echo "# $setup $name ($rep/$reps): moor-chat-load -p $ports $*"
    before=$(sum_cpu "${servers[@]}")
    [ -n "$redis" ] && rbefore=$(cpu_ticks "$redis")
    if ! "$load" -p "$ports" "$@" >"$out"; then
        status=1
        local n
        for n in "${!servers[@]}"; do # what the servers said, if anything
            kill -0 "${servers[$n]}" 2>/dev/null || echo "bench.sh: moor-chat ${servers[$n]} has died" >&2
            [ -s "$tmp/server.err.$n" ] && sed "s/^/server $n: /" "$tmp/server.err.$n" >&2
        done
    fi
    after=$(sum_cpu "${servers[@]}")
    [ -n "$redis" ] && rafter=$(cpu_ticks "$redis")
    local p
    for p in "${servers[@]}"; do awk '/^VmHWM:/ {print $2}' "/proc/$p/status"; done |
        awk '{s += $1} END {printf "server_peak_rss_mib: %.1f MiB\n", s / 1024}' >>"$out"
    echo "server_cpu_s: $(awk -v t=$((after - before)) -v hz="$tick" \
        'BEGIN {printf "%.2f", t / hz}') s" >>"$out"
    [ -n "$redis" ] && echo "redis_cpu_s: $(awk -v t=$((rafter - rbefore)) -v hz="$tick" \
        'BEGIN {printf "%.2f", t / hz}') s" >>"$out"
    cat "$out"
    stop_setup
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

# The median of key $2 over the repetitions of run $1.
median() {
    cat "$tmp/$1".* | awk -v k="$2:" '$1 == k {print $2}' | sort -g |
        awk '{v[NR] = $1} END {if (NR == 0) print "-";
             else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# The sum of key $2 over the repetitions of run $1 (for lost and reordered).
total() { cat "$tmp/$1".* | awk -v k="$2:" '$1 == k {s += $2} END {print s + 0}'; }

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
