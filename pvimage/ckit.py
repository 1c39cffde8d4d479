"""The C kit's ABI files, generated from abi.py: `ckit/pvguest.h` and `ckit/pvguest.ld`.

    python -m pvimage.ckit header > ckit/pvguest.h
    python -m pvimage.ckit ldscript > ckit/pvguest.ld

The header gives a C guest the numbers of the PV ABI (memory map, notes,
start-info and shared-page offsets, hypercalls) and a helper per hypercall.
The linker script lays a guest out as a PV image must be (docs/abi.md,
"Writing a guest in C"): text and data in separate page-aligned segments,
the hypercall page reserved at the end of text, and the PVTool notes
written by the script itself.  tests/test_ckit.py checks that the committed
files are exactly this module's output.
"""
from __future__ import annotations

import sys

from . import abi

GENERATED = "Generated from pvimage/abi.py by `python -m pvimage.ckit {what}`: do not edit."

# (title, names) of the constants the header defines, in order.
_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("ABI version", ("ABI_VERSION",)),
    ("guest-physical memory map", ("LOAD_BASE", "RESERVED_END", "START_INFO", "SHARED_PAGE", "BOOT_PML4",
                                   "BOOT_PDPT", "BOOT_PD", "BOOT_GDT", "BOOT_STACK_TOP", "BOOT_STACK_SIZE",
                                   "KERNEL_CS", "KERNEL_DS", "FREE_RAM_START", "FREE_RAM_END", "DEFAULT_RAM",
                                   "PAGE_SIZE")),
    ("user mode: the segments an iret frame names (docs/abi.md 7a)", ("USER_CS", "USER_DS")),
    ("ELF notes (owner \"PVTool\")", ("NOTE_ABI_VERSION", "NOTE_MODE", "NOTE_FEATURES", "NOTE_HYPERCALL_PAGE",
                                      "NOTE_GUEST_NAME", "MODE_NATIVE", "MODE_PV", "FEATURE_MULTICALL",
                                      "FEATURE_EVENTS")),
    ("start-info page (read-only), u64 fields", ("START_INFO_MAGIC", "SI_MAGIC", "SI_ABI_VERSION", "SI_RAM_BYTES",
                                                 "SI_SHARED_PAGE", "SI_HYPERCALL_PAGE", "SI_PT_ROOT",
                                                 "SI_STACK_TOP", "SI_FLAGS", "SI_CMDLINE", "CMDLINE_MAX")),
    ("shared page", ("SH_UPCALL_MASK", "SH_UPCALL_PENDING", "SH_CR0", "SH_CR2", "SH_CR3", "SH_CR4", "SH_GDTR",
                     "SH_IDTR", "SH_HC_VALUE", "SH_TIME", "SH_MC_COUNT", "SH_MC_ENTRIES", "MC_ENTRY_SIZE",
                     "MC_MAX")),
    ("hypercalls: entry nr is at hypercall_page + nr * HYPERCALL_STRIDE",
     ("HYPERCALL_STRIDE", *(f"HC_{name.upper()}" for _, name in sorted(abi.HYPERCALL_NAMES.items())),
      "HC_COUNT")),
    ("hypercall errors (results are -errno)", ("EPERM", "EFAULT", "EINVAL", "ENOSYS")),
]

HEADER_NAMES: tuple[str, ...] = tuple(name for _, names in _GROUPS for name in names)


def _literal(value: int) -> str:
    return f"{value:#x}UL" if value >= 0x100 else str(value)


def _start_info_struct() -> list[str]:
    """struct pv_start_info from the SI_* offsets: u64 fields, then the command line."""
    fields = sorted((getattr(abi, n), n[3:].lower()) for n in HEADER_NAMES
                    if n.startswith("SI_") and n != "SI_CMDLINE")
    out = ["struct pv_start_info {"]
    for offset, name in fields:
        out.append(f"    u64 {name};")
    end = fields[-1][0] + 8
    out += [f"    u8 reserved[{abi.SI_CMDLINE:#x} - {end:#x}];",
            "    char cmdline[CMDLINE_MAX];",
            "};"]
    out += [f"_Static_assert(__builtin_offsetof(struct pv_start_info, {name}) == {offset:#x}, \"{name}\");"
            for offset, name in fields]
    out.append("_Static_assert(__builtin_offsetof(struct pv_start_info, cmdline) == SI_CMDLINE, \"cmdline\");")
    return out


