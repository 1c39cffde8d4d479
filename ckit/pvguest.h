/* pvguest.h: the pvtool PV ABI for guests written in C.
 * Generated from pvimage/abi.py by `python -m pvimage.ckit header`: do not edit.
 * How to build and link a guest: docs/abi.md, "Writing a guest in C". */
#ifndef PVGUEST_H
#define PVGUEST_H

/* ABI version */
#define ABI_VERSION 2

/* guest-physical memory map */
#define LOAD_BASE 0x100000UL
#define RESERVED_END 0x100000UL
#define START_INFO 0x1000UL
#define SHARED_PAGE 0x2000UL
#define BOOT_PML4 0x3000UL
#define BOOT_PDPT 0x4000UL
#define BOOT_PD 0x5000UL
#define BOOT_GDT 0x6000UL
#define BOOT_STACK_TOP 0x80000UL
#define BOOT_STACK_SIZE 0x10000UL
#define KERNEL_CS 8
#define KERNEL_DS 16
#define FREE_RAM_START 0x1000000UL
#define FREE_RAM_END 0x4000000UL
#define DEFAULT_RAM 0x4000000UL
#define PAGE_SIZE 0x1000UL

/* user mode: the segments an iret frame names (docs/abi.md 7a) */
#define USER_CS 35
#define USER_DS 27

/* ELF notes (owner "PVTool") */
#define NOTE_ABI_VERSION 1
#define NOTE_MODE 2
#define NOTE_FEATURES 3
#define NOTE_HYPERCALL_PAGE 4
#define NOTE_GUEST_NAME 5
#define MODE_NATIVE 0
#define MODE_PV 1
#define FEATURE_MULTICALL 1
#define FEATURE_EVENTS 2

/* start-info page (read-only), u64 fields */
#define START_INFO_MAGIC 0x54524154535650UL
#define SI_MAGIC 0
#define SI_ABI_VERSION 8
#define SI_RAM_BYTES 16
#define SI_SHARED_PAGE 24
#define SI_HYPERCALL_PAGE 32
#define SI_PT_ROOT 40
#define SI_STACK_TOP 48
#define SI_FLAGS 56
#define SI_CMDLINE 0x100UL
#define CMDLINE_MAX 0x400UL

/* shared page */
#define SH_UPCALL_MASK 0
#define SH_UPCALL_PENDING 1
#define SH_CR0 8
#define SH_CR2 16
#define SH_CR3 24
#define SH_CR4 32
#define SH_GDTR 40
#define SH_IDTR 56
#define SH_HC_VALUE 72
#define SH_TIME 80
#define SH_MC_COUNT 0x100UL
#define SH_MC_ENTRIES 0x200UL
#define MC_ENTRY_SIZE 40
#define MC_MAX 64

/* hypercalls: entry nr is at hypercall_page + nr * HYPERCALL_STRIDE */
#define HYPERCALL_STRIDE 32
#define HC_CONSOLE_WRITE 0
#define HC_SHUTDOWN 1
#define HC_SET_PTE 2
#define HC_INVLPG 3
#define HC_NEW_BASEPTR 4
#define HC_WRITE_CR 5
#define HC_SET_GDT 6
#define HC_SET_TRAP_TABLE 7
#define HC_RDMSR 8
#define HC_WRMSR 9
#define HC_CPUID 10
#define HC_IO_IN 11
#define HC_IO_OUT 12
#define HC_BLOCK 13
#define HC_RDTSC 14
#define HC_WBINVD 15
#define HC_MULTICALL 16
#define HC_EVENT_CHECK 17
#define HC_IRET 18
#define HC_SET_TIMER 19
#define HC_STACK_SWITCH 20
#define HC_SET_SYSCALL_ENTRY 21
#define HC_COUNT 22

/* hypercall errors (results are -errno) */
#define EPERM 1
#define EFAULT 14
#define EINVAL 22
#define ENOSYS 38

#ifndef __ASSEMBLER__

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct pv_start_info {
    u64 magic;
    u64 abi_version;
    u64 ram_bytes;
    u64 shared_page;
    u64 hypercall_page;
    u64 pt_root;
    u64 stack_top;
    u64 flags;
    u8 reserved[0x100 - 0x40];
    char cmdline[CMDLINE_MAX];
};
_Static_assert(__builtin_offsetof(struct pv_start_info, magic) == 0x0, "magic");
_Static_assert(__builtin_offsetof(struct pv_start_info, abi_version) == 0x8, "abi_version");
_Static_assert(__builtin_offsetof(struct pv_start_info, ram_bytes) == 0x10, "ram_bytes");
_Static_assert(__builtin_offsetof(struct pv_start_info, shared_page) == 0x18, "shared_page");
_Static_assert(__builtin_offsetof(struct pv_start_info, hypercall_page) == 0x20, "hypercall_page");
_Static_assert(__builtin_offsetof(struct pv_start_info, pt_root) == 0x28, "pt_root");
_Static_assert(__builtin_offsetof(struct pv_start_info, stack_top) == 0x30, "stack_top");
_Static_assert(__builtin_offsetof(struct pv_start_info, flags) == 0x38, "flags");
_Static_assert(__builtin_offsetof(struct pv_start_info, cmdline) == SI_CMDLINE, "cmdline");

