"""The linker and the ELF writer, on hand-made object code (no compiler needed)."""
from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings, strategies as st

from pvimage import abi
from pvtool import elfwrite as elf
from pvtool.dwarf import sleb, uleb
from pvtool.errors import InternalError
from pvtool.intrinsics import OP_NUMBERS
from pvtool.ir import Data, DataReloc
from pvtool.link import IMAGE_LIMIT, LinkError, link
from pvtool.obj import ABS32, ABS32S, ABS64, PC32, FunctionCode, LineRow, ObjectCode, Reloc, SiteRow
from pvtool.source import Loc

ROOT = Path(__file__).resolve().parents[1]
SRC = "kern/k.pvk"
LIB = "kern/lib/io.pvk"


def sample(target: str = "native") -> ObjectCode:
    """kmain calls helper and touches every relocation kind; helper does an outb."""
    kmain = FunctionCode("kmain", bytes.fromhex(
        "e8 00000000"              # call helper            (pc32)
        "48 b8 0000000000000000"   # mov rax, &msg          (abs64)
        "b8 00000000"              # mov eax, &msg          (abs32)
        "8b 04 25 00000000"        # mov eax, [ticks]       (abs32s)
        "b8 2a000000"              # mov eax, 42
        "c3"),                     # ret
        relocs=[Reloc(1, PC32, "helper", -4), Reloc(7, ABS64, "msg"), Reloc(16, ABS32, "msg", 1),
                Reloc(23, ABS32S, "ticks")],
        lines=[LineRow(0, Loc(SRC, 3, 5)), LineRow(5, Loc(SRC, 4, 5)), LineRow(15, Loc(SRC, 5, 9)),
               LineRow(27, Loc(SRC, 40, 1))],
        loc=Loc(SRC, 2, 1))
    helper = FunctionCode("helper", bytes.fromhex("66 ba f8 03 b0 41 ee c3"),   # mov dx; mov al; out; ret
                          lines=[LineRow(0, Loc(LIB, 7, 1))],
                          sites=[SiteRow(6, 1, "outb", Loc(LIB, 7, 5),
                                         "hypercall io_out" if target == "pv" else "",
                                         abi.SITE_HYPERCALL if target == "pv" else abi.SITE_NATIVE)],
                          loc=Loc(LIB, 6, 1))
    data = [Data("msg", "rodata", 4, 1, b"hey\0"),
            Data("ptr", "data", 16, 8, bytes(16), [DataReloc(8, "msg", 2)]),
            Data("ticks", "bss", 8, 8)]
    return ObjectCode([kmain, helper], data, [SRC, LIB], target=target, name="sample")


def build(obj: ObjectCode) -> tuple[object, ELFFile, bytes]:
    image = link(obj)
    blob = elf.write(image)
    return image, ELFFile(io.BytesIO(blob)), blob


@pytest.fixture(scope="module", params=["native", "pv"])
def built(request):
    return build(sample(request.param))


def symbols(ef: ELFFile) -> dict[str, object]:
    return {s.name: s for s in ef.get_section_by_name(".symtab").iter_symbols()}


def read(ef: ELFFile, addr: int, size: int) -> bytes:
    for seg in ef.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]:
            off = addr - seg["p_vaddr"]
            return seg.data()[off:off + size]
    raise AssertionError(f"{addr:#x} is not in a loaded segment")


# -- header, segments, sections ---------------------------------------------------

def test_header(built):
    image, ef, _ = built
    assert ef.elfclass == 64 and ef.little_endian
    assert ef["e_type"] == "ET_EXEC" and ef["e_machine"] == "EM_X86_64"
    assert ef["e_entry"] == symbols(ef)["_start"]["st_value"] == image.entry


