"""The reference hypervisor: runs pvtool images on a Unicorn x86-64 vCPU.

Entry point: `runtime.hypervisor.run(image_bytes, mode) -> RunResult`.

    loader.py      ELF image -> validated Image (segments, notes, the sensitive sweep)
    memory.py      guest RAM and its guest-physical page permissions
    mmu.py         guest page tables: translation, validation, live-table pinning
    vcpu.py        boot state, the run loop, exits and faults, CR/descriptor rules
    hypercalls.py  pv mode: the hypercall handlers and their dispatch
    trap.py        trap mode: trap-and-emulate of sensitive instructions
    devices/       UART, debug exit, PICs, CPUID, MSRs on an I/O-port bus
    clock.py       the deterministic virtual TSC
    stats.py       exit counters and times
    hypervisor.py  the Machine that puts these together, and run()
"""
