/* The pvtool PV ABI (docs/abi.md, pvtool/abi.py) for guests written in C.
 *
 * Include it once, in the guest's only C file: it also emits the PVTool
 * ELF notes, the hypercall page the runtime fills, and `_start`, which
 * calls `long guest_main(const struct start_info *)` and shuts down with
 * its result.  tests/test_runtime_guests.py checks these numbers against
 * pvtool/abi.py.
 */
#ifndef PV_H
#define PV_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define START_INFO        0x1000UL
#define SHARED_PAGE       0x2000UL
#define BOOT_PML4         0x3000UL
#define BOOT_STACK_TOP    0x80000UL
#define HYPERCALL_STRIDE  32

#define HC_CONSOLE_WRITE   0
#define HC_SHUTDOWN        1
#define HC_SET_PTE         2
#define HC_INVLPG          3
#define HC_NEW_BASEPTR     4
#define HC_WRITE_CR        5
#define HC_SET_GDT         6
#define HC_SET_TRAP_TABLE  7
#define HC_RDMSR           8
#define HC_WRMSR           9
#define HC_CPUID          10
#define HC_IO_IN          11
#define HC_IO_OUT         12
#define HC_BLOCK          13
#define HC_RDTSC          14
#define HC_WBINVD         15
#define HC_MULTICALL      16
#define HC_EVENT_CHECK    17
#define HC_IRET           18
#define HC_SET_TIMER      19
#define HC_COUNT          20

#define EPERM   1
#define EFAULT 14
#define EINVAL 22
#define ENOSYS 38

/* shared page offsets */
#define SH_UPCALL_MASK    0x000
#define SH_UPCALL_PENDING 0x001
#define SH_CR0            0x008
#define SH_CR2            0x010
#define SH_CR3            0x018
#define SH_CR4            0x020
#define SH_GDTR           0x028
#define SH_IDTR           0x038
#define SH_HC_VALUE       0x048
#define SH_TIME           0x050
#define SH_MC_COUNT       0x100
#define SH_MC_ENTRIES     0x200
#define MC_MAX            64

struct start_info {
    u64 magic, abi_version, ram_bytes, shared_page, hypercall_page, pt_root, stack_top, flags;
    u8 pad[0x100 - 0x40];
    char cmdline[0x400];
};

struct mc_entry { u64 nr, arg0, arg1, arg2, result; };

#define SHARED(type, off) (*(volatile type *)(SHARED_PAGE + (off)))

extern char hypercall_page[];

/* Call entry `nr` of the hypercall page: arguments rdi, rsi, rdx, r10, r8; result rax;
   rcx and r11 clobbered. Built with -mno-red-zone: the call pushes below rsp. */
static inline long hypercall_at(void *entry, long nr, long a0, long a1, long a2, long a3, long a4)
{
    register long r10 __asm__("r10") = a3;
    register long r8 __asm__("r8") = a4;
    long ret;
    __asm__ volatile("call *%[entry]"
                     : "=a"(ret), "+D"(a0), "+S"(a1), "+d"(a2), "+r"(r10), "+r"(r8)
                     : [entry] "r"(entry), "a"(nr)
                     : "rcx", "r11", "memory");
    return ret;
}

static inline long hypercall(int nr, long a0, long a1, long a2)
{
    return hypercall_at(hypercall_page + nr * HYPERCALL_STRIDE, nr, a0, a1, a2, 0, 0);
}

/* A hypercall with any number in rax: enter a stub just after its `mov eax, nr`. */
static inline long hypercall_raw(long nr, long a0, long a1)
{
    return hypercall_at(hypercall_page + 5, nr, a0, a1, 0, 0, 0);
}

static inline u64 strlen_(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static inline void print(const char *s) { hypercall(HC_CONSOLE_WRITE, (long)s, strlen_(s), 0); }

/* Entry, notes and the hypercall page. */
__asm__(
    ".section .text.start, \"ax\"\n"
    ".globl _start\n"
    "_start:\n"
    "    mov %rsi, %rdi\n"
    "    call guest_main\n"
    "    mov %eax, %edi\n"
    "    call hypercall_page + 32 * 1\n"      /* HC_SHUTDOWN */
    "1:  jmp 1b\n"
    ".section .hypercall_page, \"ax\"\n"
    ".balign 4096\n"
    ".globl hypercall_page\n"
    "hypercall_page:\n"
    "    .fill 4096, 1, 0xcc\n"
    ".section .note.pvtool, \"a\"\n"
    ".balign 4\n"
    "    .long 7, 4, 1\n    .asciz \"PVTool\"\n    .balign 4\n    .long 1\n"    /* ABI version 1 */
    "    .long 7, 4, 2\n    .asciz \"PVTool\"\n    .balign 4\n    .long 1\n"    /* mode: PV */
    "    .long 7, 8, 4\n    .asciz \"PVTool\"\n    .balign 4\n    .quad hypercall_page\n"
    "    .long 7, 8, 5\n    .asciz \"PVTool\"\n    .balign 4\n    .asciz \"c-guest\"\n"
    ".text\n");

#endif
