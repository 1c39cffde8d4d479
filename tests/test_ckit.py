"""The C kit: generated files up to date, numbers agreeing with the ABI, and gcc guests built with it run."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import capstone
import pytest

from ckit.build import GUESTS, KIT, build, build_source, have_gcc
from pvimage import abi, ckit
from pvimage.elfread import load
from runtime.exits.hypercalls import HYPERCALLS
from runtime.hypervisor import run

ROOT = Path(__file__).resolve().parents[1]
needs_gcc = pytest.mark.skipif(not have_gcc(), reason="gcc is needed to build the C guests")


@pytest.mark.parametrize("what,path", [("header", KIT / "pvguest.h"), ("ldscript", KIT / "pvguest.ld")])
def test_committed_files_are_the_generators_output(what, path):
    done = subprocess.run([sys.executable, "-m", "pvimage.ckit", what], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert path.read_text() == done.stdout, f"{path} is stale: run python -m pvimage.ckit {what} > {path}"


def test_generator_usage_error():
    done = subprocess.run([sys.executable, "-m", "pvimage.ckit", "nonsense"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("usage:")


def test_header_numbers_are_the_abi_numbers():
    text = (KIT / "pvguest.h").read_text()
    defines = dict(re.findall(r"^#define (\w+) (0x[0-9a-f]+|\d+)(?:UL)?$", text, re.M))
    assert set(defines) == set(ckit.HEADER_NAMES)
    for name, value in defines.items():
        assert getattr(abi, name) == int(value, 0), name
    assert {f"HC_{n.upper()}" for n in abi.HYPERCALL_NAMES.values()} <= set(defines)


def test_hypercall_helpers_take_the_arguments_the_runtime_reads():
    text = (KIT / "pvguest.h").read_text()
    helpers = dict(re.findall(r"^static inline long hc_(\w+)\(([^)]*)\)", text, re.M))
    assert set(helpers) == set(abi.HYPERCALL_NAMES.values())
    for nr, call in HYPERCALLS.items():
        params = helpers[call.name]
        assert (0 if params == "void" else params.count(",") + 1) == call.arity, call.name


@needs_gcc
def test_linker_script_notes_are_what_elfread_reads():
    info = load(build("hello_pv").read_bytes())
    assert info.mode == "pv" and info.notes[abi.NOTE_ABI_VERSION] == abi.ABI_VERSION.to_bytes(4, "little")
    assert info.hypercall_page == info.function("hypercall_page").address
    assert info.hypercall_page % abi.PAGE_SIZE == 0
    text = info.executable[0]
    assert text.address == abi.LOAD_BASE and text.end == info.hypercall_page + abi.PAGE_SIZE
    assert not any(s.writable for s in info.executable)


# -- guests built with the kit ----------------------------------------------------------------

@needs_gcc
def test_hello_pv_builds_with_the_line_in_its_comment(tmp_path):
    text = (GUESTS / "hello_pv.c").read_text()
    block = text.split("Build (from the repository root):", 1)[1].split("* Check and run:", 1)[0]
    command = " ".join(line.strip(" *\\") for line in block.splitlines())
    command = command.replace("-o hello_pv.elf", f"-o {tmp_path / 'h.elf'}")
    subprocess.run(shlex.split(command), cwd=ROOT, check=True, capture_output=True)
    result = run((tmp_path / "h.elf").read_bytes(), timeout=10)
    assert (result.status, result.console) == (7, b"hello from a C paravirtual guest\n"
                                                   b"and hello through the virtual UART\n")


def _code(path: Path):
    info = load(path.read_bytes())
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    text = info.executable[0]
    code = text.data[:info.hypercall_page - text.address]
    return list(md.disasm_lite(code, text.address))


@needs_gcc
def test_bundle_macros_mask_returns_and_end_calls_on_a_bundle_boundary():
    insns = _code(build("pv_hostile"))
    mnemonics = [m for _, _, m, _ in insns]
    assert "ret" not in mnemonics and mnemonics.count("call") > 50
    for k, (address, size, mnemonic, operands) in enumerate(insns):
        if mnemonic == "call":
            assert (address + size) % 32 == 0, hex(address)
        if mnemonic == "jmp" and not operands.startswith("0x"):       # an indirect jump
            prev = insns[k - 1]
            assert prev[2] == "and" and prev[3] == f"{operands}, 0xffffffffffffffe0"
            assert prev[0] // 32 == address // 32
    starts = {address for address, *_ in insns}
    assert all(b in starts for b in range(insns[0][0], insns[-1][0], 32))   # no instruction crosses a bundle end


SSE_GUEST = """\
#define PVGUEST_MAIN
#include "pvguest.h"
__attribute__((noinline)) double mean(const double *v, int n) { double s = 0; for (int i = 0; i < n; i++) s += v[i]; return s / n; }
static volatile double data[4] = {1.5, 2.5, 3.5, 4.5};
long guest_main(const struct pv_start_info *si) { return (long)(mean((const double *)data, 4) * 10); }
"""

MASKED_CALL_GUEST = """\
#define PVGUEST_MAIN
#include "pvguest.h"
static volatile long hits;
__attribute__((noinline, aligned(32))) void bump(void) { hits += 20; }
long guest_main(const struct pv_start_info *si) { PV_CALL_MASKED(bump); PV_CALL_MASKED(bump); return hits + 2; }
"""


@needs_gcc
def test_sse_is_usable_at_entry():
    image = build_source("sse", SSE_GUEST)
    assert any("xmm" in ops for *_, ops in _code(image))
    assert run(image.read_bytes(), timeout=10).status == 30


@needs_gcc
def test_masked_call_through_a_pointer_returns():
    assert run(build_source("masked_call", MASKED_CALL_GUEST).read_bytes(), timeout=10).status == 42
