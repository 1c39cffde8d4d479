"""The reference hypervisor: runs pvtool images on a Unicorn x86-64 vCPU.

Entry point: `runtime.hypervisor.run(image_bytes, mode) -> RunResult`.

    loader.py      ELF image -> validated Image (segments, notes, the sensitive sweep)
    memory.py      guest RAM and its guest-physical page permissions
    mmu.py         guest page tables: translation, validation, live-table pinning
    vcpu.py        boot state, the run loop, exits and faults, CR/descriptor rules,
                   and the one place interrupts are delivered
    interrupts.py  IDT gates and interrupt frames (delivery, iretq, the iret hypercall)
    events.py      pv: the shared page's virtual IF and when an upcall must wait
    hypercalls.py  pv mode: the hypercall handlers and their dispatch
    trap.py        trap mode: trap-and-emulate of sensitive instructions
    devices/       UART, debug exit, PICs, PIT, CPUID, MSRs on an I/O-port bus
    clock.py       the deterministic virtual clock and its timers
    stats.py       exit counters and times
    gdbstub.py     the GDB remote protocol: packets and the one client (`pvtool run --gdb`)
    debugger.py    a gdb session's side of the run loop: stops, steps, breakpoints, memory
    debugregs.py   the registers as gdb numbers them, and what a debugger may write
    hypervisor.py  the Machine that puts these together, and run()
"""
