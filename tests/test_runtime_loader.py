"""The loader refuses every image it cannot run safely, with one line, before it runs."""
from __future__ import annotations

import struct

import pytest

from ckit.build import build, have_gcc
from pvimage import abi
from runtime.errors import ImageError
from runtime.hypervisor import run
from runtime.loader import hypercall_page_bytes, load_image

pytestmark = pytest.mark.skipif(not have_gcc(), reason="gcc is needed to build the test guests")
RAM = 64 << 20
PHDR = struct.Struct("<IIQQQQQQ")


@pytest.fixture(scope="module")
def pv() -> bytes:
    return build("hello_pv").read_bytes()


@pytest.fixture(scope="module")
def native() -> bytes:
    return build("native").read_bytes()


def phdrs(data: bytes) -> list[tuple[int, list[int]]]:
    """(offset, fields) of every program header."""
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    return [(phoff + k * PHDR.size, list(PHDR.unpack_from(data, phoff + k * PHDR.size))) for k in range(phnum)]


def patch_load(data: bytes, which: int, **fields) -> bytes:
    """Change fields (vaddr, paddr, filesz, memsz, flags) of the `which`-th PT_LOAD."""
    names = ["type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align"]
    out = bytearray(data)
    off, f = [p for p in phdrs(data) if p[1][0] == 1][which]
    for name, value in fields.items():
        f[names.index(name)] = value
    PHDR.pack_into(out, off, *f)
    return bytes(out)


def patch_note(data: bytes, ntype: int, desc: bytes, new_type: int | None = None) -> bytes:
    head = struct.pack("<III", 7, len(desc), ntype) + b"PVTool\0\0"
    at = data.find(head)
    assert at >= 0
    out = bytearray(data)
    if new_type is not None:
        out[at + 8:at + 12] = struct.pack("<I", new_type)
    out[at + len(head):at + len(head) + len(desc)] = desc
    return bytes(out)


def refused(data: bytes, ram: int = RAM) -> str:
    with pytest.raises(ImageError) as e:
        load_image(data, ram)
    message = str(e.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


def test_gcc_pv_image_loads_as_pv_with_what_the_validator_proved(pv):
    image = load_image(pv, RAM)
    assert image.mode == "pv" and image.sensitive == []
    assert image.hypercall_page % abi.PAGE_SIZE == 0 and image.code.hypercall_page == image.hypercall_page
    assert image.segments[0].address == abi.LOAD_BASE
    assert image.entry in image.code.starts and image.entry + 1 not in image.code.starts
    assert image.hypercall_page + 32 * abi.HC_SHUTDOWN + abi.HYPERCALL_RESUME in image.code.resume_points


def test_gcc_native_image_loads_with_its_sensitive_sites(native):
    image = load_image(native, RAM)
    assert image.mode == "native" and image.hypercall_page is None
    assert {"cli", "hlt", "out", "in", "rdmsr", "lgdt"} <= {f.mnemonic for f in image.sensitive}


def test_image_without_pvtool_note_is_native(native):
    image = load_image(native.replace(b"PVTool\0\0", b"Other\0\0\0"), RAM)
    assert image.mode == "native"


def test_pv_guest_that_lost_its_notes_is_refused_plainly(pv):
    message = refused(pv.replace(b"PVTool\0\0", b"Other\0\0\0"))
    assert "hypercall page" in message and "no PVTool notes" in message


@pytest.mark.parametrize("junk", [b"", b"\x7fEL", b"hello world" * 10, b"\x7fELF" + b"\0" * 60,
                                  b"\x7fELF\x01\x01\x01" + b"\0" * 100])
def test_junk_is_refused_in_one_line(junk):
    refused(junk)


def test_every_truncation_is_refused_in_one_line(pv):
    for size in (16, 63, 64, 100, 200, 0x1000, 0x1800, len(pv) - 1):
        refused(pv[:size])


def test_position_independent_image_refused(pv):
    data = bytearray(pv)
    data[16:18] = struct.pack("<H", 3)
    assert "ET_EXEC" in refused(bytes(data))


def test_segment_in_hypervisor_memory_refused(pv):
    assert "hypervisor memory" in refused(patch_load(pv, 1, vaddr=0x80000, paddr=0x80000))


def test_segment_beyond_ram_refused(pv):
    assert "does not fit" in refused(patch_load(pv, 1, memsz=RAM))
    assert "does not fit" in refused(pv, ram=1 << 20)


def test_virtual_and_physical_must_agree(pv):
    assert "identity" in refused(patch_load(pv, 1, paddr=0x200000))


def test_file_size_larger_than_memory_size_refused(pv):
    assert "exceeds memory size" in refused(patch_load(pv, 0, memsz=0x10))


def test_overlapping_segments_refused(pv):
    assert "overlap" in refused(patch_load(pv, 1, vaddr=0x101000, paddr=0x101000))


def test_entry_outside_text_refused(pv):
    data = bytearray(pv)
    data[24:32] = struct.pack("<Q", 0x102000)          # the read-only data segment
    assert "entry point" in refused(bytes(data))


def test_malformed_notes_refused(pv):
    assert "unknown mode" in refused(patch_note(pv, abi.NOTE_MODE, struct.pack("<I", 5)))
    assert "PV ABI version 1 is not supported" in refused(patch_note(pv, abi.NOTE_ABI_VERSION, struct.pack("<I", 1)))
    image = load_image(pv, RAM)
    page = struct.pack("<Q", image.hypercall_page)
    assert "rule R2" in refused(patch_note(pv, abi.NOTE_HYPERCALL_PAGE, struct.pack("<Q", image.hypercall_page + 8)))
    assert "not inside an executable segment" in refused(patch_note(pv, abi.NOTE_HYPERCALL_PAGE,
                                                                    struct.pack("<Q", 0x103000)))
    assert "no hypercall-page note" in refused(patch_note(pv, abi.NOTE_HYPERCALL_PAGE, page, new_type=99))
    assert "NUL" in refused(patch_note(pv, abi.NOTE_HYPERCALL_PAGE, b"c-guestX", new_type=abi.NOTE_GUEST_NAME))


def test_pv_image_with_a_sensitive_instruction_is_refused_before_it_runs():
    data = build("pv_hostile", ["-DWITH_CLI"]).read_bytes()
    message = refused(data)
    assert message.startswith("rule R4 (forbidden instruction): 'cli' at ") and "pv_hostile.c:" in message
    with pytest.raises(ImageError):
        run(data, timeout=5)


def test_mode_must_match_the_image(pv, native):
    for data, mode in ((pv, "bare"), (pv, "trap"), (native, "pv")):
        with pytest.raises(ImageError):
            run(data, mode=mode, timeout=5)
    with pytest.raises(ImageError):
        run(pv, mode="fast", timeout=5)


def test_hypercall_page_holds_a_stub_per_number_and_int3_elsewhere():
    page = hypercall_page_bytes()
    assert len(page) == abi.PAGE_SIZE
    for nr in range(abi.HC_COUNT):
        assert page[nr * 32:nr * 32 + 32] == abi.hypercall_stub(nr)
    assert set(page[abi.HC_COUNT * 32:]) == {0xCC}