def test_segments_are_wx_exclusive_and_page_aligned(built):
    _, ef, _ = built
    loads = [s for s in ef.iter_segments() if s["p_type"] == "PT_LOAD"]
    assert [s["p_flags"] for s in loads] == [5, 4, 6]          # R-X, R, RW
    for seg in loads:
        assert seg["p_align"] == 0x1000
        assert seg["p_offset"] % 0x1000 == seg["p_vaddr"] % 0x1000
        assert seg["p_vaddr"] == seg["p_paddr"] >= abi.LOAD_BASE
        assert seg["p_filesz"] <= seg["p_memsz"]
    ends = [(s["p_vaddr"], s["p_vaddr"] + s["p_memsz"]) for s in loads]
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))   # no overlap


def test_sections_sit_in_the_segment_with_their_permissions(built):
    _, ef, _ = built
    loads = [s for s in ef.iter_segments() if s["p_type"] == "PT_LOAD"]
    want = {".text": 5, ".rodata": 4, ".note.pvtool": 4, ".data": 6, ".bss": 6}
    for name, flags in want.items():
        sec = ef.get_section_by_name(name)
        homes = [s for s in loads if s.section_in_segment(sec)]
        assert len(homes) == 1 and homes[0]["p_flags"] == flags, name
    for name in (".pv.sites", ".debug_line", ".debug_info", ".symtab", ".strtab", ".shstrtab"):
        sec = ef.get_section_by_name(name)
        assert sec is not None and not sec["sh_flags"] & 2, name   # present, not allocated
    assert ef.get_section_by_name(".bss")["sh_type"] == "SHT_NOBITS"


def test_note_segment_covers_the_note_sections(built):
    image, ef, _ = built
    notes = [s for s in ef.iter_segments() if s["p_type"] == "PT_NOTE"]
    assert len(notes) == 1
    names = {s.name for s in ef.iter_sections() if s["sh_type"] == "SHT_NOTE"}
    assert names == ({".note.pvtool"} if image.target == "pv" else {".note.pvtool", ".note.xen"})
    secs = [s for s in ef.iter_sections() if s["sh_type"] == "SHT_NOTE"]
    assert notes[0]["p_offset"] == secs[0]["sh_offset"] and notes[0]["p_vaddr"] == secs[0]["sh_addr"]
    assert notes[0]["p_filesz"] == sum(s["sh_size"] for s in secs)
    owners = [n["n_name"] for n in notes[0].iter_notes()]
    assert owners == ["PVTool"] * (5 if image.target == "pv" else 4) + ([] if image.target == "pv" else ["Xen"])


# -- symbols ----------------------------------------------------------------------

def test_function_and_object_symbols(built):
    image, ef, _ = built
    syms = symbols(ef)
    funcs = {"kmain": 33, "helper": 8, "_start": None}
    if image.target == "native":
        funcs |= {"_start32": None, "_start64": None}
    else:
        funcs["__hypercall_page"] = 4096
    for name, size in funcs.items():
        s = syms[name]
        assert s["st_info"]["type"] == "STT_FUNC" and s["st_info"]["bind"] == "STB_GLOBAL"
        assert s["st_size"] == (size if size is not None else image.symbol(name).size) > 0
        assert ef.get_section(s["st_shndx"]).name == ".text"
    for name, size, section in [("msg", 4, ".rodata"), ("ptr", 16, ".data"), ("ticks", 8, ".bss")]:
        s = syms[name]
        assert s["st_info"]["type"] == "STT_OBJECT" and s["st_size"] == size
        assert ef.get_section(s["st_shndx"]).name == section
    files = [s.name for s in ef.get_section_by_name(".symtab").iter_symbols()
             if s["st_info"]["type"] == "STT_FILE"]
    assert files == [SRC, LIB]


def test_relocations_are_resolved(built):
    _, ef, _ = built
    syms = {n: s["st_value"] for n, s in symbols(ef).items()}
    code = read(ef, syms["kmain"], 33)
    assert struct.unpack_from("<i", code, 1)[0] == syms["helper"] - (syms["kmain"] + 5)
    assert struct.unpack_from("<Q", code, 7)[0] == syms["msg"]
    assert struct.unpack_from("<I", code, 16)[0] == syms["msg"] + 1
    assert struct.unpack_from("<i", code, 23)[0] == syms["ticks"]
    assert struct.unpack_from("<Q", read(ef, syms["ptr"], 16), 8)[0] == syms["msg"] + 2
    assert read(ef, syms["msg"], 4) == b"hey\0"


