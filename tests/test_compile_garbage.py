"""A compile leaves its data to reference counting.

pvtool.driver runs the stages with the cyclic collector paused; the first
collection after it walks whatever the compile made that is still tracked.
So the syntax tree, the IR and the object code must be freed by reference
counting: no reference cycle may hold a function's body (the symbol of a
function points at it, never back) or the DWARF entries.
"""
import gc
from pathlib import Path

import pytest

from pvtool import driver, parse

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


@pytest.mark.parametrize("name", ["mm.pvk", "tasks.pvk"])
def test_a_compile_leaves_little_cyclic_garbage(name):
    path = str(KERNELS / name)
    driver.compile_file(path, "pv")                 # imports and caches, not this test's business
    gc.collect()
    before = len(gc.get_objects())
    program = parse.parse_program(path)
    tree = len(gc.get_objects()) - before           # the tracked objects of the syntax tree alone
    del program
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        driver.compile_file(path, "pv")
        garbage = gc.collect()
    finally:
        if was_enabled:
            gc.enable()
    # What is left in cycles: recursive struct types, their DWARF entries, globals and their symbols.
    assert garbage < tree / 4, f"{garbage} objects in reference cycles after compiling {path} ({tree} in its tree)"
