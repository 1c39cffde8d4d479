"""The vCPU run loop: enter the guest, take its exits, end the run.

    Runner(vm, ...).run() -> Stop

The loop (`run`) delivers what is pending, enters the guest with
`emu_start`, and when that returns asks why (`_returned`): the guest
halted, a slice ran out, a hook asked for the loop, or time is up.

Guest code runs inside Unicorn; an *exit* is a Unicorn hook, and every hook
the runtime installs goes through one dispatch, `_handler`, a match over
the kinds of exit (`Exit`) that names each handler.  Unicorn calls the
exit gate (gate.py: native code that times the exit and checks the
control registers), the gate the hook's wrapper (`_hook`), which writes
the register file back and turns whatever the handler raises into the end
of the run through `Vm.kill`, the one path that stops a guest: `Shutdown`
(the guest asked), `GuestFault` (it did something it must not),
`ExitLimit`, even a bug in the hypervisor, so nothing a guest does can
take the hypervisor down.

Interrupts (the PIC's, raised by the PIT or the pv one-shot timer on the
virtual clock) reach the guest in one place, `deliver_events`: after every
exit, at every re-entry of the loop, and so after every `hlt`/`block`; the
mode decides whether the guest can take one (modes.py).  In a code or
exception hook, or the syscall hook, it acts at once; the in/out/cpuid and
memory hooks cannot redirect the guest, so those stop emulation and let
the loop deliver.

While a timer is armed or an interrupt waits, the guest runs in slices of
SLICE_INSNS instructions (Unicorn's instruction count), so one that
computes or spins without exits still sees time pass and takes its
interrupts.  Slices are counted, not timed: stopping Unicorn 2.1.4 from
another thread (emu_stop, or emu_start's own timeout) sometimes resumes it
one instruction early, running a read-modify-write of memory twice
(measured: tests/test_runtime_interrupts.py), so the only asynchronous
stop left is the one that ends a run at its timeout (`Watchdog`).
Counting costs guest code about four times its speed while slicing; it is
off whenever no timer is armed.

A debugger (debugger.py, when `pvtool run --gdb`) is the loop's guest:
the loop calls its `pause_point` at every instruction boundary outside an
exit, lets it bound every entry (`budget`: slices, or one instruction for
a step), and asks it first about every int3 and every fetch from a
page that cannot be executed (a breakpoint there, where gdb returns from
a function it calls itself).  While it holds the guest (`paused`), no
interrupt is delivered.
"""
from __future__ import annotations

from enum import Enum
from time import perf_counter
from typing import TYPE_CHECKING, Callable, TextIO

from unicorn import UC_ERR_INSN_INVALID, UC_MEM_FETCH_PROT, UcError

from . import delivery
from .clock import EXIT_NS, NEVER, SLICE_INSNS, SLICE_NS
from .cpu import CODE, FAULT, INSN, LOOP, SYSCALL, TRAP
from .engine import RIP_INDEX
from .errors import ExitLimit, GuestException, GuestFault, Refused, Shutdown, TimeUp
from .exits import faults, hypercalls, io, pagetables, trapped
from .gate import tsc
from .machine import Deadline, Stop, Vm
from .watchdog import Watchdog

if TYPE_CHECKING:
    from .debugger import Debugger

END = (1 << 64) - 1                 # emu_start's `until`: never reached (non-canonical)


class Exit(Enum):
    """The kinds of exit: each Unicorn hook the runtime installs is one of these."""
    SYSCALL = "syscall instruction"          # pv: a hypercall
    PORT_IN = "in instruction"
    PORT_OUT = "out instruction"
    CPUID = "cpuid instruction"
    EXCEPTION = "exception"                  # a breakpoint the runtime patched in, or the guest's own
    MEMORY = "invalid memory access"         # a write-protected page (a live table), or a real fault


# The register-file rules of each hook: can it redirect the guest, and what it returns when killed.
_HOOK_KIND = {Exit.SYSCALL: SYSCALL, Exit.PORT_IN: INSN, Exit.PORT_OUT: INSN, Exit.CPUID: INSN,
              Exit.EXCEPTION: TRAP, Exit.MEMORY: FAULT}