def test_bss_follows_the_boot_scratch_area(built):
    image, ef, _ = built
    syms = {n: s["st_value"] for n, s in symbols(ef).items()}
    assert syms["__boot_stack"] + 0x10000 <= syms["__bss_start"] <= syms["ticks"] < syms["__bss_end"]
    bss = ef.get_section_by_name(".bss")
    assert syms["__bss_end"] == bss["sh_addr"] + bss["sh_size"]
    if image.target == "native":
        for t in ("__boot_pml4", "__boot_pdpt", "__boot_pd"):
            assert syms[t] % 4096 == 0 and syms[t] < syms["__bss_start"]


# -- notes --------------------------------------------------------------------------

def raw_notes(ef: ELFFile) -> list[tuple[str, int, bytes]]:
    """(owner, type, desc) parsed by hand, so the check does not depend on pyelftools' naming."""
    out = []
    for sec in ef.iter_sections():
        if sec["sh_type"] != "SHT_NOTE":
            continue
        blob, off = sec.data(), 0
        while off < len(blob):
            namesz, descsz, kind = struct.unpack_from("<III", blob, off)
            off += 12
            name = blob[off:off + namesz].rstrip(b"\0").decode()
            off += (namesz + 3) & ~3
            out.append((name, kind, blob[off:off + descsz]))
            off += (descsz + 3) & ~3
    return out


def test_pvtool_notes(built):
    image, ef, _ = built
    notes = {(o, t): d for o, t, d in raw_notes(ef)}
    pv = image.target == "pv"
    u32 = lambda v: struct.pack("<I", v)
    assert notes[("PVTool", abi.NOTE_ABI_VERSION)] == u32(abi.ABI_VERSION)
    assert notes[("PVTool", abi.NOTE_MODE)] == u32(abi.MODE_PV if pv else abi.MODE_NATIVE)
    assert notes[("PVTool", abi.NOTE_FEATURES)] == u32(abi.FEATURE_MULTICALL | abi.FEATURE_EVENTS if pv else 0)
    assert notes[("PVTool", abi.NOTE_GUEST_NAME)] == b"sample\0"
    syms = symbols(ef)
    if pv:
        page = syms["__hypercall_page"]["st_value"]
        assert notes[("PVTool", abi.NOTE_HYPERCALL_PAGE)] == struct.pack("<Q", page)
        assert page % 4096 == 0 and read(ef, page, 4096) == b"\xcc" * 4096
        assert ("Xen", abi.XEN_ELFNOTE_PHYS32_ENTRY) not in notes
    else:
        assert notes[("Xen", abi.XEN_ELFNOTE_PHYS32_ENTRY)] == u32(syms["_start32"]["st_value"])
        assert ("PVTool", abi.NOTE_HYPERCALL_PAGE) not in notes and "__hypercall_page" not in syms


# -- .pv.sites -------------------------------------------------------------------------

def test_sites_round_trip(built):
    image, ef, _ = built
    sites = abi.unpack_sites(ef.get_section_by_name(".pv.sites").data())
    assert sites == image.sites and sites == sorted(sites, key=lambda s: s.address)
    helper = symbols(ef)["helper"]["st_value"]
    mine = [s for s in sites if s.file]
    assert len(mine) == 1
    s = mine[0]
    assert (s.address, s.length, s.op, s.file, s.line) == (helper + 6, 1, OP_NUMBERS["outb"], LIB, 7)
    assert s.rewritten == (image.target == "pv")
    assert read(ef, s.address, 1) == b"\xee"
    boot_sites = [t for t in sites if not t.file]
    assert all(t.line == 0 and not t.rewritten for t in boot_sites)
    if image.target == "pv":
        assert boot_sites == []
    else:
        ops = {t.op for t in boot_sites}
        assert {OP_NUMBERS[o] for o in ("outb", "hlt", "cli", "write_cr0", "write_cr3", "write_cr4",
                                        "wrmsr", "lgdt")} <= ops


