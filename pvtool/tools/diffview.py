"""What the paravirtualization pass changed: a native and a PV image side by side.

`diff_images(native, pv)` pairs the two builds function by function.  Within
a function the sensitive sites are the anchors: each native site (a
`.pv.sites` record the native build wrote) is matched, in order, to the PV
site of the same operation and source line, and the code between two
anchors is the same instruction stream on both sides, aligned with difflib.
The summary counts sites per operation, the exits the PV build avoids and
the text size before and after.  `render` draws it for a terminal (ANSI
colour optional), `to_json` for tools.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from itertools import zip_longest

from pvimage import abi
from pvimage.elfread import ElfInfo, Function
from pvimage.sweep import decode

from ..intrinsics import OP_NAMES

NO_FUNCTION = "(outside any function)"


@dataclass(frozen=True)
class Insn:
    address: int
    size: int
    text: str


@dataclass
class SitePair:
    """One sensitive operation: the native instruction and what the PV build made of it."""
    op: str
    file: str
    line: int
    native: abi.Site | None
    pv: abi.Site | None
    native_asm: list[Insn] = field(default_factory=list)
    pv_asm: list[Insn] = field(default_factory=list)


@dataclass
class Row:
    """One line of the side-by-side listing."""
    native: Insn | None
    pv: Insn | None
    kind: str                       # 'same', 'changed', 'site'
    site: SitePair | None = None    # for 'site' rows, and rows inside an unmatched site


@dataclass
class FunctionDiff:
    name: str
    native: Function | None
    pv: Function | None
    sites: list[SitePair]
    rows: list[Row]


@dataclass
class OpCount:
    native: int = 0
    boot: int = 0           # of the native sites, those in boot code (no source position)
    pv: int = 0
    exits_avoided: int = 0
    batched: int = 0
    hypercalls: int = 0


@dataclass
class Summary:
    ops: dict[str, OpCount]
    native_text: int        # executable bytes, less the hypercall page
    pv_text: int
    native_functions: int   # bytes in the listed functions
    pv_functions: int

    def total(self, attr: str) -> int:
        return sum(getattr(c, attr) for c in self.ops.values())


@dataclass
class Diff:
    native_name: str
    pv_name: str
    functions: list[FunctionDiff]
    summary: Summary


# -- what a PV site became -----------------------------------------------------

def outcome(site: abi.Site) -> str:
    """'batched' (queued for one multicall), 'hypercall' (still an exit) or 'no-exit'."""
    return abi.SITE_KINDS[site.kind]


def op_name(site: abi.Site) -> str:
    return OP_NAMES.get(site.op, f"op{site.op}")


# -- building the diff ------------------------------------------------------------

def diff_images(native: ElfInfo, pv: ElfInfo, native_name: str = "native", pv_name: str = "pv") -> Diff:
    nfuncs = _listed_functions(native)
    pfuncs = _listed_functions(pv)
    nsites = _sites_by_function(native, rewritten=False)
    psites = _sites_by_function(pv, rewritten=True)
    names = list(dict.fromkeys([f.name for f in nfuncs] + [f.name for f in pfuncs]
                               + list(nsites) + list(psites)))
    nmap, pmap = {f.name: f for f in nfuncs}, {f.name: f for f in pfuncs}
    functions = [_diff_function(name, native, pv, nmap.get(name), pmap.get(name),
                                nsites.get(name, []), psites.get(name, []))
                 for name in names]
    summary = _summary(native, pv)
    summary.native_functions = sum(f.native.size for f in functions if f.native)
    summary.pv_functions = sum(f.pv.size for f in functions if f.pv)
    return Diff(native_name, pv_name, functions, summary)


def _listed_functions(info: ElfInfo) -> list[Function]:
    """Functions worth listing: not the hypercall page (the hypervisor fills it)."""
    hp = info.hypercall_page
    return [f for f in info.functions
            if f.size and not (hp is not None and f.address < hp + abi.PAGE_SIZE and hp < f.end)]


def _sites_by_function(info: ElfInfo, rewritten: bool) -> dict[str, list[abi.Site]]:
    out: dict[str, list[abi.Site]] = {}
    for s in sorted(info.sites, key=lambda s: s.address):
        if s.rewritten == rewritten:
            hit = info.function_at(s.address)
            out.setdefault(hit[0].name if hit else NO_FUNCTION, []).append(s)
    return out


def _disasm(info: ElfInfo, address: int, size: int) -> list[Insn]:
    code = info.read(address, size)
    return [Insn(i.address, i.size, f"{i.mnemonic} {i.op_str}".strip() + _target(info, i.mnemonic, i.op_str))
            for i in decode(code, address, info.bits_at(address))]


def _target(info: ElfInfo, mnemonic: str, op_str: str) -> str:
    """` <kmain+0x12>` or ` <hypercall io_in>` after a direct call or jump."""
    if not (mnemonic == "call" or mnemonic.startswith("j")) or not op_str.startswith("0x"):
        return ""
    try:
        target = int(op_str, 16)
    except ValueError:
        return ""
    hp = info.hypercall_page
    if hp is not None and hp <= target < hp + abi.PAGE_SIZE:
        nr, off = divmod(target - hp, abi.HYPERCALL_STRIDE)
        return f" <hypercall {abi.HYPERCALL_NAMES.get(nr, nr)}>" if off == 0 else ""
    hit = info.function_at(target)
    if hit is None:
        return ""
    return f" <{hit[0].name}>" if hit[1] == 0 else f" <{hit[0].name}+{hit[1]:#x}>"


def match_sites(native: list[abi.Site], pv: list[abi.Site]) -> list[SitePair]:
    """Pair sites in order by (op, file, line); unmatched ones keep None on the other side."""
    pairs: list[SitePair] = []
    k = 0
    for n in native:
        key = (n.op, n.file, n.line)
        j = next((j for j in range(k, len(pv)) if (pv[j].op, pv[j].file, pv[j].line) == key), None)
        if j is None:
            pairs.append(SitePair(op_name(n), n.file, n.line, n, None))
            continue
        pairs += [SitePair(op_name(p), p.file, p.line, None, p) for p in pv[k:j]]
        pairs.append(SitePair(op_name(n), n.file, n.line, n, pv[j]))
        k = j + 1
    pairs += [SitePair(op_name(p), p.file, p.line, None, p) for p in pv[k:]]
    return pairs


def _diff_function(name: str, ninfo: ElfInfo, pinfo: ElfInfo, nfn: Function | None, pfn: Function | None,
                   nsites: list[abi.Site], psites: list[abi.Site]) -> FunctionDiff:
    sites = match_sites(nsites, psites)
    for sp in sites:
        if sp.native:
            sp.native_asm = _disasm(ninfo, sp.native.address, sp.native.length)
        if sp.pv:
            sp.pv_asm = _disasm(pinfo, sp.pv.address, sp.pv.length)
    ncode = _disasm(ninfo, nfn.address, nfn.size) if nfn else []
    pcode = _disasm(pinfo, pfn.address, pfn.size) if pfn else []
    return FunctionDiff(name, nfn, pfn, sites, _rows(ncode, pcode, sites))


def _inside(insn: Insn, site: abi.Site | None) -> bool:
    return site is not None and site.address <= insn.address < site.address + site.length


def _rows(ncode: list[Insn], pcode: list[Insn], sites: list[SitePair]) -> list[Row]:
    """Walk both listings; matched sites are anchors, the code between them is aligned."""
    rows: list[Row] = []
    ni = pi = 0
    for sp in [s for s in sites if s.native and s.pv]:
        nstart = next((k for k in range(ni, len(ncode)) if ncode[k].address >= sp.native.address), len(ncode))
        pstart = next((k for k in range(pi, len(pcode)) if pcode[k].address >= sp.pv.address), len(pcode))
        rows += _align(ncode[ni:nstart], pcode[pi:pstart], sites)
        nend = next((k for k in range(nstart, len(ncode)) if not _inside(ncode[k], sp.native)), len(ncode))
        pend = next((k for k in range(pstart, len(pcode)) if not _inside(pcode[k], sp.pv)), len(pcode))
        # Sites outside the function's listing still show their own instructions.
        nside = ncode[nstart:nend] or sp.native_asm
        pside = pcode[pstart:pend] or sp.pv_asm
        rows += [Row(a, b, "site", sp) for a, b in zip_longest(nside, pside)] or [Row(None, None, "site", sp)]
        ni, pi = nend, pend
    rows += _align(ncode[ni:], pcode[pi:], sites)
    if not ncode and not pcode:   # sites with no function around them
        for sp in sites:
            if not (sp.native and sp.pv):
                rows += [Row(a, b, "site", sp) for a, b in zip_longest(sp.native_asm, sp.pv_asm)]
    return rows


_NUMBER = re.compile(r"0x[0-9a-f]+|\b\d+\b")


def _key(insn: Insn) -> str:
    """What must agree for two instructions to count as the same: addresses and offsets may move."""
    return _NUMBER.sub("N", insn.text)


def _align(ncode: list[Insn], pcode: list[Insn], sites: list[SitePair]) -> list[Row]:
    unmatched = [s for s in sites if not (s.native and s.pv)]

    def site_of(n: Insn | None, p: Insn | None) -> SitePair | None:
        return next((s for s in unmatched if (n and _inside(n, s.native)) or (p and _inside(p, s.pv))), None)

    rows = []
    sm = difflib.SequenceMatcher(None, [_key(i) for i in ncode], [_key(i) for i in pcode], autojunk=False)
    for tag, a0, a1, b0, b1 in sm.get_opcodes():
        kind = "same" if tag == "equal" else "changed"
        for n, p in zip_longest(ncode[a0:a1], pcode[b0:b1]):
            rows.append(Row(n, p, kind, site_of(n, p)))
    return rows


def _text_bytes(info: ElfInfo) -> int:
    """Executable bytes less the hypercall page."""
    total = sum(len(s.data) for s in info.executable)
    hp = info.hypercall_page
    if hp is not None:
        for s in info.executable:
            total -= max(0, min(hp + abi.PAGE_SIZE, s.end) - max(hp, s.address))
    return total


def _summary(native: ElfInfo, pv: ElfInfo) -> Summary:
    ops: dict[str, OpCount] = {}
    for s in native.sites:
        if not s.rewritten:
            c = ops.setdefault(op_name(s), OpCount())
            c.native += 1
            c.boot += not s.file
    for s in pv.sites:
        if s.rewritten:
            c = ops.setdefault(op_name(s), OpCount())
            c.pv += 1
            kind = outcome(s)
            c.exits_avoided += kind == "no-exit"
            c.batched += kind == "batched"
            c.hypercalls += kind == "hypercall"
    order = {name: n for n, name in OP_NAMES.items()}
    ops = dict(sorted(ops.items(), key=lambda kv: order.get(kv[0], len(order))))
    return Summary(ops, _text_bytes(native), _text_bytes(pv), 0, 0)


# -- JSON ------------------------------------------------------------------------------

def _asm(insns: list[Insn]) -> str:
    return "; ".join(i.text for i in insns)


def _fn_json(fn: Function | None) -> dict | None:
    return {"address": fn.address, "size": fn.size} if fn else None


def _site_json(sp: SitePair) -> dict:
    return {
        "op": sp.op, "line": sp.line, "file": sp.file,
        "native": {"address": sp.native.address, "length": sp.native.length,
                   "asm": _asm(sp.native_asm)} if sp.native else None,
        "pv": {"address": sp.pv.address, "length": sp.pv.length, "asm": _asm(sp.pv_asm),
               "becomes": sp.pv.becomes, "outcome": outcome(sp.pv)} if sp.pv else None,
    }


def to_json(d: Diff) -> dict:
    s = d.summary
    return {
        "native": d.native_name,
        "pv": d.pv_name,
        "functions": [{"name": f.name, "native": _fn_json(f.native), "pv": _fn_json(f.pv),
                       "sites": [_site_json(sp) for sp in f.sites]} for f in d.functions],
        "summary": {
            "ops": {op: vars(c) for op, c in s.ops.items()},
            "native_sites": s.total("native"),
            "native_boot_sites": s.total("boot"),
            "pv_sites": s.total("pv"),
            "exits_avoided": s.total("exits_avoided"),
            "batched": s.total("batched"),
            "hypercalls": s.total("hypercalls"),
            "code_size": {"native": s.native_text, "pv": s.pv_text,
                          "native_functions": s.native_functions, "pv_functions": s.pv_functions},
        },
    }


# -- text ----------------------------------------------------------------------------------

_COLORS = {"head": "1", "site": "1;33", "native": "31", "pv": "32", "changed": "36", "dim": "2", "warn": "1;31"}


class _Paint:
    def __init__(self, on: bool):
        self.on = on

    def __call__(self, style: str, text: str) -> str:
        return f"\x1b[{_COLORS[style]}m{text}\x1b[0m" if self.on and text else text


def _short(path: str) -> str:
    if not path:
        return "boot code"
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if len(rel) < len(path) else path


def _where(sp: SitePair) -> str:
    return f"{_short(sp.file)}:{sp.line}" if sp.file else "boot code"


def render(d: Diff, color: bool = False, full: bool = False, context: int = 3,
           summary_only: bool = False) -> str:
    """The side-by-side listing and the summary; runs of more than 2*context
    identical instructions are folded unless `full`."""
    paint = _Paint(color)
    width = 46
    out = [paint("head", f"native: {d.native_name}    pv: {d.pv_name}"), ""]
    for f in [] if summary_only else d.functions:
        out += _render_function(f, paint, width, full, context)
    out += render_summary(d, paint)
    return "\n".join(out)


def _cell(insn: Insn | None, width: int) -> str:
    if insn is None:
        return " " * width
    text = f"{insn.address:>8x}  {insn.text}"
    return (text if len(text) <= width else text[:width - 1] + "~").ljust(width)


def _size(fn: Function | None) -> str:
    return f"{fn.address:#x}, {fn.size} bytes" if fn else "absent"


def _render_function(f: FunctionDiff, paint: _Paint, width: int, full: bool, context: int) -> list[str]:
    delta = f" ({f.pv.size - f.native.size:+d})" if f.native and f.pv else ""
    out = [paint("head", f"== {f.name}  native {_size(f.native)} | pv {_size(f.pv)}{delta}")]
    shown_site = None
    for k, row in enumerate(_fold(f.rows, full, context)):
        if isinstance(row, int):
            out.append(paint("dim", f"   ... {row} identical instruction{'s' if row != 1 else ''} ..."))
            continue
        if row.site is not None and row.site is not shown_site:
            out.append(_site_header(row.site, paint))
        shown_site = row.site
        left, right = _cell(row.native, width), _cell(row.pv, width)
        if row.kind == "site" or row.site is not None:
            left, right = paint("native", left), paint("pv", right)
        elif row.kind == "changed":
            left, right = paint("changed", left), paint("changed", right)
        mark = "|" if row.kind == "same" else ">" if row.native is None else "<" if row.pv is None else "*"
        gutter = " :" if row.site is not None else "  "   # inside a site
        out.append(f"{gutter} {left} {mark} {right}".rstrip())
    out.append("")
    return out


def _site_header(sp: SitePair, paint: _Paint) -> str:
    if sp.native and sp.pv:
        became = sp.pv.becomes or "(no description)"
        text = f"  -- {sp.op} at {_where(sp)} -> {became}"
    elif sp.native:
        # Boot code differs between the builds by design; a source site without a PV site is a bug.
        text = f"  -- {sp.op} at {_where(sp)}: no matching PV site"
        return paint("warn" if sp.file else "site", text)
    else:
        text = f"  -- {sp.op} at {_where(sp)}: PV only -> {sp.pv.becomes}"
    return paint("site", text)


def _fold(rows: list[Row], full: bool, context: int) -> list[Row | int]:
    """Replace long runs of 'same' rows outside any site by their count."""
    if full:
        return list(rows)
    out: list[Row | int] = []
    k = 0
    while k < len(rows):
        j = k
        while j < len(rows) and rows[j].kind == "same" and rows[j].site is None:
            j += 1
        run = j - k
        if run > 2 * context + 1:
            head = context if k > 0 else 0
            tail = context if j < len(rows) else 0
            out += rows[k:k + head] + [run - head - tail] + rows[j - tail:j]
        else:
            out += rows[k:j]
        if j < len(rows):
            out.append(rows[j])
        k = j + 1
    return out


def render_summary(d: Diff, paint: _Paint | None = None) -> list[str]:
    paint = paint or _Paint(False)
    s = d.summary
    out = [paint("head", "summary: sites per operation")]
    head = ("operation", "native", "(boot)", "pv", "no exit", "batched", "hypercall")
    attrs = ("native", "boot", "pv", "exits_avoided", "batched", "hypercalls")
    table = [head] + [(op, *(str(getattr(c, a)) for a in attrs)) for op, c in s.ops.items()]
    table.append(("total", *(str(s.total(a)) for a in attrs)))
    widths = [max(len(r[k]) for r in table) for k in range(len(head))]
    for r in table:
        out.append("  " + "  ".join(r[0].ljust(widths[0]) if k == 0 else r[k].rjust(widths[k])
                                  for k in range(len(head))))
    source = s.total("native") - s.total("boot")
    out.append(f"exits avoided: {s.total('exits_avoided')} of {source} source sites no longer exit; "
               f"{s.total('batched')} batched into multicalls; {s.total('hypercalls')} remain hypercalls")
    out += ["", paint("head", "code size (text bytes)")]
    rows = [(f.name, f.native.size if f.native else None, f.pv.size if f.pv else None) for f in d.functions
            if f.native or f.pv]
    rows += [("all functions", s.native_functions, s.pv_functions),
             ("text (no hypercall page)", s.native_text, s.pv_text)]
    name_w = max(len(r[0]) for r in rows)
    out.append(f"  {'function'.ljust(name_w)}  {'native':>7}  {'pv':>7}  change")
    for name, a, b in rows:
        change = _change(a, b)
        out.append(f"  {name.ljust(name_w)}  {_num(a):>7}  {_num(b):>7}  {change}".rstrip())
    return out


def _num(n: int | None) -> str:
    return "-" if n is None else str(n)


def _change(a: int | None, b: int | None) -> str:
    if a is None or b is None:
        return ""
    pct = f" ({(b - a) * 100 / a:+.1f}%)" if a else ""
    return f"{b - a:+d}{pct}"