def _hypercall_helpers() -> list[str]:
    out = []
    for nr, name in sorted(abi.HYPERCALL_NAMES.items()):
        args = abi.HYPERCALL_ARGS[nr]
        params = ", ".join(f"long {a}" for a in args) or "void"
        values = ", ".join([*args, *["0"] * (5 - len(args))])
        out.append(f"static inline long hc_{name}({params}) "
                   f"{{ return PV_HYPERCALL(HC_{name.upper()}, {values}); }}")
    return out


_HYPERCALL_MACRO = r"""
/* Make hypercall `nr` (a constant): a direct call to its entry in the
   hypercall page, arguments in rdi, rsi, rdx, r10, r8, the result in rax
   (>= 0 success, -errno failure); rax, rcx and r11 are clobbered.  bundle.s
   places the call so that it ends on a bundle boundary (the stub returns
   with a masked jump).  Build with -mno-red-zone: the call pushes below rsp. */
#define PV_HYPERCALL(nr, a0, a1, a2, a3, a4) __extension__ ({                          \
    long pv_a0_ = (long)(a0), pv_a1_ = (long)(a1), pv_a2_ = (long)(a2);                \
    long pv_a3_ = (long)(a3), pv_a4_ = (long)(a4), pv_ret_;                             \
    register long pv_r10_ __asm__("r10") = pv_a3_;                                      \
    register long pv_r8_ __asm__("r8") = pv_a4_;                                        \
    __asm__ volatile("call hypercall_page+%c[entry]"                                    \
                     : "=a"(pv_ret_), "+D"(pv_a0_), "+S"(pv_a1_), "+d"(pv_a2_),         \
                       "+r"(pv_r10_), "+r"(pv_r8_)                                      \
                     : [entry] "i"((nr) * HYPERCALL_STRIDE)                             \
                     : "rcx", "r11", "memory", "cc");                                   \
    pv_ret_; })
"""

_MASKED_CALL = r"""
/* Call a `void (void)` function through a pointer, as the code rules allow:
   the target is masked to a bundle start (`and $-32`), so it must be 32-byte
   aligned (declare it with __attribute__((aligned(32)))).  The pair sits at
   the end of one bundle, so the return address is a bundle start; the
   stack is realigned to 16 bytes around the call, as the SysV ABI wants. */
#define PV_CALL_MASKED(fn) do {                                                          \
    register long pv_fn_ __asm__("rax") = (long)(fn);                                   \
    __asm__ volatile("push %%rbp\n\t"                                                   \
                     "mov %%rsp, %%rbp\n\t"                                             \
                     "and $-16, %%rsp\n\t"                                              \
                     ".bundle_lock\n\t"                                                 \
                     "%{disp32%} nopw 0(%%rax,%%rax,1)\n\t"                             \
                     "%{disp32%} nopw 0(%%rax,%%rax,1)\n\t"                             \
                     "%{disp32%} nopl 0(%%rax,%%rax,1)\n\t"                             \
                     "andq $-32, %%rax\n\t"                                             \
                     "callq *%%rax\n\t"                                                 \
                     ".bundle_unlock\n\t"                                               \
                     "mov %%rbp, %%rsp\n\t"                                             \
                     "pop %%rbp"                                                        \
                     : "+r"(pv_fn_) :                                                   \
                     : "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc", \
                       PV_XMM_CLOBBERS);                                                \
} while (0)
#ifdef __SSE__
#define PV_XMM_CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", \
    "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#else
#define PV_XMM_CLOBBERS "cc"
#endif
"""

_START = r"""
/* With PVGUEST_MAIN defined before the include, this file also provides
   `_start`: it calls `long guest_main(const struct pv_start_info *)` and
   shuts down with its result.  Define it in one C file only. */
#ifdef PVGUEST_MAIN
long guest_main(const struct pv_start_info *si);
__asm__(".pushsection .text.start, \"ax\"\n"
        ".balign 32\n"
        ".globl _start\n"
        "_start:\n"
        "    mov %rsi, %rdi\n"
        "    call guest_main\n"
        "    mov %eax, %edi\n"
        "    call hypercall_page+{shutdown}\n"
        "1:  jmp 1b\n"
        ".popsection\n");
#endif
"""


