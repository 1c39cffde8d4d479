"""An independent check of every kernel's images: no sensitive instruction, and the PV code rules.

This file builds its own images (every kernel in kernels/, and the shared
conformance kernels when ../shared/conformance exists) for both targets
and disassembles them with its own capstone passes, written here and on
purpose sharing nothing with pvimage (sweep.py, validate.py):

- a linear sweep of every executable PT_LOAD segment, minus the hypercall
  page the image declares (PVTool note type 4; the hypervisor fills it),
  checked against the list below; it must flag every native image, or it
  proves nothing;
- for PV images, the code rules read independently: each 32-byte bundle
  decoded on its own into whole instructions, no `ret`, every register
  jmp/call right after `and reg, -32` in its bundle, no jmp/call through
  memory, every direct branch to an instruction start or a hypercall entry,
  the entry point at a bundle start.
"""
from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

import capstone
import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

import kernels
from pvtool import driver

PAGE = 4096
NOTE_OWNER = b"PVTool"
NOTE_HYPERCALL_PAGE = 4

# Instructions a deprivileged guest must not run: they fault outside ring 0,
# or run there but read or change state the hypervisor virtualizes.
PRIVILEGED = {
    "cli", "sti", "hlt", "in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd",
    "lgdt", "lidt", "lldt", "ltr", "lmsw", "clts", "invlpg", "invlpga", "invpcid", "invd", "wbinvd",
    "wbnoinvd", "rdmsr", "wrmsr", "rdpmc", "iret", "iretd", "iretq", "sysret", "sysretq", "sysexit",
    "swapgs", "rsm", "xsetbv", "monitor", "mwait", "clac", "stac", "vmxon", "vmxoff", "vmlaunch",
    "vmresume", "vmptrld", "vmclear", "vmread", "vmwrite", "vmrun", "vmload", "vmsave", "stgi", "clgi",
}
SENSITIVE_UNPRIVILEGED = {
    "pushf", "pushfd", "pushfq", "popf", "popfd", "popfq", "sgdt", "sidt", "sldt", "str", "smsw",
    "lar", "lsl", "verr", "verw", "lss", "lfs", "lgs", "cpuid", "rdtsc", "rdtscp",
    "ljmp", "lcall", "retf", "retfq", "lret", "wrfsbase", "wrgsbase",
}
CONTROL_OR_DEBUG = re.compile(r"\b[cd]r\d+\b")
SEGMENT_REGISTER = re.compile(r"(^|,\s*)(cs|ds|es|fs|gs|ss)\s*(,|$)")   # not a `fs:[...]` override


@dataclass(frozen=True)
class Hit:
    address: int
    text: str


def is_sensitive(mnemonic: str, operands: str, raw: bytes) -> bool:
    name = mnemonic.split()[-1]            # drop rep/lock prefixes
    if name in PRIVILEGED or name in SENSITIVE_UNPRIVILEGED:
        return True
    if name == "mov" and (CONTROL_OR_DEBUG.search(operands) or SEGMENT_REGISTER.search(operands)):
        return True
    if name in ("push", "pop") and SEGMENT_REGISTER.search(operands):
        return True
    if name in ("call", "jmp") and far_indirect(raw):
        return True
    return False


def far_indirect(raw: bytes) -> bool:
    """ff /3 (call far) or ff /5 (jmp far), after any prefixes."""
    i = 0
    while i < len(raw) - 1 and (raw[i] in (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x64, 0x65, 0x36)
                                or 0x40 <= raw[i] <= 0x4F):
        i += 1
    return raw[i] == 0xFF and i + 1 < len(raw) and (raw[i + 1] >> 3) & 7 in (3, 5)


def hypercall_page(elf: ELFFile) -> int | None:
    """The address in the PVTool note of type 4, read from the raw note segments."""
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_NOTE":
            continue
        data, off = seg.data(), 0
        while off + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            name = data[off + 12:off + 12 + namesz].rstrip(b"\0")
            desc_at = off + 12 + (namesz + 3 & ~3)
            if name == NOTE_OWNER and ntype == NOTE_HYPERCALL_PAGE:
                return struct.unpack_from("<Q", data, desc_at)[0]
            off = desc_at + (descsz + 3 & ~3)
    return None