_ON_KILL = {Exit.PORT_IN: 0, Exit.CPUID: 1, Exit.MEMORY: False}
# How many arguments each hook passes its handler (Unicorn's, without its handle and the user data).
_ARITY = {Exit.SYSCALL: 0, Exit.CPUID: 0, Exit.EXCEPTION: 1, Exit.PORT_IN: 2, Exit.PORT_OUT: 3, Exit.MEMORY: 4}


def _handler(vm: Vm, kind: Exit) -> Callable:
    """The handler of each kind of exit, called as handler(vm, *the hook's arguments).
    Chosen once per run, when the hooks are installed: an exit pays for no choice."""
    match kind:
        case Exit.SYSCALL if vm.mode.name == "pv":
            return hypercalls.syscall_exit(vm)
        case Exit.SYSCALL:
            return faults.system_call
        case Exit.PORT_IN:
            return io.port_in
        case Exit.PORT_OUT:
            return io.port_out
        case Exit.CPUID:
            return io.cpuid
        case Exit.EXCEPTION:
            return _interrupt_exit(vm)
        case Exit.MEMORY:
            return pagetables.on_invalid_access if vm.run.debugger is None else _on_invalid_access_debugged


def _interrupt_exit(vm: Vm) -> Callable[[Vm, int], None]:
    """An int3 is one of the runtime's patches (a trapped instruction) or the guest's own; any
    other vector is the guest's exception."""
    live, gprs, on_exception = vm.patches.live, vm.cpu.regs.gprs, faults.exception_exit(vm)
    debugger = vm.run.debugger

    def on_interrupt(vm: Vm, vector: int):
        if vector == 3:
            if debugger is not None and debugger.hit(gprs[RIP_INDEX] - 1):   # RIP is past the int3
                return None                # under a debugger an int3 may be one of its breakpoints first
            patch = live.get(gprs[RIP_INDEX] - 1)
            if patch is not None:
                return trapped.on_patch(vm, patch)
        return on_exception(vm, vector)
    return on_interrupt


def _on_invalid_access_debugged(vm: Vm, access: int, address: int, size: int, value: int) -> bool:
    """Under a debugger a fetch from a page that cannot run may be one of its breakpoints."""
    if access == UC_MEM_FETCH_PROT and vm.run.debugger.hit_fetch(address):
        return False
    return pagetables.on_invalid_access(vm, access, address, size, value)


def _timed_out(timeout: float, where: str) -> Stop:
    return Stop("timeout", 124, f"timeout: guest still running after {timeout:g} s, at {where}")


