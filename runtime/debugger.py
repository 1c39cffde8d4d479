"""A gdb session on one guest: where the run loop stops for the debugger, and what it may touch.

    debugger = Debugger(server, wait=True)      # server: gdbstub.GdbServer
    debugger.attach(vm)                         # before the run; vm.run.debugger is then set

The run loop (run.py) calls `pause_point` at every instruction boundary it
reaches outside an exit: between slices, after a single step, after a
breakpoint.  There the debugger polls the connection (a new client, a
Ctrl-C, a disconnect) and, when the guest is stopped, serves gdb's packets
until it resumes.  While a debugger may come, the guest runs in slices of
at most SLICE_INSNS instructions (`budget`), so a Ctrl-C is seen within
one slice without stopping Unicorn from another thread (run.py says why
not); a single step is a slice of one.  Stepping holds interrupts back, as
QEMU's gdb stub does by default: a step goes to the next instruction, not
into a handler; they are delivered when the guest continues.

Breakpoints are int3 patches (patches.py) at guest-physical addresses;
the exception hook asks `hit` first, so a breakpoint on an instruction the
runtime patched itself (a trapped `cli`, the interrupt window) stops the
guest, and the runtime's own exit runs when it goes on.  A breakpoint
outside text (gdb's return address when it calls a guest function) is
no patch: the guest's fetch from there faults, and `hit_fetch` turns the
fault into the stop.  The time spent
stopped does not count against --timeout.

What the debugger may change is what the guest could change itself
(debugregs.py for registers): memory it may write (never text, page
tables the hypervisor pinned, or hypervisor pages), breakpoints only on
instruction starts in pv and trap mode, and RIP only to those.  Reads see
all guest RAM, with the original bytes under every patch.

When the run ends while gdb waits for the guest, gdb hears why: the exit
status (`W`), or, after a fault, a stop with SIGSEGV that can be inspected
before the end is reported (`X`).
"""
from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from pvimage.validate import BUNDLE
from pvimage.sweep import code_ranges, decode

from . import debugregs
from .clock import SLICE_INSNS
from .debugregs import EXPEDITED, REGISTERS
from .errors import Refused
from .gdbstub import (SIGALRM, SIGINT, SIGKILL, SIGSEGV, SIGTRAP, SIGXCPU, Event, GdbServer, Resume,
                      StopReply)
from .machine import Stop
from .memory import PAGE, W, X

if TYPE_CHECKING:
    from .machine import Vm

EFAULT, EPERM, EINVAL = debugregs.EFAULT, debugregs.EPERM, debugregs.EINVAL
KILLED_STATUS = 137                      # 128 + SIGKILL, as a shell reports a killed process
END_SIGNALS = {"fault": SIGSEGV, "timeout": SIGALRM, "exit-limit": SIGXCPU, "interrupted": SIGINT, "killed": SIGKILL}


