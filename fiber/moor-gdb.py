# moor-gdb.py: gdb commands for programs that use moor's fibers (see docs/DEBUGGING.md).
#
#   moor fibers        every fiber of every executor in the process: thread, executor, id,
#                      name, state, stack range (and what it waits on, where moor records it)
#   moor bt ID|all     the backtrace of a fiber (all: of every fiber with frames)
#
# Load it with `source /path/to/moor-gdb.py`. It reads moor's internal structures through the
# program's debug info (fiber/executor.h), so it works on a live process and on a core alike:
# nothing is written to the inferior.
#
# How a suspended fiber's backtrace is found. A fiber that is not running waits at its call of
# moor__switch, which jumped on to Boost's ontop_fcontext by a tail call (under ASan or TSan,
# or unoptimised, it called it instead, and waits inside moor__switch); ontop_fcontext saved
# the callee-saved registers below the return address on the fiber's stack, and the fiber's
# ctx.fctx points at that block (x86-64 SysV, Boost 1.74 jump_x86_64_sysv_elf_gas.S):
#
#   fctx + 0x00  MXCSR (4 bytes), x87 control word (4 bytes)
#   fctx + 0x08  r12    fctx + 0x10  r13    fctx + 0x18  r14    fctx + 0x20  r15
#   fctx + 0x28  rbx    fctx + 0x30  rbp
#   fctx + 0x38  return address (into moor__switch's caller, or into moor__switch)
#   fctx + 0x40  the caller's stack pointer once that return is taken
#
# A core file's registers cannot be written, so instead of pointing the thread at the fiber
# this script installs a frame unwinder (gdb.unwinder) that, while `moor bt` runs, says the
# caller of the thread's innermost frame is the fiber's frame where it switched, with those
# registers. gdb's own unwinders take it from there, and gdb's own `backtrace` prints it; the
# thread's innermost frame is then left out of what is printed.

import re

import gdb
import gdb.unwinder

# enum moor__task_state and enum moor__fiber_state (fiber/executor.h), used when the enums
# themselves are not in the debug info (their values are only stored in uint8_t fields).
_TASK_STATES = {"MOOR__TASK_FREE": 0, "MOOR__TASK_IDLE": 1, "MOOR__TASK_SCHEDULED": 2,
                "MOOR__TASK_RUNNING": 3, "MOOR__TASK_NOTIFIED": 4}
_FIBER_STATES = {"MOOR__FIBER_FREE": 0, "MOOR__FIBER_LIVE": 1, "MOOR__FIBER_DONE": 2}

# The saved block: register name and offset from fctx; the stack pointer is fctx + 0x40.
_X86_64_SAVED = (("r12", 0x08), ("r13", 0x10), ("r14", 0x18), ("r15", 0x20),
                 ("rbx", 0x28), ("rbp", 0x30), ("rip", 0x38))
_X86_64_FRAME_SIZE = 0x40

# A list longer than this is taken to be corrupt (no process has this many fibers per thread).
_LIST_MAX = 1 << 24


class MoorError(Exception):
    """A condition the commands report in one line, without a Python traceback."""


def _arch_name():
    try:
        return gdb.selected_inferior().architecture().name()
    except (gdb.error, AttributeError):
        return gdb.newest_frame().architecture().name()


def _lookup_type(name):
    try:
        return gdb.lookup_type(name)
    except gdb.error:
        raise MoorError("no type '%s' in the debug info: is the program built with moor and -g?"
                        % name) from None


def _enum_values(type_name, fallback):
    values = dict(fallback)
    try:
        values.update((f.name, int(f.enumval)) for f in gdb.lookup_type(type_name).fields())
    except gdb.error:
        pass
    return values


def _field_offset(struct_type, name):
    for f in struct_type.fields():
        if f.name == name:
            return f.bitpos // 8
    raise MoorError("%s has no field '%s': this script does not match the program's moor"
                    % (struct_type, name))


_resume_ret = []


def _forget_resume_ret(event=None):
    """A new run, process, core or program: moor__resume_ret may be elsewhere now."""
    del _resume_ret[:]