class Runner:
    """The run loop and its state; `vm.run` is this, for the exit handlers."""

    def __init__(self, vm: Vm, deadline: Deadline, *, max_exits: int | None = None,
                 trace: TextIO | None = None, lenient_batches: bool = False):
        self.vm = vm
        self.deadline = deadline
        self.max_exits = max_exits
        self.trace = trace
        self.lenient_batches = lenient_batches
        self.wants_where = bool(trace) or vm.stats.profile    # exits must say where the guest was
        self.clock, self.stats = vm.clock, vm.stats
        self.exit_limit = 1 << 63 if max_exits is None else max_exits
        self.window: list | None = None       # bare: the interrupt window's patches while it is open
        self.hlt_sites: frozenset[int] = frozenset()   # bare: where the image's hlt instructions are
        self.bad_access: tuple[int, int, int] | None = None   # (access, guest-physical, size) of a failed access
        self._loop_wanted = False             # a hook stopped emulation to let the loop act
        self._step = False                    # run exactly one instruction next (the sti shadow ...)
        self._native: int | None = None       # ... the original one under the patch at this address
        self._pending_exception: GuestException | None = None   # raised where the guest could not be redirected
        self._told_pending = False            # the mode heard of a pending interrupt, not yet that none is
        self._sliced = False                  # the current emu_start is a time slice (counted instructions)
        self._budget = 0                      # its instruction count (0: unbounded)
        self._begin = 0                       # where it started
        self._debug_stop = False              # the debugger stopped it on a breakpoint
        self._exits_before = 0
        self._watchdog: Watchdog | None = None    # while the loop runs
        self.debugger: Debugger | None = None     # debugger.py, for `pvtool run --gdb`
        self.paused = False                   # the debugger holds the guest: deliver nothing
        self._enter = delivery.entering(vm)   # how an interrupt enters the guest

    # -- hooks --------------------------------------------------------------------------
    def install(self) -> None:
        """Hook the exits the mode takes through Unicorn, and patch the instructions that exit in it."""
        vm = self.vm
        engine, mode = vm.engine, vm.mode
        engine.hook_interrupt(*self._hook(Exit.EXCEPTION))
        engine.hook_invalid_memory(*self._hook(Exit.MEMORY))
        engine.hook_syscall(*self._hook(Exit.SYSCALL))
        if mode.port_hooks:                 # pv: direct port I/O or cpuid could only be hidden code: a fault
            engine.hook_in(*self._hook(Exit.PORT_IN))
            engine.hook_out(*self._hook(Exit.PORT_OUT))
            engine.hook_cpuid(*self._hook(Exit.CPUID))
        trapped.install(vm)
        vm.mem.on_rebuild = self._rebuilt
        # Unicorn runs an unpatched hlt itself and stops after it: the loop then idles the guest.
        self.hlt_sites = frozenset(f.address for f in vm.image.sensitive
                                   if f.mnemonic == "hlt" and f.address not in vm.patches.live)

    def _hook(self, kind: Exit) -> tuple[Callable, Callable]:
        """The wrapper every exit runs in, and what runs instead when the exit gate (gate.py) finds
        the control state changed.  Unicorn calls the gate, the gate calls these straight through
        ctypes with the hook's own arguments.  The gate times the exit and checks the control state
        where it can; the wrapper is kept lean: it is most of an exit's cost."""
        vm, cpu = self.vm, self.vm.cpu
        regs = cpu.regs
        hook_kind, on_kill, exit_like = _HOOK_KIND[kind], _ON_KILL.get(kind), kind is not Exit.MEMORY
        check = vm.mode.watches_control_state and not cpu.natively_checked
        handle, arity = _handler(vm, kind), _ARITY[kind]
        control, copied, after_exit, clock = regs.raw_control, not regs.live, self._after_exit, vm.clock
        master, slave = vm.pics.master, vm.pics.slave

        # the hook's own arguments come positionally: no tuple is built for them
        def hook(a=None, b=None, c=None, d=None):
            if vm.stop is not None:        # the run is over: Unicorn may still run an instruction or two
                return on_kill
            cpu.exit_kind = hook_kind
            try:
                if copied:
                    regs.begin_exit()
                if check and control() != cpu.expected:
                    cpu.check_control_state()
                if arity == 0:
                    result = handle(vm)
                elif arity == 1:
                    result = handle(vm, a)
                elif arity == 2:
                    result = handle(vm, a, b)
                elif arity == 3:
                    result = handle(vm, a, b, c)
                else:
                    result = handle(vm, a, b, c, d)
                # after_exit when a request is latched (it asks whether one can be taken), one was
                # announced, or a timer wants slices; else nothing to do: the common case, tested first
                if (master.irr | slave.irr or self._told_pending
                        or not self._sliced and clock.next_deadline != NEVER) and (
                        vm.stop is None and not self.paused and (exit_like or result)):
                    after_exit()
                return result
            except GuestException as e:
                self._guest_exception(e)
                return on_kill
            except BaseException as e:
                self._end(e)
                return on_kill
            finally:
                if copied:
                    regs.finish()
                cpu.exit_kind = LOOP

        def changed(*_args):
            if vm.stop is not None:
                return on_kill
            try:
                cpu.check_control_state()
            except BaseException as e:
                self._end(e)
                return on_kill
            self._end(AssertionError("the exit gate and the hypervisor disagree on the control state"))
            return on_kill
        return hook, changed

    def _end(self, e: BaseException) -> None:
        """The one place an exception from an exit becomes the end of the run."""
        vm = self.vm
        match e:
            case Shutdown():
                vm.kill(Stop("shutdown", e.status))
            case GuestFault():
                vm.kill(self.fault(e))
            case ExitLimit():
                vm.kill(Stop("exit-limit", 124, f"stopped after {self.max_exits} exits (--max-exits)"))
            case TimeUp():
                vm.kill(_timed_out(self.deadline.seconds, self.where(self._rip())))
            case KeyboardInterrupt():
                vm.kill(Stop("interrupted", 130, "interrupted"))
            case _:                   # a hypervisor bug must not crash the host either
                vm.kill(Stop("fault", 125, f"hypervisor internal error while handling an exit at "
                                           f"{self.where(self._rip())}: {type(e).__name__}: {e}"))

    def _guest_exception(self, exc: GuestException) -> None:
        """The guest's CPU raised `exc` during an exit: deliver it now if this hook can redirect
        the guest, else from the loop (registers put back first)."""
        if self.vm.cpu.exit_kind in (SYSCALL, TRAP):
            try:
                faults.take(self.vm, exc)
            except BaseException as e:
                self._end(e)
        else:
            self._pending_exception = exc
            self._want_loop()

    def _take_pending_exception(self) -> None:
        exc, self._pending_exception = self._pending_exception, None
        for name, value in exc.registers.items():
            self.vm.cpu.regs[name] = value
        faults.take(self.vm, exc)

    def safely(self, fn: Callable, *args) -> None:
        """Run `fn` outside any hook with the same protection as a hook."""
        cpu = self.vm.cpu
        cpu.exit_kind = LOOP
        try:
            cpu.regs.begin_exit()
            fn(*args)
        except BaseException as e:
            self._end(e)
        finally:
            cpu.regs.finish()

    # -- accounting ------------------------------------------------------------------------
    def count(self, reason: str, where: int | Callable[[Vm], int | None] | None = None) -> None:
        """Account one exit; every exit handler calls this first (`where`: the guest address, or how
        to find it, used only when tracing or profiling: `wants_where`).

        An exit costs the guest EXIT_NS of virtual time (clock.py)."""
        clock, stats = self.clock, self.stats
        clock.ticks = ticks = clock.ticks + EXIT_NS
        if ticks >= clock.next_deadline:
            clock.advance(0)
        if self.wants_where:
            self._account(reason, where)
        else:
            stats.current_reason = reason
            stats.exits[reason] += 1
            stats.total_exits += 1
        if stats.total_exits > self.exit_limit:
            raise ExitLimit()

    def _account(self, reason: str, where: int | Callable[[Vm], int | None] | None) -> None:
        """Count the exit where the guest was, and trace it."""
        stats = self.stats
        at = where(self.vm) if callable(where) else where
        stats.account(reason, at)
        if self.trace:
            place = self.where(at) if at is not None else "?"
            print(f"exit {stats.total_exits} [{self.clock.ticks / 1000:.3f} us]: {reason} at {place}",
                  file=self.trace)

    def where(self, address: int) -> str:
        return self.vm.image.describe(address)

    def fault(self, e: GuestFault) -> Stop:
        rip = self._rip() if e.rip is None else e.rip
        return Stop("fault", 125, f"guest fault: {e.what} at {self.where(rip)}")

    def _rip(self) -> int:
        try:
            return self.vm.cpu.rip
        except Exception:
            return 0

    # -- events ------------------------------------------------------------------------------
    def deliver_events(self) -> bool:
        """Deliver the PIC's pending interrupt if the guest can take it now; True if it did.

        The one place interrupts reach the guest: after every exit, at every
        slice end and re-entry, and so after every hlt or block.  Never
        while the guest's IF is clear: then the mode holds it (pv sets
        `upcall_pending`, bare opens the interrupt window)."""
        vm = self.vm
        mode, pics = vm.mode, vm.pics
        if not pics.pending():
            self._nothing_pending()
            return False
        self._told_pending = True
        if not mode.interrupts_enabled(vm):
            mode.held(vm)
            return False
        if not mode.may_deliver(vm):
            return False
        if not pics.pending():           # running the pv queue may have masked or acknowledged it
            self._nothing_pending()
            return False
        self._enter(pics.acknowledge(), mode.interrupt_kind)
        mode.delivered(vm)
        return True

    def _nothing_pending(self) -> None:
        """Tell the mode nothing is pending, once after it last heard otherwise (pv clears
        `upcall_pending`): checked after every exit, so the common case costs one test."""
        if self._told_pending:
            self._told_pending = False
            self.vm.mode.nothing_pending(self.vm)

    def _after_exit(self) -> None:
        """After every exit: deliver what is pending, or get the loop to; start slicing if needed."""
        vm = self.vm
        pending = vm.pics.pending()
        if not pending:                  # the common case first
            if self._told_pending and vm.cpu.exit_kind not in (INSN, FAULT) and not self._step:
                self._nothing_pending()
        elif vm.cpu.exit_kind in (INSN, FAULT):
            self._want_loop()
        elif not self._step:
            self.deliver_events()
        if not self._sliced and (self.clock.next_deadline != NEVER or pending and vm.pics.pending()):
            self._want_loop()

    def _rebuilt(self) -> None:
        """The memory map was rebuilt: Unicorn stops after the exit doing it, so the loop takes over."""
        if self.vm.cpu.exit_kind != LOOP:
            self._want_loop()

    def _want_loop(self) -> None:
        self._loop_wanted = True
        self.vm.engine.uc.emu_stop()

    def pause(self) -> None:
        """The debugger stopped the guest in a hook: deliver nothing, and get the loop to it."""
        self.paused = self._debug_stop = True
        self._want_loop()

    def shadow(self) -> None:
        """The instruction just emulated (sti) delays interrupts by one more instruction."""
        self._step = True
        self._want_loop()

    def step_original(self, address: int) -> None:
        """Run the instruction under the patch at `address` natively, once (the guest must be at it)."""
        self._native = address
        self._step = True
        self._want_loop()

    def halt(self, interrupts_enabled: bool) -> None:
        """hlt / the block hypercall: idle until an interrupt can be taken.

        Idling takes no host time: the virtual clock skips to the earliest
        timer deadline that will raise an interrupt the PIC can deliver, and
        the interrupt is then delivered by the caller's next step (the check
        after every exit, or the loop).  A pv guest whose events are masked
        returns at once if one is pending (`block` returns when an event is
        pending).  Nothing able to wake the guest is a fault."""
        vm = self.vm
        pending = vm.pics.pending()
        if not interrupts_enabled:
            if vm.mode.virtual_if and pending:
                return
            raise GuestFault("halted with interrupts disabled and nothing pending: blocked forever")
        if pending:
            return
        wake = min((t.deadline for t in vm.clock.armed() if vm.pics.can_deliver(t.irq)), default=None)
        if wake is None:
            raise GuestFault("blocked forever: halted waiting for an interrupt, but no timer is armed "
                             "on an unmasked interrupt line")
        vm.stats.idle_skips += 1
        vm.stats.idle_ns += vm.clock.skip_to(wake)

    # -- the run loop ------------------------------------------------------------------------
    def run(self) -> Stop:
        with Watchdog(self.vm.engine.uc, self.deadline) as self._watchdog:
            return self._loop()

    def _loop(self) -> Stop:
        vm = self.vm
        vm.cpu.regs.finish()               # whatever set-up read, the hooks start from a fresh copy
        while vm.stop is None:
            if self._pending_exception is not None:
                self.safely(self._take_pending_exception)
            if not self._step and vm.stop is None:
                if self.debugger is not None:
                    self.safely(self.debugger.pause_point)
                if vm.stop is None and not self.paused:
                    self.safely(self.deliver_events)
            if vm.stop is None:
                self._enter_guest()
        if self.debugger is not None:
            self.safely(self.debugger.finished, vm.stop)
        return vm.stop

    def _enter_guest(self) -> None:
        vm = self.vm
        left = self.deadline.left()
        if left is not None and left <= 0:
            vm.kill(_timed_out(self.deadline.seconds, self.where(vm.cpu.rip)))
            return
        step, native = self._step, self._native
        self._step, self._native = False, None
        self._sliced = not step and self._needs_slices()
        self.bad_access = None
        self._loop_wanted = self._debug_stop = False
        self._exits_before = vm.stats.total_exits
        count = 1 if step else SLICE_INSNS if self._sliced else 0
        if self.debugger is not None and not step:
            count = self.debugger.budget(count)
            self._sliced = self._sliced and count == SLICE_INSNS   # a debugger's step is no time slice
        self._budget = count
        if native is not None:
            patch = vm.patches.live[native]
            vm.patches.disarm(native)
        begin = self._begin = vm.cpu.rip
        vm.cpu.regs.finish()               # the guest changes its registers from here on
        gate = vm.engine.gate
        ticks = gate.ticks
        self._watchdog.sync()
        start, start_tsc = perf_counter(), tsc()
        try:
            vm.engine.emu_start(begin, END, count=count)      # the watchdog bounds it in time
        except UcError as e:
            if vm.stop is None and not self._debug_stop:
                vm.kill(self._unicorn_error(e))
        finally:
            seconds, spent = perf_counter() - start, tsc() - start_tsc
            vm.stats.run_seconds += seconds
            if spent > 0:                  # the exits' share of the counter, applied to the wall time
                vm.stats.hypervisor_seconds += seconds * min(1.0, (gate.ticks - ticks) / spent)
            vm.cpu.regs.clear_exception()      # a counted emu_start returns with a #PF "in flight" (unicorn 2.1.4)
            if native is not None:
                vm.patches.arm(patch)
                vm.cpu.remember_control_state()    # clts, lmsw ... change what the hypervisor watches
        if vm.stop is None and not step:
            self.safely(self._returned)

    def _needs_slices(self) -> bool:
        """Whether the guest must be stopped now and then even if it never exits: time can raise
        an interrupt (a timer is armed), or one waits for the guest (behind IF, or a batched site)."""
        return self.vm.clock.next_deadline != NEVER or self.vm.pics.pending()

    def _returned(self) -> None:
        """emu_start came back on its own: a hlt, the slice's or the run's end, or a hook's request."""
        vm = self.vm
        rip = vm.cpu.rip
        left = self.deadline.left()
        if left is not None and left <= 0:
            vm.kill(_timed_out(self.deadline.seconds, self.where(rip)))
        elif self._debug_stop:                 # the debugger stopped the guest on a breakpoint
            pass
        elif self._halted(rip):
            try:
                self.halt(vm.cpu.interrupt_flag)
            except GuestFault as e:
                raise GuestFault(e.what, rip - 1) from None
        elif self._loop_wanted:
            pass
        elif self._sliced:                     # the instruction count ran out
            vm.stats.slices += 1
            if vm.stats.total_exits == self._exits_before:    # exits already made time pass
                vm.clock.advance(SLICE_NS)
        elif not self._budget:                 # else the debugger's count ran out
            raise GuestFault("emulation stopped unexpectedly")

    def _halted(self, rip: int) -> bool:
        """Whether emu_start came back because the guest ran a hlt (RIP is just past it)."""
        if self._budget == 1:                  # a debugger's step: was its one instruction a hlt?
            return rip - 1 == self._begin and (rip - 1 in self.hlt_sites or self._after_hlt(rip))
        return rip - 1 in self.hlt_sites or not (self._budget or self._loop_wanted) and self._after_hlt(rip)

    def _after_hlt(self, rip: int) -> bool:
        try:
            return self.vm.mmu.read_virt(rip - 1, 1) == b"\xf4"
        except Refused:
            return False

    def _unicorn_error(self, e: UcError) -> Stop:
        if e.errno == UC_ERR_INSN_INVALID:
            return self.fault(GuestFault("invalid opcode (#UD)"))
        if self.bad_access is not None:
            return self.fault(GuestFault(faults.describe_access(self.vm, *self.bad_access)))
        return self.fault(GuestFault(f"unicorn stopped: {e}"))
