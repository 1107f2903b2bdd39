#!/bin/sh
# Drive fiber/moor-gdb.py with gdb in batch mode against tests/gdb/target.c, stopped with its
# fibers in known places, and check what the script prints:
#   1. live, the target run under gdb (stopped by its own SIGTRAP);
#   2. live, gdb attached by pid (skipped, saying so, where ptrace attach is not allowed);
#   3. a core made with gcore, of a target whose stacks have mprotect guards;
#   4. a core made with gcore where the stacks have MADV_GUARD_INSTALL guards (kernel 6.13+),
#      which gdb cannot save: the script must say the fibers' memory is missing;
#   5. with MOOR_GDB_VALGRIND=1, live under valgrind's memcheck, through vgdb.
# Usage: test_gdb.sh SCRIPT TARGET WORKDIR. Exits 77 (skipped) without gdb or ptrace.
# MOOR_GDB_CORES=0 leaves out the cores (sanitizer builds, whose shadow memory would make
# cores of terabytes); every gcore runs under a 1 GiB file size limit all the same.
set -u
script=$1
target=$2
work=$3
fail=0

skip() { echo "SKIP: $*"; exit 77; }
bad() { echo "FAIL: $*"; fail=1; }

command -v gdb >/dev/null 2>&1 || skip "gdb is not installed"
rm -rf "$work"
mkdir -p "$work" || exit 1

gdb_batch() { timeout 120 gdb -nx -batch -x "$script" "$@" 2>&1; }
cores=${MOOR_GDB_CORES:-1}
# gcore_batch PID FILE: write a core of process PID to FILE, no larger than 1 GiB (ulimit -f
# counts 512-byte blocks): a core of the target is some 100 MiB.
gcore_batch() { (ulimit -f 2097152 && timeout 120 gdb -nx -batch -p "$1" -ex "gcore $2" 2>&1); }

# check_row FILE ID NAME STATE: a row of `moor fibers` (the first executor's rows come first).
check_row() {
    grep -Eq "^ +$2 +0x[0-9a-f]+ +$3 +$4( |\$)" "$1" || bad "$1: no row '$2 $3 $4'"
}

# check_bt FILE HEADER FRAME...: the backtrace printed under the line starting with HEADER
# starts where the fiber switched away, in moor__fiber_suspend_on (at its call of moor__switch,
# which jumps by a tail call; under ASan and TSan, or unoptimised, moor__switch and moor__jump
# keep their frames above it), and its last frames are the functions FRAME..., in this order,
# ending at its entry.
check_bt() {
    file=$1
    header=$2
    shift 2
    got=$(awk -v h="$header" '
        index($0, h) == 1 { on = 1; next }
        on && /^#[0-9]+ / {
            line = $0
            sub(/^#[0-9]+ +(0x[0-9a-f]+ in )?/, "", line)
            sub(/ .*/, "", line)
            printf "%s ", line
            next
        }
        on { exit }' "$file")
    # A receive that waits does so in moor_chan_recv_waiting, which moor_chan_recv reaches by
    # a tail call: moor_chan_recv's own frame is there only in unoptimised builds.
    got=$(printf '%s' "$got" | sed 's/moor_chan_recv_waiting moor_chan_recv /moor_chan_recv_waiting /')
    want="$* fiber_entry "
    case "$got" in
    "moor__fiber_suspend_on "*"$want") ;;
    "moor__jump moor__switch moor__fiber_suspend_on "*"$want") ;;
    *) bad "$file: backtrace under '$header' is '$got', wanted moor__fiber_suspend_on ... $want" ;;
    esac
    case "$got" in
    *"$want") ;;
    *) bad "$file: backtrace under '$header' does not end with '$want'" ;;
    esac
}

# check_listing FILE: what every run must show of the target's fibers.
check_listing() {
    f=$1
    grep -Eq '^thread 1( "[^"]*")?: executor 0x[0-9a-f]+, 6 fibers' "$f" ||
        bad "$f: no listing of thread 1's executor with 6 fibers"
    check_row "$f" 1 reader waiting
    check_row "$f" 2 sleeper waiting
    check_row "$f" 3 quick done
    check_row "$f" 4 yielder ready
    check_row "$f" 5 stopper running
    check_row "$f" 6 fresh ready
    grep -Eq '^ +6 +0x[0-9a-f]+ +fresh +ready +.*not started' "$f" || bad "$f: fresh not 'not started'"
    # Thread numbers past the main thread's depend on the runtime (TSan adds a thread of its
    # own); names are not in cores.
    grep -Eq '^thread [0-9]+( "moor-t2")?: executor 0x[0-9a-f]+, 1 fiber$' "$f" ||
        bad "$f: no listing of thread moor-t2's executor with 1 fiber"
    check_row "$f" 1 t2-waiter waiting
    grep -Eq '^thread [0-9]+( "plain")?: no executor$' "$f" || bad "$f: thread plain not 'no executor'"
    # Where moor records what a fiber waits on (the wait's future and stamp), the rows say it.
    if grep -q ' waits: ' "$f"; then
        grep -Eq '^ +1 +0x[0-9a-f]+ +reader +waiting .* waits: chan recv \(future 0x[0-9a-f]+\) for [0-9]+ ms$' "$f" ||
            bad "$f: reader's row does not say it waits on a chan recv"
        grep -Eq '^ +2 +0x[0-9a-f]+ +sleeper +waiting .* waits: sleep \(future 0x[0-9a-f]+\) for [0-9]+ ms$' "$f" ||
            bad "$f: sleeper's row does not say it waits on a sleep"
    fi
}