class Debugger:
    def __init__(self, server: GdbServer, wait: bool = False):
        self.server = server
        self.wait = wait                     # stop before the first instruction, for a client to come
        self.vm: Vm | None = None
        self.breakpoints: dict[int, int] = {}     # guest-virtual address -> guest-physical, in text
        self.fetch_stops: dict[int, int] = {}     # the same, elsewhere (never executable)
        self.stepping = False                # the guest runs one instruction, then stops
        self.pending: StopReply | None = None     # the guest stopped; gdb has not been told
        self._starts: frozenset[int] | None = None
        self._relocate: int | None = None         # where a stop at a fetch breakpoint puts RIP

    def attach(self, vm: Vm) -> None:
        self.vm = vm
        vm.run.debugger = self

    # -- the run loop's calls -------------------------------------------------------------
    def pause_point(self) -> None:
        """The guest is between instructions: stop it if there is a reason, and serve gdb while stopped."""
        if self.wait:
            self.wait = False
            self._paused(self.server.wait_for_client)
            self._stop(SIGTRAP)
        elif self.stepping:
            self.stepping = False
            self._stop(SIGTRAP)
        elif self.pending is None:
            match self.server.poll():
                case Event.ATTACHED:
                    self._stop(SIGTRAP)
                case Event.INTERRUPT:
                    self._stop(SIGINT)
                case Event.DETACHED:
                    self._release()
        if self.pending is not None:
            self._serve()

    def budget(self, count: int) -> int:
        """The instruction count for the next entry into the guest: one while stepping, and
        never unbounded, so the loop comes back to poll the connection."""
        return 1 if self.stepping else count or SLICE_INSNS

    def hit(self, address: int) -> bool:
        """The guest ran into an int3 at `address`: if it is a breakpoint, stop the guest on it."""
        if not self.breakpoints:
            return False
        if address not in self.breakpoints:
            try:
                if self.vm.mmu.translate(address) not in self.breakpoints.values():
                    return False
            except Refused:
                return False
        self.vm.cpu.jump(address)
        return self._stopped_on_breakpoint()

    def hit_fetch(self, pa: int) -> bool:
        """The guest tried to execute at guest-physical `pa`, which it cannot: stop it if that is
        a breakpoint.  Bundled code returns to the start of the return address's bundle, so in
        pv mode the breakpoint may lie in the bundle; the guest is then put on it (gdb knows a
        stop by its exact address)."""
        mask = ~(BUNDLE - 1) if self.vm.mode.name == "pv" else -1
        address = next((va for va, at in self.fetch_stops.items() if at & mask == pa), None)
        if address is None:
            return False
        self._relocate = address            # a memory hook cannot move RIP: the loop does
        return self._stopped_on_breakpoint()

    def _stopped_on_breakpoint(self) -> bool:
        self.stepping = False
        self.pending = StopReply("T", SIGTRAP, swbreak=True)
        self.vm.run.pause()
        return True

    def finished(self, stop: Stop) -> None:
        """The run is over: tell gdb how it ended (after a fault, let it look first)."""
        self._release()
        server = self.server
        if stop.kind == "shutdown":
            server.finish(StopReply("W", stop.status), stop.message)
            return
        signal, message = END_SIGNALS.get(stop.kind, SIGSEGV), stop.message
        if stop.kind == "fault" and server.client is not None and server.resumed:
            if server.serve(self, self._reply(signal), message) in (Resume.DETACH, Resume.KILL):
                server.close()
                return
            message = ""                     # told with the stop already
        server.finish(StopReply("X", signal), message)

    # -- stopping and going on -------------------------------------------------------------
    def _stop(self, signal: int) -> None:
        self.pending = StopReply("T", signal)

    def _serve(self) -> None:
        stop, self.pending = self.pending, None
        # Stopping in a hook can leave Unicorn a page fault on record (measured: after a breakpoint
        # in bare mode the guest's next #GP arrived as a #DF; tests/test_gdb.py, the system-call
        # backtrace); between instructions there is no exception in flight.
        self.vm.cpu.regs.clear_exception()
        if self._relocate is not None:
            self.vm.cpu.regs.rip, self._relocate = self._relocate, None
        stop.registers = self._reply(stop.code).registers
        resume = self._paused(self.server.serve, self, stop)
        run = self.vm.run
        match resume:
            case Resume.CONTINUE:
                run.paused = False
            case Resume.STEP:
                self.stepping = True
                run.paused = True            # no interrupt before the stepped instruction
            case Resume.DETACH:
                self._release()
                run.paused = False
            case Resume.KILL:
                self.vm.kill(Stop("killed", KILLED_STATUS, "killed by the debugger"))

    def _paused(self, wait, *args):
        """Wait for the debugger; the time waited does not count against the run's --timeout."""
        began = perf_counter()
        try:
            return wait(*args)
        finally:
            self.vm.run.deadline.postpone(perf_counter() - began)

    def _reply(self, signal: int) -> StopReply:
        regs = {n: debugregs.encode(REGISTERS[n], debugregs.read(self.vm, REGISTERS[n])) for n in EXPEDITED}
        return StopReply("T", signal, registers=regs)

    def _release(self) -> None:
        """No debugger any more: breakpoints out, the guest runs free."""
        for address in list(self.breakpoints) + list(self.fetch_stops):
            self.remove_breakpoint(address)
        self.stepping = False
        self.vm.run.paused = False

    # -- registers (gdbstub.Target) ---------------------------------------------------------
    def target_xml(self) -> str:
        return debugregs.target_xml()

    def read_registers(self) -> bytes:
        return b"".join(debugregs.encode(r, debugregs.read(self.vm, r)) for r in REGISTERS)

    def write_registers(self, data: bytes) -> None:
        if len(data) != sum(r.bits // 8 for r in REGISTERS):
            raise Refused(EINVAL, f"{len(data)} bytes of registers; the target description has "
                                  f"{sum(r.bits // 8 for r in REGISTERS)}")
        at = 0
        for reg in REGISTERS:
            size = reg.bits // 8
            debugregs.write(self.vm, reg, int.from_bytes(data[at:at + size], "little"), self.check_code)
            at += size

    def read_register(self, number: int) -> bytes:
        reg = self._register(number)
        return debugregs.encode(reg, debugregs.read(self.vm, reg))

    def write_register(self, number: int, data: bytes) -> None:
        reg = self._register(number)
        if len(data) != reg.bits // 8:
            raise Refused(EINVAL, f"{reg.name} takes {reg.bits // 8} bytes, not {len(data)}")
        debugregs.write(self.vm, reg, int.from_bytes(data, "little"), self.check_code)

    def set_pc(self, address: int) -> None:
        debugregs.write(self.vm, REGISTERS[debugregs.NUMBER["rip"]], address, self.check_code)

    def _register(self, number: int) -> debugregs.Reg:
        if not 0 <= number < len(REGISTERS):
            raise Refused(EINVAL, f"no register number {number}")
        return REGISTERS[number]

    # -- memory --------------------------------------------------------------------------
    def read_memory(self, address: int, size: int) -> bytes:
        """Guest memory by virtual address, as far as it is mapped (all RAM, patches undone)."""
        vm, out = self.vm, bytearray()
        try:
            for pa, n in self._pieces(address, size):
                out += vm.patches.original(pa, vm.mem.read(pa, n))
        except Refused as e:
            if not out:
                raise Refused(EFAULT, e.why) from None
        return bytes(out)

    def write_memory(self, address: int, data: bytes) -> None:
        """Store where the guest itself may store: never text, a pinned page table or hypervisor memory."""
        vm = self.vm
        pieces = list(self._pieces(address, len(data)))
        for pa, n in pieces:
            if vm.mem.perm[pa // PAGE] & X or not vm.mem.guest_can(pa, n, W):
                raise Refused(EPERM, f"guest address {address:#x} -> {vm.mem.describe(pa)} is not "
                                     f"writable by the guest")
        at = 0
        for pa, n in pieces:
            vm.mem.write(pa, data[at:at + n])
            at += n

    def _pieces(self, address: int, size: int):
        """(guest-physical address, length) page by page; Refused where the translation fails."""
        while size > 0:
            n = min(size, PAGE - (address & (PAGE - 1)))
            yield self.vm.mmu.translate(address), n
            address, size = address + n, size - n

    # -- breakpoints --------------------------------------------------------------------------
    def insert_breakpoint(self, address: int) -> None:
        """An int3 in text; elsewhere nothing is written: the guest cannot execute there, and its
        attempt stops it instead of faulting (`hit_fetch`; gdb calls functions that way, with
        the return address on the stack)."""
        if address in self.breakpoints or address in self.fetch_stops:
            return
        vm = self.vm
        try:
            pa = vm.mmu.translate(address)
        except Refused as e:
            raise Refused(EFAULT, e.why) from None
        if not vm.mem.perm[pa // PAGE] & X:
            self.fetch_stops[address] = pa
            return
        self.check_code(address, "breakpoint at")
        vm.patches.add_breakpoint(pa)
        self.breakpoints[address] = pa

    def remove_breakpoint(self, address: int) -> None:
        self.fetch_stops.pop(address, None)
        pa = self.breakpoints.pop(address, None)
        if pa is not None and pa not in self.breakpoints.values():
            self.vm.patches.remove_breakpoint(pa)

    def check_code(self, address: int, what: str) -> None:
        """Refused unless the guest may be sent to `address`: in pv and trap mode it must be an
        instruction start of the checked code (the validator's in pv, rule R8; the sweep's in
        trap mode), so no instruction hidden inside another can run.  Bare and hvm guests run
        their code as it is: anywhere goes."""
        vm = self.vm
        if vm.mode.name not in ("pv", "trap"):
            return
        try:
            pa = vm.mmu.translate(address)
        except Refused as e:
            raise Refused(EFAULT, f"{what} {address:#x}: {e.why}") from None
        if not self._instruction_start(pa):
            raise Refused(EPERM, f"{what} {address:#x}: not the start of an instruction the "
                                 f"{'validator' if vm.mode.name == 'pv' else 'sweep'} decoded")

    def _instruction_start(self, pa: int) -> bool:
        code = self.vm.image.code
        if code is not None:                 # pv: the validator's starts, and the hypercall stubs'
            return pa in code.starts or pa in code.resume_points or code.is_hypercall_entry(pa)
        if self._starts is None:             # trap: the linear sweep that placed the patches
            self._starts = frozenset(insn.address for address, data, bits in code_ranges(self.vm.image.info)
                                     for insn in decode(data, address, bits))
        return pa in self._starts