for _event in ("new_objfile", "clear_objfiles", "exited", "new_inferior"):
    if hasattr(gdb.events, _event):
        getattr(gdb.events, _event).connect(_forget_resume_ret)


def _resume_ret_address():
    """Where moor__resume_ret is: a context's `resume` holds it once the context has run.
    Looked up once per program load (see _forget_resume_ret), not once per fiber."""
    if not _resume_ret:
        try:
            _resume_ret.append(int(gdb.parse_and_eval("(long)&moor__resume_ret")))
        except gdb.error:
            raise MoorError("no symbol moor__resume_ret: the program is not linked with this "
                            "moor, or has no symbols")
    return _resume_ret[0]


def _has_field(value, name):
    return any(f.name == name for f in value.type.strip_typedefs().fields())


def _c_string(value):
    """A char array or char * as a Python string ('' if unreadable)."""
    try:
        if value.type.strip_typedefs().code == gdb.TYPE_CODE_ARRAY:
            value = value[0].address
        if int(value) == 0:
            return ""
        return value.string(errors="replace")
    except gdb.error:
        return "<unreadable>"


class Fiber:
    """One fiber control block, read from the inferior."""

    def __init__(self, thread, ex, value, states):
        self.thread = thread
        self.ex = ex
        self.value = value
        self.addr = int(value.address)
        self.id = int(value["id"])
        name = _c_string(value["name"])
        self.name = name if name else "fiber"  # moor_fiber_name's default
        ctx = value["ctx"]
        self.fctx = int(ctx["fctx"])
        # A context runs its entry at its first switch, moor__resume_ret at every later one.
        self.started = int(ctx["resume"]) == _resume_ret_address()
        # The usable stack: from above the guard at the mapping's base up to this block.
        self.stack_lo = int(value["stack_base"]) + int(ex["pool"]["guard"])
        self.stack_size = self.addr - self.stack_lo if self.stack_lo < self.addr else 0
        self.state = self._state(states)

    def _state(self, states):
        task_states, fiber_states = states
        v = self.value
        if self.id == 0 and self.fctx == 0 and int(v["state"]) == 0:
            # Ids start at 1: the block reads as zeros. In a core, the mapping was not saved
            # (gdb's gcore gives up on a mapping with MADV_GUARD_INSTALL guards in it).
            return "missing"
        if int(v["state"]) == fiber_states["MOOR__FIBER_DONE"]:
            return "done"
        if self.addr == int(self.ex["current"]):
            return "running"
        if _has_field(v, "remote") and int(v["remote"]):
            return "ready"  # spawned from another thread, queued to start
        task = int(v["task"]["state"])
        if task in (task_states["MOOR__TASK_SCHEDULED"], task_states["MOOR__TASK_NOTIFIED"]):
            return "ready"
        if task == task_states["MOOR__TASK_IDLE"]:
            return "waiting"
        if int(v["state"]) == fiber_states["MOOR__FIBER_FREE"]:
            return "free?"  # released fibers are not listed: a corrupt list
        return "task-state-%d?" % task

    def has_frames(self):
        """Whether the fiber waits in a switch with its registers saved."""
        return self.state in ("ready", "waiting") and self.started and self.fctx != 0

    def stack_text(self):
        """The range frames may occupy (from the lowest usable byte up to the control block)
        and the usable size the fiber was given (moor__fiber_stack_size)."""
        if not self.stack_lo or not self.stack_size:
            return "-"
        size = self.stack_size
        try:
            size = int(self.value["map_size"]) - int(self.ex["stack_overhead"])
        except gdb.error:
            pass
        return "0x%x-0x%x %d KiB" % (self.stack_lo, self.stack_lo + self.stack_size, size // 1024)

    def wait_text(self):
        """What the fiber waits on, where moor records it: the future a waiting fiber
        suspended on (its task's fut, when the task also has the wait stamp `since`) by its
        ops label, and how long ago (the executor's cached clock `now` less `since`, 32 bits
        of ms); and any field of the control block named wait* (strings, labelled structs,
        plain values). Empty if this moor records nothing."""
        parts = []
        task = self.value["task"]
        if self.state == "waiting" and _has_field(task, "since"):
            fut = task["fut"]
            if int(fut) != 0:
                label = ""
                try:
                    ops = fut.dereference()["ops"]
                    if int(ops) != 0 and _has_field(ops.dereference(), "label"):
                        label = _c_string(ops.dereference()["label"])
                except gdb.error:
                    pass
                parts.append("%s (future 0x%x)" % (label or "?", int(fut)))
            if _has_field(self.ex.dereference(), "now"):
                waited = (int(self.ex["now"]) - int(task["since"])) & 0xffffffff
                parts.append("for %d ms" % waited)
        for f in self.value.type.strip_typedefs().fields():
            if not f.name or "wait" not in f.name:
                continue
            try:
                value = self.value[f.name]
                text = _describe(value)
            except gdb.error:
                continue
            if text in ("", "0", "0x0"):
                continue  # not set: nothing to say
            code = value.type.strip_typedefs().code
            if code in (gdb.TYPE_CODE_INT, gdb.TYPE_CODE_ENUM, gdb.TYPE_CODE_BOOL):
                text = "%s=%s" % (f.name, text)
            parts.append(text)
        return " ".join(parts)


def _describe(value, depth=0):
    """A compact text for a wait description of unknown shape: strings as text, a struct as
    its non-zero fields (a field named label, what, kind, name or desc as bare text), a
    pointer to a struct followed once; anything deeper as its address."""
    t = value.type.strip_typedefs()
    if t.code == gdb.TYPE_CODE_ARRAY and t.target().sizeof == 1:
        return _c_string(value)
    if t.code == gdb.TYPE_CODE_PTR:
        if int(value) == 0:
            return ""
        target = t.target().strip_typedefs()
        if target.sizeof == 1 and target.code == gdb.TYPE_CODE_INT:
            return _c_string(value)
        if target.code == gdb.TYPE_CODE_STRUCT and depth == 0:
            return _describe(value.dereference(), depth + 1)
        return "0x%x" % int(value)
    if t.code == gdb.TYPE_CODE_STRUCT:
        if depth > 1:
            return "{...}"
        texts = []
        for f in t.fields():
            if not f.name or f.is_base_class:
                continue
            sub = _describe(value[f.name], depth + 1)
            if sub not in ("", "0", "0x0"):
                texts.append(sub if f.name in ("label", "what", "kind", "name", "desc")
                             else "%s=%s" % (f.name, sub))
        return " ".join(texts)
    if t.code in (gdb.TYPE_CODE_INT, gdb.TYPE_CODE_BOOL):
        return str(int(value))  # a uint8_t prints as a character otherwise
    return str(value)


class Executor:
    """A thread's executor (moor__tls_executor) and its fibers."""

    def __init__(self, thread, value):
        self.thread = thread
        self.value = value  # moor_executor *
        self.addr = int(value)
        self.alive = int(value["alive"]) != 0 if _has_field(value.dereference(), "alive") else True

    def fibers(self, states):
        """(fibers sorted by id, note): the note says where and why the list walk stopped
        early, if it did."""
        fiber_type = _lookup_type("struct moor_fiber")
        link_off = _field_offset(fiber_type, "link")
        char_ptr = gdb.lookup_type("char").pointer()
        fiber_ptr = fiber_type.pointer()
        out, seen, note = [], set(), ""
        node = self.value["fibers"]["head"]
        while int(node) != 0:
            if int(node) in seen or len(seen) > _LIST_MAX:
                note = "the fiber list loops at 0x%x: corrupt memory" % int(node)
                break
            seen.add(int(node))
            f = (node.cast(char_ptr) - link_off).cast(fiber_ptr).dereference()
            try:
                fiber = Fiber(self.thread, self.value, f, states)
                out.append(fiber)
                if fiber.state == "missing":
                    # Its link reads as zeros too: the fibers after it cannot be found.
                    note = ("fiber memory reads as zeros from 0x%x on (a core without the "
                            "stack mappings: see DEBUGGING.md)" % fiber.addr)
                    break
                node = node["next"]
            except gdb.MemoryError as e:
                note = "the fiber list is cut at 0x%x: %s" % (int(node), e)
                break
        out.sort(key=lambda fib: fib.id)
        return out, note


def _states():
    return (_enum_values("enum moor__task_state", _TASK_STATES),
            _enum_values("enum moor__fiber_state", _FIBER_STATES))


class _Selection:
    """Restores the selected thread and frame when a command is done with other threads."""

    def __enter__(self):
        self.thread = gdb.selected_thread()
        try:
            self.frame = gdb.selected_frame()
        except gdb.error:
            self.frame = None
        return self

    def __exit__(self, *exc):
        if self.thread is not None and self.thread.is_valid():
            self.thread.switch()
            if self.frame is not None and self.frame.is_valid():
                self.frame.select()
        return False


def _executors():
    """[(thread, Executor or None, note)] for every thread of the selected inferior."""
    inferior = gdb.selected_inferior()
    if inferior.pid == 0 and not inferior.threads():
        raise MoorError("no process: run the program, attach to it, or load a core")
    if gdb.lookup_global_symbol("moor__tls_executor") is None and \
            gdb.lookup_static_symbol("moor__tls_executor") is None:
        raise MoorError("no symbol moor__tls_executor: the program is not linked with moor, "
                        "or has no debug info for it")
    _lookup_type("struct moor_executor")
    out = []
    with _Selection():
        for thread in sorted(inferior.threads(), key=lambda t: t.num):
            thread.switch()
            try:
                value = gdb.parse_and_eval("moor__tls_executor")
            except gdb.error as e:
                out.append((thread, None, "cannot read moor__tls_executor: %s" % e))
                continue
            if int(value) == 0:
                out.append((thread, None, "no executor"))
                continue
            try:
                ex = Executor(thread, value)
            except gdb.MemoryError:
                out.append((thread, None, "executor 0x%x is unreadable" % int(value)))
                continue
            if not ex.alive:
                out.append((thread, None, "executor 0x%x has been freed" % ex.addr))
                continue
            out.append((thread, ex, ""))
    return out


def _all_fibers():
    states = _states()
    rows = []
    for thread, ex, note in _executors():
        fibers = []
        if ex is not None:
            try:
                fibers, note = ex.fibers(states)
            except gdb.MemoryError as e:
                note = "unreadable executor (%s)" % e
        rows.append((thread, ex, note, fibers))
    return rows


def _thread_text(thread):
    name = thread.name or ""
    return '%d "%s"' % (thread.num, name) if name else "%d" % thread.num


# ---- the unwinder -----------------------------------------------------------------------------

class _FrameId:
    """What create_unwind_info takes (gdb.unwinder.FrameId only exists from gdb 14)."""

    def __init__(self, sp, pc):
        self.sp = sp
        self.pc = pc


class FiberUnwinder(gdb.unwinder.Unwinder):
    """While `moor bt` runs: the thread's innermost real frame (matched by pc and sp) gets the
    fiber's frame where it switched as its caller. Claims nothing otherwise."""

    def __init__(self):
        super().__init__("moor-fiber")
        self.target = None  # (pc, sp, {register: value}) while a backtrace is taken
        self.claimed_level = None

    def __call__(self, pending):
        target = self.target
        if target is None or pending.level() > 16:
            return None
        pc, sp, regs = target
        if int(pending.read_register("rip")) != pc or int(pending.read_register("rsp")) != sp:
            return None
        # The frame's id is built on stack address 0. gdb refuses a caller whose frame is
        # "inner" (below on the stack) to its callee's, and the fiber's stack may lie anywhere
        # relative to the thread's: nothing is below 0.
        info = pending.create_unwind_info(_FrameId(gdb.Value(0).cast(
            pending.read_register("rsp").type), pending.read_register("rip")))
        for name, value in regs.items():
            info.add_saved_register(name, gdb.Value(value).cast(
                pending.read_register(name).type))
        self.claimed_level = pending.level()
        return info


_unwinder = FiberUnwinder()


def _install_unwinder():
    # replace: sourcing the script again swaps the old unwinder (same name) for this one.
    gdb.unwinder.register_unwinder(None, _unwinder, replace=True)


def arch_error(arch):
    """Why moor bt cannot unwind fibers on arch, or None: it reads the block Boost's fcontext
    saves on x86-64 only."""
    if arch == "i386:x86-64":
        return None
    return ("moor bt: not supported on %s (moor-gdb.py knows the registers Boost's fcontext "
            "saves on x86-64 only)" % arch)


def _saved_registers(fiber):
    inferior = gdb.selected_inferior()
    block = bytes(inferior.read_memory(fiber.fctx, _X86_64_FRAME_SIZE))
    regs = {name: int.from_bytes(block[off:off + 8], "little") for name, off in _X86_64_SAVED}
    regs["rsp"] = fiber.fctx + _X86_64_FRAME_SIZE
    return regs


_FRAME_LINE = re.compile(r"^#(\d+)\s+")
# A fiber's outermost frame: moor's entry function (executor.c). Below it gdb would go on into
# the start frame make_fcontext built and whatever lies above it in the mapping.
_ENTRY_FRAME = re.compile(r"^#\d+\s+(?:0x[0-9a-f]+ in )?fiber_entry \(")


def _renumber(text, skip):
    """A backtrace's lines without frames #0..#skip-1, numbered from #0 again, and without the
    frames below the fiber's entry."""
    out, keep, at_entry = [], False, False
    for line in text.splitlines():
        m = _FRAME_LINE.match(line)
        if m:
            if at_entry:
                break
            level = int(m.group(1))
            keep = level >= skip
            at_entry = keep and _ENTRY_FRAME.match(line) is not None
            if keep and skip:
                line = "#%-3d%s" % (level - skip, line[m.end():])
        elif line.startswith("(More stack frames follow") or line.startswith("Backtrace "):
            keep = True
        if keep:
            out.append(line)
    return "\n".join(out)


def _fiber_backtrace(fiber, bt_args):
    """gdb's own backtrace of a suspended fiber, as text, numbered from #0."""
    error = arch_error(_arch_name())
    if error:
        raise MoorError(error)
    regs = _saved_registers(fiber)
    fiber.thread.switch()
    frame = gdb.newest_frame()
    pc = int(frame.read_register("rip"))
    sp = int(frame.read_register("rsp"))
    _unwinder.target = (pc, sp, regs)
    _unwinder.claimed_level = None
    gdb.invalidate_cached_frames()
    try:
        text = gdb.execute("backtrace " + bt_args, to_string=True)
    finally:
        _unwinder.target = None
        gdb.invalidate_cached_frames()
    if _unwinder.claimed_level is None:
        raise MoorError("could not unwind fiber %d: the thread's innermost frame was not found"
                        % fiber.id)
    return _renumber(text, _unwinder.claimed_level + 1)


def _thread_backtrace(thread, bt_args):
    thread.switch()
    return _renumber(gdb.execute("backtrace " + bt_args, to_string=True), 0)


def _fiber_header(fiber):
    if fiber.state == "missing":
        return "fiber at 0x%x (missing) of executor 0x%x, thread %s" % (
            fiber.addr, int(fiber.ex), _thread_text(fiber.thread))
    return 'fiber %d "%s" (%s) of executor 0x%x, thread %s' % (
        fiber.id, fiber.name, fiber.state, int(fiber.ex), _thread_text(fiber.thread))


def _print_fiber_bt(fiber, bt_args):
    print(_fiber_header(fiber) + ":")
    if fiber.state == "running":
        print("(running: this is the backtrace of its thread)")
        print(_thread_backtrace(fiber.thread, bt_args))
    elif fiber.state == "missing":
        print("(its memory reads as zeros: not in the core)")
    elif fiber.state == "done":
        print("(its function has returned, result %d: no frames)" % int(fiber.value["result"]))
    elif not fiber.started:
        print("(not started yet: it will start in %s)" % fiber.value["fn"])
    elif not fiber.has_frames():
        print("(no saved context to unwind)")
    else:
        try:
            print(_fiber_backtrace(fiber, bt_args))
        except gdb.MemoryError as e:
            print("(cannot read its saved registers at 0x%x: %s)" % (fiber.fctx, e))


# ---- commands ---------------------------------------------------------------------------------

class MoorPrefix(gdb.Command):
    """Commands for moor's fibers: moor fibers, moor bt ID|all."""

    def __init__(self):
        super().__init__("moor", gdb.COMMAND_STACK, gdb.COMPLETE_NONE, True)


class MoorFibers(gdb.Command):
    """List every fiber of every executor: thread, executor, id, name, state, stack.

States: running (the executor's current fiber), ready (on the run queue, or spawned and not
started), waiting (suspended until something wakes it), done (returned, not yet joined)."""

    def __init__(self, name="moor fibers"):
        super().__init__(name, gdb.COMMAND_STACK)

    def invoke(self, arg, from_tty):
        try:
            _list_fibers()
        except MoorError as e:
            raise gdb.GdbError(str(e)) from None


def _list_fibers():
    rows = _all_fibers()
    for thread, ex, note, fibers in rows:
        head = "thread %s" % _thread_text(thread)
        if ex is None:
            print("%s: %s" % (head, note))
            continue
        # With a note the walk stopped early: the count is of the fibers it reached.
        print("%s: executor 0x%x, %d fiber%s%s" % (head, ex.addr, len(fibers),
                                                 "" if len(fibers) == 1 else "s",
                                                 " read, " + note if note else ""))
        if not fibers:
            continue
        print("  %6s  %-18s  %-16s  %-8s  %s" % ("id", "fiber", "name", "state", "stack"))
        for f in fibers:
            if f.state == "missing":
                print("  %6s  0x%-16x  %-16s  %-8s  %s" % ("?", f.addr, "?", f.state, "-"))
                continue
            line = "  %6d  0x%-16x  %-16s  %-8s  %s" % (f.id, f.addr, f.name, f.state,
                                                      f.stack_text())
            if not f.started and f.state == "ready":
                line += "  not started"
            wait = f.wait_text()
            if wait:
                line += "  waits: " + wait
            print(line)
    if not any(ex is not None for _, ex, _, _ in rows):
        print("no executor in this process")


class MoorBt(gdb.Command):
    """Backtrace of a fiber: moor bt ID [bt options], or moor bt all.

ID is the fiber id `moor fibers` shows (ids are per executor: with several executors, give
it as THREAD.ID, the gdb thread number first). A suspended fiber's frames are unwound from the
registers it saved when it switched away; a running fiber's are its thread's."""

    def __init__(self):
        super().__init__("moor bt", gdb.COMMAND_STACK)

    def invoke(self, arg, from_tty):
        try:
            _backtrace(arg)
        except MoorError as e:
            raise gdb.GdbError(str(e)) from None


def _backtrace(arg):
    args = arg.split()
    if not args:
        raise MoorError("usage: moor bt ID|THREAD.ID|all [backtrace options]")
    which, bt_args = args[0], " ".join(args[1:])
    rows = _all_fibers()
    fibers = [f for _, _, _, fs in rows for f in fs]
    with _Selection():
        if which == "all":
            if not fibers:
                print("no fibers")
            for i, f in enumerate(fibers):
                if i:
                    print()
                _print_fiber_bt(f, bt_args)
            return
        m = re.fullmatch(r"(?:(\d+)\.)?(\d+)", which)
        if not m:
            raise MoorError("moor bt: '%s' is not a fiber id (ID, THREAD.ID or all)" % which)
        thread_num = int(m.group(1)) if m.group(1) else None
        fid = int(m.group(2))
        found = [f for f in fibers if f.id == fid and
                 (thread_num is None or f.thread.num == thread_num)]
        if not found:
            raise MoorError("moor bt: no fiber %s (see moor fibers)" % which)
        if len(found) > 1:
            raise MoorError("moor bt: fiber id %d is in several executors; give THREAD.ID "
                            "(threads %s)" % (fid, ", ".join(str(f.thread.num) for f in found)))
        _print_fiber_bt(found[0], bt_args)


MoorPrefix()
MoorFibers()
MoorFibers("info moor-fibers")
MoorBt()
_install_unwinder()
