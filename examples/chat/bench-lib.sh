# shellcheck shell=bash
# The machinery of the chat benchmarks, sourced by examples/chat/bench.sh and
# tests/bench/peers/go/chat_bench.sh: start chat servers (any binary with moor-chat's command
# line: -p 0, then "listening on HOST:PORT" on stdout), run moor-chat-load against them,
# measure them, take medians. The sourcing script sets chat (the server binary) and load
# (moor-chat-load) first; this makes $tmp, removed on exit with the servers still running.
: "${chat:?}" "${load:?}"
me=${0##*/} # the script's name, for messages
ulimit -n "$(ulimit -Hn)" # the server raises its own limit, but the tool's child may need it

tick=$(getconf CLK_TCK)
tmp=$(mktemp -d)
servers=() # pids of the chat servers of the run
ports=     # their ports, comma-separated
redis=     # the pid of their redis-server, if they have one (the caller starts it)
cleanup() {
    [ ${#servers[@]} -gt 0 ] && kill "${servers[@]}" 2>/dev/null
    [ -n "$redis" ] && kill "$redis" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

# Start $chat -p 0 with the given arguments, wait for its "listening on" line; append its
# pid to servers and its port to ports.
start_chat() {
    local n=${#servers[@]}
    # an earlier repetition's files would show its port until the new server truncates them
    rm -f "$tmp/listen.$n" "$tmp/server.err.$n"
    "$chat" -p 0 "$@" >"$tmp/listen.$n" 2>"$tmp/server.err.$n" &
    servers+=($!)
    local port=
    for _ in $(seq 300); do # 15 s: moor-chat --redis first tries to reach Redis (up to 5 s)
        # the whole line, its newline included (a read may catch the write half done)
        if [ -s "$tmp/listen.$n" ] && [ -z "$(tail -c 1 "$tmp/listen.$n")" ]; then
            port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$tmp/listen.$n")
            [ -n "$port" ] && break
        fi
        kill -0 "${servers[$n]}" 2>/dev/null || break # it has exited
        sleep 0.05
    done
    [ -n "$port" ] || { echo "$me: $chat did not start" >&2; cat "$tmp/server.err.$n" >&2; exit 1; }
    ports=${ports:+$ports,}$port
}

# Stop the servers (and their redis-server, if any).
stop_servers() {
    kill -TERM "${servers[@]}"
    wait "${servers[@]}" 2>/dev/null
    servers=()
    ports=
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

# measure OUT LOAD_ARGS...: run $load -p $ports LOAD_ARGS..., its figures (`key: value unit`
# lines) into OUT, then the servers' peak RSS (VmHWM, summed) and the CPU seconds they spent
# from just before it started to just after it exited (utime + stime, summed; redis-server's
# apart, redis_cpu_s). Fails if the load tool did (a line lost or reordered, a client
# disconnected, ...), saying then what the servers said on stderr.
measure() {
    local out=$1 before after rbefore=0 rafter=0 rc=0 n p
    shift
    before=$(sum_cpu "${servers[@]}")
    [ -n "$redis" ] && rbefore=$(cpu_ticks "$redis")
    if ! "$load" -p "$ports" "$@" >"$out"; then
        rc=1
        for n in "${!servers[@]}"; do
            kill -0 "${servers[$n]}" 2>/dev/null || echo "$me: server ${servers[$n]} has died" >&2
            [ -s "$tmp/server.err.$n" ] && sed "s/^/server $n: /" "$tmp/server.err.$n" >&2
        done
    fi
    after=$(sum_cpu "${servers[@]}")
    [ -n "$redis" ] && rafter=$(cpu_ticks "$redis")
    for p in "${servers[@]}"; do awk '/^VmHWM:/ {print $2}' "/proc/$p/status"; done |
        awk '{s += $1} END {printf "server_peak_rss_mib: %.1f MiB\n", s / 1024}' >>"$out"
    awk -v t=$((after - before)) -v hz="$tick" \
        'BEGIN {printf "server_cpu_s: %.2f s\n", t / hz}' >>"$out"
    [ -n "$redis" ] && awk -v t=$((rafter - rbefore)) -v hz="$tick" \
        'BEGIN {printf "redis_cpu_s: %.2f s\n", t / hz}' >>"$out"
    return $rc
}

# The values of key $2 over the repetitions of run $1 (the files $tmp/$1.*), sorted.
values() { cat "$tmp/$1".* | awk -v k="$2:" '$1 == k {print $2}' | sort -g; }

# Their median, or "-" if there are none.
median() {
    values "$1" "$2" | awk '{v[NR] = $1} END {if (NR == 0) print "-";
        else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# Their sum (for lost, reordered and disconnected).
total() { cat "$tmp/$1".* | awk -v k="$2:" '$1 == k {s += $2} END {print s + 0}'; }