/* A multicall queue entry in the shared page, at SH_MC_ENTRIES. */
struct pv_mc_entry { u64 nr, arg0, arg1, arg2, result; };
_Static_assert(sizeof(struct pv_mc_entry) == MC_ENTRY_SIZE, "mc entry");

/* A field of the shared page. */
#define PV_SHARED(type, offset) (*(volatile type *)(SHARED_PAGE + (offset)))

/* The hypercall page: the linker script reserves it, the hypervisor fills it. */
extern char hypercall_page[];

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

/* One helper per hypercall. */
static inline long hc_console_write(long buf, long len) { return PV_HYPERCALL(HC_CONSOLE_WRITE, buf, len, 0, 0, 0); }
static inline long hc_shutdown(long status) { return PV_HYPERCALL(HC_SHUTDOWN, status, 0, 0, 0, 0); }
static inline long hc_set_pte(long pte_ptr, long value) { return PV_HYPERCALL(HC_SET_PTE, pte_ptr, value, 0, 0, 0); }
static inline long hc_invlpg(long va) { return PV_HYPERCALL(HC_INVLPG, va, 0, 0, 0, 0); }
static inline long hc_new_baseptr(long cr3) { return PV_HYPERCALL(HC_NEW_BASEPTR, cr3, 0, 0, 0, 0); }
static inline long hc_write_cr(long n, long value) { return PV_HYPERCALL(HC_WRITE_CR, n, value, 0, 0, 0); }
static inline long hc_set_gdt(long desc) { return PV_HYPERCALL(HC_SET_GDT, desc, 0, 0, 0, 0); }
static inline long hc_set_trap_table(long desc) { return PV_HYPERCALL(HC_SET_TRAP_TABLE, desc, 0, 0, 0, 0); }
static inline long hc_rdmsr(long msr) { return PV_HYPERCALL(HC_RDMSR, msr, 0, 0, 0, 0); }
static inline long hc_wrmsr(long msr, long value) { return PV_HYPERCALL(HC_WRMSR, msr, value, 0, 0, 0); }
static inline long hc_cpuid(long leaf, long out) { return PV_HYPERCALL(HC_CPUID, leaf, out, 0, 0, 0); }
static inline long hc_io_in(long port, long size) { return PV_HYPERCALL(HC_IO_IN, port, size, 0, 0, 0); }
static inline long hc_io_out(long port, long size, long value) { return PV_HYPERCALL(HC_IO_OUT, port, size, value, 0, 0); }
static inline long hc_block(void) { return PV_HYPERCALL(HC_BLOCK, 0, 0, 0, 0, 0); }
static inline long hc_rdtsc(void) { return PV_HYPERCALL(HC_RDTSC, 0, 0, 0, 0, 0); }
static inline long hc_wbinvd(void) { return PV_HYPERCALL(HC_WBINVD, 0, 0, 0, 0, 0); }
static inline long hc_multicall(void) { return PV_HYPERCALL(HC_MULTICALL, 0, 0, 0, 0, 0); }
static inline long hc_event_check(void) { return PV_HYPERCALL(HC_EVENT_CHECK, 0, 0, 0, 0, 0); }
static inline long hc_iret(void) { return PV_HYPERCALL(HC_IRET, 0, 0, 0, 0, 0); }
static inline long hc_set_timer(long deadline) { return PV_HYPERCALL(HC_SET_TIMER, deadline, 0, 0, 0, 0); }
static inline long hc_stack_switch(long sp) { return PV_HYPERCALL(HC_STACK_SWITCH, sp, 0, 0, 0, 0); }
static inline long hc_set_syscall_entry(long address) { return PV_HYPERCALL(HC_SET_SYSCALL_ENTRY, address, 0, 0, 0, 0); }

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
        "    call hypercall_page+32\n"
        "1:  jmp 1b\n"
        ".popsection\n");
#endif

#endif /* __ASSEMBLER__ */
#endif /* PVGUEST_H */