# -- DWARF ------------------------------------------------------------------------------

def line_rows(ef: ELFFile) -> list[tuple[int, str, int, int]]:
    """(address, file path, line, column) of every non-end row, read back by pyelftools."""
    dw = ef.get_dwarf_info()
    rows = []
    for cu in dw.iter_CUs():
        prog = dw.line_program_for_CU(cu)
        header = prog.header
        dirs = [b""] + list(header["include_directory"])
        for e in prog.get_entries():
            st = e.state
            if st is None or st.end_sequence:
                continue
            fe = header["file_entry"][st.file - 1]
            d = dirs[fe.dir_index].decode()
            path = f"{d}/{fe.name.decode()}" if d else fe.name.decode()
            rows.append((st.address, path, st.line, st.column))
    return rows


def test_line_table_matches_rows(built):
    image, ef, _ = built
    syms = {n: s["st_value"] for n, s in symbols(ef).items()}
    k, h = syms["kmain"], syms["helper"]
    want = [(k, SRC, 3, 5), (k + 5, SRC, 4, 5), (k + 15, SRC, 5, 9), (k + 27, SRC, 40, 1), (h, LIB, 7, 1)]
    assert line_rows(ef) == want
    assert [(r.address, r.file, r.line, r.col) for r in image.lines] == want


def test_compile_unit_covers_text(built):
    _, ef, _ = built
    cu = next(ef.get_dwarf_info().iter_CUs())
    top = cu.get_top_DIE()
    text = ef.get_section_by_name(".text")
    assert top.tag == "DW_TAG_compile_unit"
    assert top.attributes["DW_AT_low_pc"].value == text["sh_addr"]
    assert top.attributes["DW_AT_high_pc"].value == text["sh_addr"] + text["sh_size"]
    subs = {d.attributes["DW_AT_name"].value: d for d in top.iter_children() if d.tag == "DW_TAG_subprogram"}
    assert set(subs) == {b"kmain", b"helper"}
    assert subs[b"kmain"].attributes["DW_AT_decl_line"].value == 2


def test_code_without_rows_is_not_charged_to_the_previous_function():
    kmain = FunctionCode("kmain", b"\x90\xc3", lines=[LineRow(0, Loc(SRC, 3, 1))], loc=Loc(SRC, 3, 1))
    swtch = FunctionCode("__pvk_swtch", b"\xc3")
    image = link(ObjectCode([kmain, swtch], [], [SRC]))
    rows = [(r.address, r.line) for r in image.lines]
    assert rows == [(image.symbol("kmain").addr, 3), (image.symbol("__pvk_swtch").addr, 0)]
    assert image.symbol("__pvk_swtch").kind == "func"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 5000), st.integers(0, 80)),
                min_size=1, max_size=30, unique_by=lambda t: t[0]))
def test_line_program_round_trips(rows):
    """Any rows (big and negative line steps, long address gaps) read back exactly."""
    rows = sorted(rows)
    code = b"\x90" * (rows[-1][0] + 1) + b"\xc3"
    fn = FunctionCode("kmain", code, lines=[LineRow(o, Loc(SRC, ln, c)) for o, ln, c in rows])
    if rows[0][0] != 0:
        fn.lines.insert(0, LineRow(0, Loc(LIB, 1, 0)))
    _, ef, _ = build(ObjectCode([fn], [], [SRC, LIB]))
    base = symbols(ef)["kmain"]["st_value"]
    expect = [(base + r.offset, r.loc.file, r.loc.line, r.loc.col) for r in fn.lines]
    assert line_rows(ef) == expect


