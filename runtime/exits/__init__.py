"""Exit handlers, one module per kind of exit (the run loop in run.py dispatches to them).

    hypercalls.py   pv: the hypercall page's `syscall`, one function per hypercall
    trapped.py      sensitive instructions that exit: emulated one function per instruction
    io.py           port I/O and cpuid reached through Unicorn's instruction hooks
    pagetables.py   stores that hit a write-protected page: live page-table writes
    faults.py       exceptions the guest raised, and how Unicorn's own stops are reported
"""
