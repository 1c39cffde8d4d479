/* Helpers for native C test guests: the real privileged instructions.
 *
 * Include it once, in the guest's only C file: it emits `_start`, which calls
 * `long guest_main(const struct start_info *)` and writes the result to the
 * debug-exit port 0xf4, and a PVTool mode note saying "native" (an image
 * without any PVTool note is native too).
 */
#ifndef NATIVE_H
#define NATIVE_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct start_info {
    u64 magic, abi_version, ram_bytes, shared_page, hypercall_page, pt_root, stack_top, flags;
    u8 pad[0x100 - 0x40];
    char cmdline[0x400];
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }
static inline u64 save_flags(void) { u64 f; __asm__ volatile("pushfq; pop %0" : "=r"(f) :: "memory"); return f; }
static inline void restore_flags(u64 f) { __asm__ volatile("push %0; popfq" :: "r"(f) : "memory", "cc"); }
static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" :: "r"(v) : "memory"); }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" :: "r"(v) : "memory"); }
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" :: "r"(va) : "memory"); }
static inline void wbinvd(void) { __asm__ volatile("wbinvd" ::: "memory"); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline u64 rdmsr(u32 msr) { u32 lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return ((u64)hi << 32) | lo; }
static inline void wrmsr(u32 msr, u64 v) { __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }
static inline void cpuid(u32 leaf, u32 out[4])
{
    __asm__ volatile("cpuid" : "=a"(out[0]), "=b"(out[1]), "=c"(out[2]), "=d"(out[3]) : "a"(leaf), "c"(0));
}
static inline void sgdt(void *p) { __asm__ volatile("sgdt (%0)" :: "r"(p) : "memory"); }
static inline void lgdt(const void *p) { __asm__ volatile("lgdt (%0)" :: "r"(p) : "memory"); }
static inline void sidt(void *p) { __asm__ volatile("sidt (%0)" :: "r"(p) : "memory"); }
static inline void lidt(const void *p) { __asm__ volatile("lidt (%0)" :: "r"(p) : "memory"); }

static void putc_(char c)
{
    while (!(inb(0x3fd) & 0x20))
        ;
    outb(0x3f8, c);
}

static void print(const char *s) { while (*s) putc_(*s++); }

static void print_hex(u64 v)
{
    print("0x");
    for (int shift = 60; shift >= 0; shift -= 4) {
        int d = (v >> shift) & 15;
        if (d || shift == 0 || (v >> shift))
            putc_(d < 10 ? '0' + d : 'a' + d - 10);
    }
}

__asm__(
    ".section .text.start, \"ax\"\n"
    ".globl _start\n"
    "_start:\n"
    "    mov %rsi, %rdi\n"
    "    call guest_main\n"
    "    outb %al, $0xf4\n"
    "1:  cli\n"
    "    hlt\n"
    "    jmp 1b\n"
    ".section .note.pvtool, \"a\"\n"
    ".balign 4\n"
    "    .long 7, 4, 2\n    .asciz \"PVTool\"\n    .balign 4\n    .long 0\n"    /* mode: native */
    ".text\n");

#endif