# -- the binutils and gdb view --------------------------------------------------------------

def tool(*argv: str) -> str:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("elf") / "sample.elf"
    path.write_bytes(elf.write(link(sample())))
    return path


@pytest.mark.parametrize("target", ["native", "pv"])
def test_readelf_is_silent(tmp_path, target):
    path = tmp_path / "k.elf"
    path.write_bytes(elf.write(link(sample(target))))
    out = tool("readelf", "-a", "-W", "--debug-dump=info,line", str(path))
    assert "warning" not in out.lower() and "error" not in out.lower()
    assert ".pv.sites" in out


def test_objdump_prints_source_lines(image_file):
    out = tool("objdump", "-d", "-l", str(image_file))
    assert "<kmain>:" in out and "<_start>:" in out
    assert "k.pvk:4" in out and "io.pvk:7" in out
    assert "warning" not in out.lower()


def test_nm_lists_symbols(image_file):
    out = tool("nm", str(image_file))
    assert " T kmain" in out and " R msg" in out and " D ptr" in out and " B ticks" in out


def test_gdb_finds_lines(image_file):
    out = tool("gdb", "-nx", "-batch", "-ex", "info line kmain", str(image_file))
    assert 'Line 3 of "kern/k.pvk" starts at address' in out and "<kmain>" in out
    assert "warning" not in out.lower()


# -- clean errors -----------------------------------------------------------------------------

def with_kmain(code: bytes, relocs: list[Reloc], data: list[Data] = ()) -> ObjectCode:
    return ObjectCode([FunctionCode("kmain", code, relocs)], list(data), [])


HERE = Loc(SRC, 9, 5)


@pytest.mark.parametrize("obj, message", [
    (with_kmain(b"\xe8\0\0\0\0", [Reloc(1, PC32, "nowhere", -4)]), "undefined symbol 'nowhere'"),
    (ObjectCode([], [], []), "undefined symbol 'kmain' (referenced from _start)"),
    (with_kmain(b"\xe8\0\0\0\0", [Reloc(1, PC32, "kmain", 1 << 40)]), "out of range"),
    (with_kmain(b"\xb8\0\0\0\0", [Reloc(1, ABS32, "kmain", -(1 << 21))]), "out of range"),
    (with_kmain(b"\xb8\0\0\0\0", [Reloc(1, ABS32S, "kmain", 1 << 31)]), "out of range"),
    (with_kmain(b"\xc3", [], [Data("p", "data", 8, 8, bytes(8), [DataReloc(0, "gone")])]),
     "undefined symbol 'gone' (referenced from p)"),
    (with_kmain(b"\xc3", [], [Data("_start", "bss", 8, 8)]), "'_start' is a name the linker reserves"),
])
def test_link_errors_caused_by_the_program_are_one_line_user_errors(obj, message):
    with pytest.raises(LinkError) as err:
        link(obj)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_link_errors_name_the_program_item_that_caused_them():
    dup = ObjectCode([FunctionCode("kmain", b"\xc3", loc=Loc(SRC, 2, 1))],
                     [Data("kmain", "data", 8, 8, bytes(8), loc=HERE)], [])
    reserved = with_kmain(b"\xc3", [], [Data("__bss_end", "bss", 8, 8, loc=HERE)])
    for obj, message in ((dup, f"'kmain' is defined twice (first at {SRC}:2:1)"),
                         (reserved, "'__bss_end' is a name the linker reserves")):
        with pytest.raises(LinkError) as err:
            link(obj)
        assert err.value.loc == HERE and err.value.message == message


