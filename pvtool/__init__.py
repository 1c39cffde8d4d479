"""pvtool: a guest-kernel paravirtualization toolchain (compiler, PV pass, tools).

The stages, in pipeline order: parse, check, lower, paravirt, x86, link, elf;
`driver` runs them.  `abi` is the PV ABI shared with the hypervisor in `runtime/`.
"""
