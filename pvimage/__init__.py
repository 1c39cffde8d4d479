"""The PV image format: what the compiler, the tools and the runtime agree on.

    abi.py       the PV ABI: memory map, boot contract, notes, hypercalls, shared page, sites
    elfread.py   the one reader of ELF64 images: segments, notes, symbols, lines, sites
    sweep.py     which instructions are sensitive, and the sweep that finds them (native images)
    validate.py  the PV code rules R1-R7: the validator behind `pvtool check` and the loader
    ckit.py      generates the C kit's header and linker script from abi.py

It imports nothing from the compiler (`pvtool`) or the runtime (`runtime`).
"""