def sweep(image: bytes) -> list[Hit]:
    """Every sensitive instruction in the executable segments, decoded linearly."""
    elf = ELFFile(io.BytesIO(image))
    skip = hypercall_page(elf)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    hits = []
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD" or not seg["p_flags"] & P_FLAGS.PF_X:
            continue
        hits += sweep_code(md, seg.data(), seg["p_vaddr"], skip)
    return hits


def sweep_code(md: capstone.Cs, code: bytes, base: int, skip: int | None) -> list[Hit]:
    """Decode [base, base+len) in runs; capstone stops at a byte it cannot
    decode, which is stepped over.  The page at `skip` is not decoded."""
    spans = [(0, len(code))]
    if skip is not None and base < skip + PAGE and skip < base + len(code):
        spans = [(0, max(skip - base, 0)), (min(skip + PAGE - base, len(code)), len(code))]
    hits = []
    for start, end in spans:
        off = start
        while off < end:
            for addr, size, mnemonic, operands in md.disasm_lite(code[off:end], base + off):
                if is_sensitive(mnemonic, operands, code[addr - base:addr - base + size]):
                    hits.append(Hit(addr, f"{mnemonic} {operands}".strip()))
                off = addr - base + size
            if off < end:      # capstone stopped early: not an instruction, step over a byte
                off += 1
    return hits


KERNELS = kernels.all_kernels()


@pytest.fixture(scope="module")
def images() -> dict[tuple[str, str], bytes]:
    """(kernel id, target) -> image, for every kernel and both targets."""
    return {(kernels.kernel_id(path), target): driver.compile_file(str(path), target)
            for path in KERNELS for target in driver.TARGETS}


def test_no_pv_image_has_a_sensitive_instruction(images):
    pv = {k: v for (k, target), v in images.items() if target == "pv"}
    assert len(pv) == len(KERNELS) >= 10
    dirty = {}
    for name, image in pv.items():
        hits = sweep(image)
        if hits:
            dirty[name] = [f"{h.address:#x}: {h.text}" for h in hits[:5]]
    assert not dirty, f"{len(dirty)} of {len(pv)} PV images have sensitive instructions: {dirty}"


def test_the_same_pass_flags_every_native_image(images):
    clean = [k for (k, target), image in images.items() if target == "native" and not sweep(image)]
    assert not clean, f"the sweep found nothing in these native images: {clean}"


def test_every_pv_image_obeys_the_code_rules(images):
    broken = {k: problems[:5] for (k, target), image in images.items()
              if target == "pv" and (problems := code_rule_problems(image))}
    assert not broken, f"{len(broken)} PV images break the code rules: {broken}"


@pytest.mark.skipif(not kernels.CONFORMANCE.is_dir(),
                    reason=f"no shared conformance kernels at {kernels.CONFORMANCE}: only kernels/ is checked")
def test_the_conformance_kernels_are_included():
    assert any(kernels.CONFORMANCE in path.parents for path in KERNELS)


# -- the code rules, read independently -----------------------------------------------------

BUNDLE = 32
HC_COUNT = 22          # hypercall entries at page + 32 * nr, nr < HC_COUNT (docs/abi.md; 20 and 21 came with user mode)
DIRECT = re.compile(r"^(j[a-z]+|call|loop[a-z]*)$")
REGISTER = re.compile(r"^r([a-d]x|[sd]i|[sb]p|\d+)$")
MASK = "0xffffffffffffffe0"