# check_bts FILE: the output of `moor bt all`.
check_bts() {
    f=$1
    check_bt "$f" 'fiber 1 "reader" (waiting)' moor_chan_recv_waiting reader_inner reader_outer reader
    check_bt "$f" 'fiber 2 "sleeper" (waiting)' moor_sleep sleeper_nap sleeper
    check_bt "$f" 'fiber 4 "yielder" (ready)' moor_yield yielder_spin yielder
    check_bt "$f" 'fiber 1 "t2-waiter" (waiting)' moor_chan_recv_waiting t2_wait_inner t2_wait_outer t2_waiter
    # The running fiber's backtrace is its thread's: from wherever it stopped down to its entry.
    awk '/^fiber 5 "stopper" \(running\)/ { on = 1; next } on && /^#/ { print } on && !/^[#(]/ { exit }' \
        "$f" | grep -q ' stop_here ()' || bad "$f: running fiber's backtrace lacks stop_here"
    grep -q '^(its function has returned, result 7: no frames)$' "$f" || bad "$f: done fiber"
    grep -q '^(not started yet: it will start in .*<fresh>)$' "$f" || bad "$f: fresh fiber"
}

# ---- 1. run under gdb -------------------------------------------------------------------------
out=$work/run.out
gdb_batch -ex run -ex 'moor fibers' -ex 'echo ---- bt all\n' -ex 'moor bt all' \
    -ex 'echo ---- bt 1.4\n' -ex 'moor bt 1.4' -ex 'echo ---- bt 1\n' -ex 'moor bt 1' \
    -ex 'echo ---- freed\n' -ex 'set var moor__tls_executor->alive = 0' -ex 'moor fibers' \
    -ex 'echo ---- arch\n' -ex 'python print(arch_error("aarch64"))' -ex kill \
    --args "$target" trap >"$out"
if ! grep -q 'received signal SIGTRAP' "$out"; then
    cat "$out"
    if grep -Eqi 'ptrace|not permitted|Couldn.t get registers|cannot set personality' "$out"; then
        skip "gdb cannot run the target here (ptrace not allowed)"
    fi
    bad "$out: the target did not stop under gdb"
    exit 1
fi
check_listing "$out"
check_bts "$out"
sed -n '/^---- bt 1.4$/,/^---- bt 1$/p' "$out" | grep -q ' yielder_spin ()' ||
    bad "$out: moor bt 1.4 did not show the yielder"
sed -n '/^---- bt 1$/,/^---- freed$/p' "$out" | grep -q 'fiber id 1 is in several executors' ||
    bad "$out: moor bt 1 with two fiber 1s not refused"
sed -n '/^---- freed$/,/^---- arch$/p' "$out" | grep -Eq '^thread 1( "[^"]*")?: executor 0x[0-9a-f]+ has been freed$' ||
    bad "$out: a freed executor is not reported as freed"
grep -q 'not supported on aarch64' "$out" || bad "$out: no 'not supported on aarch64'"
if grep -q 'Python Exception\|Traceback' "$out"; then bad "$out: Python error"; fi

# Before any executor exists (stopped at main), and without a process.
out=$work/none.out
gdb_batch -ex 'break main' -ex run -ex 'moor fibers' -ex 'moor bt 1' -ex kill \
    --args "$target" trap >"$out"
grep -Eq '^thread 1( "[^"]*")?: no executor$' "$out" || bad "$out: thread 1 has no executor"
grep -q '^no executor in this process$' "$out" || bad "$out: 'no executor in this process'"
grep -q '^moor bt: no fiber 1 (see moor fibers)$' "$out" || bad "$out: moor bt of no fiber"
out=$work/noprocess.out
gdb_batch -ex 'moor fibers' "$target" >"$out"
grep -q '^no process: run the program, attach to it, or load a core$' "$out" ||
    bad "$out: no 'no process'"
if grep -q 'Python Exception\|Traceback' "$work/none.out" "$out"; then bad "Python error"; fi