@pytest.mark.parametrize("section", ["bss", "data"])
def test_an_image_beyond_2_gib_names_the_first_global_past_the_limit(section):
    """The language allows a 2 GiB - 1 array; the code model does not reach past 2 GiB."""
    size = (1 << 31) - 1
    small = Data("small", "bss", 16, 8, loc=Loc(SRC, 1, 5))
    big = Data("big", section, size, 8, b"" if section == "bss" else bytes(size), loc=HERE)
    after = Data("after", "bss", 8, 8, loc=Loc(SRC, 12, 5))
    with pytest.raises(LinkError) as err:
        link(with_kmain(b"\xc3", [], [small, big, after]))
    assert err.value.loc == HERE
    assert err.value.message.startswith(f"global 'big' ({size} bytes) would end at 0x")
    assert "2 GiB" in err.value.message and "\n" not in err.value.message


def test_a_kernel_with_a_huge_global_gets_a_located_error(tmp_path):
    src = tmp_path / "huge.pvk"
    src.write_text("// a global the language allows and the image cannot hold\n"
                   "var big: [u8; 2147483647];\n"
                   "fn kmain() -> u64 { big[7] = 1; return 0; }\n")
    proc = subprocess.run([sys.executable, "-m", "pvtool", "build", str(src), "-o", str(tmp_path / "k.elf")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"{src}:2:1: error: global 'big' (2147483647 bytes) would end at 0x"), first


def test_an_image_just_below_2_gib_links():
    pad = IMAGE_LIMIT - 0x200000                        # leaves room for the boot code and stack
    image = link(with_kmain(b"\xc3", [], [Data("big", "bss", pad, 4096)]))
    assert 0x8000_0000 - 0x100000 < image.end <= IMAGE_LIMIT


@pytest.mark.parametrize("obj, message", [
    (with_kmain(b"\xb8\0\0\0\0", [Reloc(2, ABS32, "kmain")]), "outside the object"),
    (with_kmain(b"\xc3", [Reloc(0, "got32", "kmain")]), "unknown relocation kind"),
    (with_kmain(b"\xc3", [], [Data("p", "data", 8, 8, bytes(8), [DataReloc(4, "kmain")])]), "outside"),
    (with_kmain(b"\xc3", [], [Data("x", "heap", 8, 8)]), "unknown section 'heap'"),
    (with_kmain(b"\xc3", [], [Data("x", "data", 8, 8, b"\1")]), "initialiser is 1 bytes"),
    (with_kmain(b"\xc3", [], [Data("x", "bss", 8, 3)]), "not a power of two"),
    (ObjectCode([FunctionCode("kmain", b"\xc3", sites=[SiteRow(0, 1, "frobnicate", None)])], [], []),
     "unknown operation 'frobnicate'"),
    (ObjectCode([FunctionCode("kmain", b"\xc3", sites=[SiteRow(0, 2, "hlt", None)])], [], []),
     "outside the function"),
    (ObjectCode([FunctionCode("kmain", b"\xc3")], [], [], target="hvm"), "unknown target 'hvm'"),
])
def test_malformed_object_code_is_an_internal_error(obj, message):
    with pytest.raises(InternalError) as err:
        link(obj)
    assert err.value.stage == "link" and message in err.value.message and not isinstance(err.value, LinkError)


def _read_leb(data: bytes, signed: bool) -> int:
    """LEB128 per DWARF 4 section 7.6, decoded independently of pvtool.dwarf."""
    value = shift = 0
    for k, byte in enumerate(data):
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            assert k == len(data) - 1, "bytes after the last group"
            return value - (1 << shift) if signed and byte & 0x40 else value
    raise AssertionError("no last group")


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**64))
def test_uleb_round_trips_and_repeats(n):
    first = uleb(n)
    assert _read_leb(first, signed=False) == n
    assert len(first) == max(1, -(-n.bit_length() // 7))          # the shortest form
    assert uleb(n) == first                  # the remembered encoding is the same bytes


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-2**63, max_value=2**63))
def test_sleb_round_trips_and_repeats(n):
    first = sleb(n)
    assert _read_leb(first, signed=True) == n
    bits = (n if n >= 0 else ~n).bit_length() + 1                # with the sign bit
    assert len(first) == -(-bits // 7)                           # the shortest form
    assert sleb(n) == first