def code_rule_problems(image: bytes) -> list[str]:
    elf = ELFFile(io.BytesIO(image))
    page = hypercall_page(elf)
    if page is None:
        return ["no hypercall page"]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    starts: set[int] = set()
    pair_jumps: set[int] = set()
    branches: list[tuple[int, int]] = []
    problems = []
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD" or not seg["p_flags"] & P_FLAGS.PF_X:
            continue
        code, base = seg.data(), seg["p_vaddr"]
        code += bytes(-len(code) % BUNDLE)
        for at in range(0, len(code), BUNDLE):
            if page <= base + at < page + PAGE:
                continue
            problems += check_bundle(md, code[at:at + BUNDLE], base + at, starts, pair_jumps, branches)
    for source, target in branches:
        entry = target - page
        if 0 <= entry < HC_COUNT * 32 and entry % 32 == 0:
            continue
        if target not in starts or target in pair_jumps:
            problems.append(f"{source:#x}: branch to {target:#x}")
    if elf.header.e_entry % BUNDLE:
        problems.append(f"entry {elf.header.e_entry:#x} is not a bundle start")
    return problems


def check_bundle(md, bundle: bytes, address: int, starts: set[int], pair_jumps: set[int],
                 branches: list[tuple[int, int]]) -> list[str]:
    insns = list(md.disasm_lite(bundle, address))
    problems = []
    if sum(size for _, size, _, _ in insns) != BUNDLE:
        problems.append(f"{address:#x}: the bundle does not decode into whole instructions")
    for k, (at, size, mnemonic, operands) in enumerate(insns):
        starts.add(at)
        name = mnemonic.split()[-1]
        if name == "ret":
            problems.append(f"{at:#x}: ret")
        elif name in ("jmp", "call") and REGISTER.match(operands):
            if k == 0 or insns[k - 1][2:] != ("and", f"{operands}, {MASK}"):
                problems.append(f"{at:#x}: {name} {operands} without a mask")
            pair_jumps.add(at)
        elif name in ("jmp", "call") and not operands.startswith("0x"):
            problems.append(f"{at:#x}: {name} {operands}")
        elif DIRECT.match(name) and operands.startswith("0x"):
            branches.append((at, int(operands, 16)))
    return problems


def test_the_pass_knows_the_instructions_it_looks_for():
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    samples = {
        b"\xfa": True, b"\xee": True, b"\xec": True, b"\x0f\x22\xd8": True,   # cli, out, in, mov cr3, rax
        b"\x9c": True, b"\x0f\xa2": True, b"\x0f\x01\x38": True,               # pushfq, cpuid, invlpg [rax]
        b"\x8e\xd8": True, b"\x0f\xa0": True, b"\xff\x18": True,               # mov ds, ax; push fs; call far
        b"\x48\x89\xd8": False, b"\xf3\x90": False, b"\x0f\x05": False,        # mov rax, rbx; pause; syscall
        b"\xff\x10": False, b"\x64\x48\x8b\x04\x25\x00\x00\x00\x00": False,    # call [rax]; mov rax, fs:[0]
    }
    for code, flagged in samples.items():
        assert bool(sweep_code(md, code, 0x1000, None)) == flagged, code.hex()
    # the hypercall page is skipped, whatever it holds
    page = b"\x90" * 16 + b"\xfa" * PAGE + b"\xf4"
    assert [h.address for h in sweep_code(md, page, 0x1000, 0x1010)] == [0x1000 + 16 + PAGE]


def test_the_code_rule_pass_refuses_what_it_should(images):
    native = [image for (k, target), image in images.items() if target == "native"]
    assert all(code_rule_problems(image) for image in native)      # returns are plain `ret` there
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    nop = b"\x90"
    samples = {
        nop * 23 + bytes.fromhex("41 5b 49 83 e3 e0 41 ff e3"): [],                # pop r11; and; jmp r11
        nop * 30 + bytes.fromhex("ff e0"): ["jmp rax without a mask"],
        nop * 31 + bytes.fromhex("c3"): ["ret"],
        nop * 26 + bytes.fromhex("48 83 e3 e0 ff e0"): ["jmp rax without a mask"],  # and rbx
        nop * 30 + bytes.fromhex("ff 20"): ["jmp qword ptr [rax]"],
        nop * 30 + bytes.fromhex("b8 00"): ["the bundle does not decode into whole instructions"],
    }
    for bundle, expected in samples.items():
        problems = check_bundle(md, bundle, 0x1000, set(), set(), [])
        assert [p.split(": ", 1)[1] for p in problems] == expected, bundle.hex()