# ---- 1b. a second run in the same gdb session, the program at other addresses ---------------
# The script must not keep what it learnt of the first run (where moor__resume_ret was, which
# tells a fiber that has run from one that has not).
out=$work/rerun.out
gdb_batch -ex 'set disable-randomization off' -ex run -ex 'moor fibers' -ex kill -ex run \
    -ex 'echo ---- second run\n' -ex 'moor fibers' -ex kill --args "$target" trap >"$out"
if [ "$(grep -c 'received signal SIGTRAP' "$out")" = 2 ]; then
    check_row "$out" 4 yielder ready
    if grep -Eq '^ +4 +0x[0-9a-f]+ +yielder .*not started' "$out"; then
        bad "$out: after a second run the yielder, which has run, reads as not started"
    fi
else
    bad "$out: the target did not stop twice under gdb"
fi

# ---- 2 to 4. attached by pid; cores -----------------------------------------------------------
# start_paused GUARD: start the target stopped in its running fiber; sets pid and guard.
start_paused() {
    rm -f "$work/ready"
    "$target" pause "$1" >"$work/ready" &
    pid=$!
    i=0
    while [ ! -s "$work/ready" ] && [ $i -lt 200 ]; do
        sleep 0.05
        i=$((i + 1))
    done
    read -r _ _ guard <"$work/ready" || guard=""
}
stop_paused() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=; }
pid=
trap 'stop_paused' EXIT
trap 'exit 1' INT TERM

start_paused madvise
madvise_ok=1
[ "$guard" = madvise ] || madvise_ok=0 # the kernel has no MADV_GUARD_INSTALL: mprotect
out=$work/attach.out
gdb_batch -p "$pid" -ex 'moor fibers' -ex 'moor bt all' >"$out"
if grep -q 'executor 0x' "$out"; then
    check_listing "$out"
    check_bts "$out"
    attached=1
    [ "$cores" = 1 ] && gcore_batch "$pid" "$work/madvise.core" >"$work/gcore-madvise.out"
else
    echo "attach by pid not possible here (see $out); the run under gdb covered a live process"
    attached=0
fi
stop_paused

if [ $attached = 1 ] && [ "$cores" = 1 ]; then
    start_paused mprotect
    gcore_batch "$pid" "$work/mprotect.core" >"$work/gcore.out"
    stop_paused
    out=$work/core.out
    if [ -s "$work/mprotect.core" ]; then
        gdb_batch -ex 'moor fibers' -ex 'moor bt all' "$target" "$work/mprotect.core" >"$out"
        check_listing "$out"
        check_bts "$out"
    else
        bad "gcore made no core (see $work/gcore.out)"
    fi
    if [ $madvise_ok = 1 ] && [ -s "$work/madvise.core" ]; then
        out=$work/madvise-core.out
        gdb_batch -ex 'moor fibers' -ex 'moor bt all' "$target" "$work/madvise.core" >"$out"
        # gdb 13's gcore saves no byte of a mapping it cannot read whole; should a later gdb
        # save them, the core reads like the others.
        if grep -q 'fiber memory reads as zeros from 0x' "$out"; then
            grep -q '(its memory reads as zeros: not in the core)' "$out" ||
                bad "$out: moor bt of a missing fiber"
        else
            check_listing "$out"
        fi
    fi
    rm -f "$work/mprotect.core" "$work/madvise.core"
elif [ "$cores" != 1 ]; then
    echo "cores left out (MOOR_GDB_CORES=0: a sanitizer build)"
fi

# ---- 5. under valgrind, through its gdbserver ----------------------------------------------
if [ "${MOOR_GDB_VALGRIND:-0}" = 1 ]; then
    if command -v valgrind >/dev/null 2>&1 && command -v vgdb >/dev/null 2>&1; then
        rm -f "$work/ready"
        valgrind --quiet --vgdb=yes --vgdb-prefix="$work/vgdb" "$target" pause >"$work/ready" \
            2>"$work/valgrind.err" &
        pid=$!
        i=0
        while [ ! -s "$work/ready" ] && [ $i -lt 600 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        out=$work/valgrind.out
        gdb_batch -ex "target remote | vgdb --vgdb-prefix=$work/vgdb --pid=$pid" \
            -ex 'moor fibers' -ex 'moor bt all' "$target" >"$out"
        stop_paused
        check_listing "$out"
        check_bts "$out"
    else
        bad "MOOR_GDB_VALGRIND=1 but no valgrind or vgdb"
    fi
fi

if [ $fail = 0 ]; then
    echo "moor-gdb.py: all checks passed (attach by pid: $([ $attached = 1 ] && echo yes || echo skipped), cores: $([ "$cores" = 1 ] && [ $attached = 1 ] && echo yes || echo skipped), valgrind: $([ "${MOOR_GDB_VALGRIND:-0}" = 1 ] && echo yes || echo no))"
else
    echo "outputs are in $work"
fi
exit $fail