def header() -> str:
    lines = ["/* pvguest.h: the pvtool PV ABI for guests written in C.",
             f" * {GENERATED.format(what='header')}",
             " * How to build and link a guest: docs/abi.md, \"Writing a guest in C\". */",
             "#ifndef PVGUEST_H", "#define PVGUEST_H", ""]
    for title, names in _GROUPS:
        lines.append(f"/* {title} */")
        lines += [f"#define {name} {_literal(getattr(abi, name))}" for name in names]
        lines.append("")
    lines += ["#ifndef __ASSEMBLER__", "",
              "typedef unsigned long u64;", "typedef unsigned int u32;", "typedef unsigned short u16;",
              "typedef unsigned char u8;", ""]
    lines += _start_info_struct()
    lines += ["", "/* A multicall queue entry in the shared page, at SH_MC_ENTRIES. */",
              "struct pv_mc_entry { u64 nr, arg0, arg1, arg2, result; };",
              "_Static_assert(sizeof(struct pv_mc_entry) == MC_ENTRY_SIZE, \"mc entry\");", "",
              "/* A field of the shared page. */",
              "#define PV_SHARED(type, offset) (*(volatile type *)(SHARED_PAGE + (offset)))", "",
              "/* The hypercall page: the linker script reserves it, the hypervisor fills it. */",
              "extern char hypercall_page[];"]
    lines += _HYPERCALL_MACRO.splitlines()
    lines += ["", "/* One helper per hypercall. */"] + _hypercall_helpers()
    lines += _MASKED_CALL.splitlines()
    lines += _START.replace("{shutdown}", str(abi.HC_SHUTDOWN * abi.HYPERCALL_STRIDE)).splitlines()
    lines += ["", "#endif /* __ASSEMBLER__ */", "#endif /* PVGUEST_H */"]
    return "\n".join(lines) + "\n"


def _note(ntype: int, desc: list[str]) -> str:
    """One PVTool note as linker-script data statements: namesz, descsz, type, name, desc."""
    name = abi.NOTE_OWNER.encode() + b"\0"
    name += b"\0" * (-len(name) % 4)
    words = [int.from_bytes(name[k:k + 4], "little") for k in range(0, len(name), 4)]
    size = sum(8 if d.startswith("QUAD") else 4 for d in desc)
    parts = [f"LONG({len(abi.NOTE_OWNER) + 1})", f"LONG({size})", f"LONG({ntype})",
             *(f"LONG({w:#010x})" for w in words), *desc]
    return "        " + " ".join(parts)


def ldscript() -> str:
    notes = [
        ("ABI version", _note(abi.NOTE_ABI_VERSION, [f"LONG({abi.ABI_VERSION})"])),
        ("mode: PV", _note(abi.NOTE_MODE, [f"LONG({abi.MODE_PV})"])),
        ("the hypercall page", _note(abi.NOTE_HYPERCALL_PAGE, ["QUAD(hypercall_page)"])),
    ]
    note_lines = []
    for what, text in notes:
        note_lines += [f"        /* {what} */", text]
    return "\n".join([
        "/* pvguest.ld: the layout of a PV guest written in C (docs/abi.md, \"Writing a guest in C\").",
        f"   {GENERATED.format(what='ldscript')}",
        "   Text (read+execute, page-aligned, ending with the hypercall page), read-only data",
        "   with the PVTool notes, and data (read+write) are separate segments, identity-placed",
        f"   at {abi.LOAD_BASE:#x}. */",
        "OUTPUT_FORMAT(\"elf64-x86-64\")",
        "ENTRY(_start)",
        "PHDRS {",
        "    text   PT_LOAD FLAGS(5);",
        "    rodata PT_LOAD FLAGS(4);",
        "    data   PT_LOAD FLAGS(6);",
        "    note   PT_NOTE FLAGS(4);",
        "}",
        "SECTIONS {",
        f"    . = {abi.LOAD_BASE:#x};",
        "    .text : {",
        "        *(.text.start)",
        "        *(.text .text.*)",
        f"        . = ALIGN({abi.PAGE_SIZE});",
        "        hypercall_page = .;",
        f"        . += {abi.PAGE_SIZE};",
        "    } :text =0xcccccccc",
        f"    . = ALIGN({abi.PAGE_SIZE});",
        "    .rodata : { *(.rodata .rodata.*) } :rodata",
        "    .note.pvtool : ALIGN(4) {",
        *note_lines,
        "    } :rodata :note",
        f"    . = ALIGN({abi.PAGE_SIZE});",
        "    .data : { *(.data .data.*) } :data",
        "    .bss : { *(.bss .bss.* COMMON) } :data",
        "    /DISCARD/ : { *(.comment) *(.note.GNU-stack) *(.note.gnu.*) *(.eh_frame*) }",
        "}",
    ]) + "\n"


def main(argv: list[str]) -> int:
    outputs = {"header": header, "ldscript": ldscript}
    if len(argv) != 1 or argv[0] not in outputs:
        print("usage: python -m pvimage.ckit {header|ldscript}", file=sys.stderr)
        return 2
    sys.stdout.write(outputs[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
