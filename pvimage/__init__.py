"""The PV image format: what the compiler, the tools and the runtime agree on.

    abi.py       the PV ABI: memory map, boot contract, notes, hypercalls, shared page, sites
    elfread.py   the one reader of ELF64 images: segments, notes, symbols, lines, sites
    sweep.py     which instructions are sensitive, and the sweep that finds them

It imports nothing from the compiler (`pvtool`) or the runtime (`runtime`).
"""
