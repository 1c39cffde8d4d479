/* A PV guest that misbehaves on purpose: the start-info command line picks how.
 * "errors" hands bad pointers and bad values to every hypercall and checks each
 * result; the other scenarios must end in a clear fault or a timeout.  Built
 * with -DWITH_CLI it also contains a `cli`, so the validator must refuse it.
 * Built like hello_pv.c (ckit/build.py).  Unknown hypercall numbers cannot be
 * tried: the code rules let a guest reach only the stubs, which set the number.
 */
#define PVGUEST_MAIN
#include "pvguest.h"

#define hypercall(nr, a0, a1, a2) PV_HYPERCALL(nr, a0, a1, a2, 0, 0)
#define SHARED PV_SHARED

static u64 length(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

static void print(const char *s) { hc_console_write((long)s, length(s)); }

#define PT_BASE   0x1000000UL
#define DATA      0x1400000UL
#define ALIAS     0x40000000UL
#define UNMAPPED  0x80000000UL      /* mapped by neither the boot tables nor ours */
#define HV_PAGE   0x7000UL          /* hypervisor memory, mapped by the boot map but unreachable */
#define NONCANON  0x0000800000000000UL
#define P_RW      0x3UL
#define HUGE      0x80UL

void *guest_main_text(void);
static u64 ram_end;
static int checks, failures;
static char buf[64] __attribute__((aligned(32)));

static void print_num(long v)
{
    char out[24];
    int n = 0;
    u64 u = v < 0 ? -(u64)v : (u64)v;
    do out[n++] = '0' + u % 10; while (u /= 10);
    if (v < 0) out[n++] = '-';
    char rev[24];
    for (int i = 0; i < n; i++) rev[i] = out[n - 1 - i];
    rev[n] = 0;
    print(rev);
}

static void check(const char *what, long got, long want)
{
    checks++;
    if (got == want)
        return;
    failures++;
    print("FAIL "); print(what); print(": got "); print_num(got); print(" want "); print_num(want); print("\n");
}

static u64 *table(int i) { return (u64 *)(PT_BASE + i * 4096UL); }
static long set_pte(void *p, u64 v) { return hypercall(HC_SET_PTE, (long)p, v, 0); }

/* pml4 -> pdpt -> {pd_low: RAM identity with 2 MiB pages, pd_alias -> pt: ALIAS -> DATA}. */
static void build_tables(void)
{
    for (int t = 0; t < 5; t++)
        for (int i = 0; i < 512; i++)
            table(t)[i] = 0;
    for (u64 i = 0; i < ram_end >> 21; i++)
        set_pte(&table(2)[i], (i << 21) | P_RW | HUGE);
    for (u64 i = 0; i < 16; i++)
        set_pte(&table(4)[i], (DATA + i * 4096) | P_RW);
    set_pte(&table(3)[0], (u64)table(4) | P_RW);
    set_pte(&table(1)[0], (u64)table(2) | P_RW);
    set_pte(&table(1)[1], (u64)table(3) | P_RW);
    set_pte(&table(0)[0], (u64)table(1) | P_RW);
}

struct __attribute__((packed)) dtr { u16 limit; u64 base; };

static void errors(void)
{
    u64 text = (u64)guest_main_text();
    check("console_write unmapped", hypercall(HC_CONSOLE_WRITE, UNMAPPED, 4, 0), -EFAULT);
    check("console_write hypervisor page", hypercall(HC_CONSOLE_WRITE, HV_PAGE, 4, 0), -EFAULT);
    check("console_write non-canonical", hypercall(HC_CONSOLE_WRITE, NONCANON, 4, 0), -EFAULT);
    check("console_write huge", hypercall(HC_CONSOLE_WRITE, (long)buf, 1L << 30, 0), -EINVAL);
    check("console_write empty", hypercall(HC_CONSOLE_WRITE, START_INFO, 0, 0), 0);

    check("set_pte unmapped", set_pte((void *)UNMAPPED, 0), -EFAULT);
    check("set_pte misaligned", set_pte((char *)table(0) + 4, 0), -EFAULT);
    check("set_pte into text", set_pte((void *)text, 0), -EFAULT);
    check("set_pte into start-info", set_pte((void *)START_INFO, 0), -EFAULT);
    check("set_pte frame beyond RAM (a hole)", set_pte(&table(4)[0], ram_end | P_RW), 0);
    check("set_pte reserved bits", set_pte(&table(4)[0], (1UL << 52) | DATA | P_RW), -EINVAL);

    build_tables();
    check("new_baseptr", hypercall(HC_NEW_BASEPTR, PT_BASE, 0, 0), 0);
    check("cr3 in shared page", SHARED(u64, SH_CR3), PT_BASE);
    check("table in hypervisor memory", set_pte(&table(3)[1], HV_PAGE | P_RW), -EPERM);
    check("table in text", set_pte(&table(3)[1], (text & ~0xfffUL) | P_RW), -EPERM);
    check("table in shared page", set_pte(&table(3)[1], SHARED_PAGE | P_RW), -EPERM);
    check("start-info mapped writable", set_pte(&table(4)[1], START_INFO | P_RW), -EPERM);
    check("start-info mapped read-only", set_pte(&table(4)[1], START_INFO | 1), 0);
    check("shared page mapped writable", set_pte(&table(4)[2], SHARED_PAGE | P_RW), 0);
    check("4K frame beyond RAM (a hole)", set_pte(&table(4)[3], ram_end | P_RW), 0);
    check("2M frame beyond RAM (a hole)", set_pte(&table(2)[ram_end >> 21], ram_end | P_RW | HUGE), 0);
    check("misaligned 2M page", set_pte(&table(2)[1], ((1UL << 21) + 0x2000) | P_RW | HUGE), -EINVAL);
    check("large page in PML4", set_pte(&table(0)[1], P_RW | HUGE), -EINVAL);
    check("table at two levels", set_pte(&table(1)[2], (u64)table(0) | P_RW), -EINVAL);
    check("reserved bits in live PT", set_pte(&table(4)[5], (1UL << 60) | DATA | P_RW), -EINVAL);
    check("invlpg non-canonical", hypercall(HC_INVLPG, NONCANON, 0, 0), -EINVAL);
    check("invlpg", hypercall(HC_INVLPG, ALIAS, 0, 0), 0);

    /* R9: text only ever at its own address, whether the entry is written live or found by a walk. */
    u64 text_page = text & ~0xfffUL, text_2m = text & ~0x1fffffUL;
    check("text mapped elsewhere", set_pte(&table(4)[6], text_page | 1), -EPERM);
    check("text in a 2M page elsewhere", set_pte(&table(3)[2], text_2m | 1 | HUGE), -EPERM);
    check("back to the boot tables", hypercall(HC_NEW_BASEPTR, BOOT_PML4, 0, 0), 0);
    table(4)[6] = text_page | 1;
    check("a hierarchy mapping text elsewhere", hypercall(HC_NEW_BASEPTR, PT_BASE, 0, 0), -EPERM);
    table(4)[6] = 0;
    check("the same hierarchy without it", hypercall(HC_NEW_BASEPTR, PT_BASE, 0, 0), 0);
    /* Away to a new root that maps the boot tables' view (walked), then back (kept, not walked). */
    for (int i = 0; i < 512; i++)
        table(5)[i] = i ? 0 : *(volatile u64 *)BOOT_PML4;
    check("away", hypercall(HC_NEW_BASEPTR, (long)table(5), 0, 0), 0);
    check("back, its validation kept", hypercall(HC_NEW_BASEPTR, PT_BASE, 0, 0), 0);
    check("text mapped elsewhere in a kept hierarchy", set_pte(&table(4)[6], text_page | 1), -EPERM);

    check("new_baseptr hypervisor memory", hypercall(HC_NEW_BASEPTR, HV_PAGE, 0, 0), -EPERM);
    check("new_baseptr beyond RAM", hypercall(HC_NEW_BASEPTR, ram_end, 0, 0), -EINVAL);
    check("new_baseptr low bits", hypercall(HC_NEW_BASEPTR, PT_BASE | 0x800, 0, 0), -EINVAL);
    check("new_baseptr text", hypercall(HC_NEW_BASEPTR, text & ~0xfffUL, 0, 0), -EPERM);
    check("cr3 unchanged", SHARED(u64, SH_CR3), PT_BASE);

    u64 cr0 = SHARED(u64, SH_CR0), cr4 = SHARED(u64, SH_CR4);
    check("write_cr 3", hypercall(HC_WRITE_CR, 3, 0, 0), -EINVAL);
    check("cr0 without paging", hypercall(HC_WRITE_CR, 0, cr0 & ~0x80000000UL, 0), -EINVAL);
    check("cr0 reserved bits", hypercall(HC_WRITE_CR, 0, cr0 | (1UL << 40), 0), -EINVAL);
    check("cr4 without PAE", hypercall(HC_WRITE_CR, 4, cr4 & ~0x20UL, 0), -EINVAL);
    check("cr0 unchanged", hypercall(HC_WRITE_CR, 0, cr0, 0), 0);

    static struct dtr d;
    check("set_gdt unmapped", hypercall(HC_SET_GDT, UNMAPPED, 0, 0), -EFAULT);
    d = (struct dtr){ 23, UNMAPPED };
    check("gdt base unmapped", hypercall(HC_SET_GDT, (long)&d, 0, 0), -EFAULT);
    d = (struct dtr){ 23, NONCANON };
    check("gdt base non-canonical", hypercall(HC_SET_GDT, (long)&d, 0, 0), -EINVAL);
    d = (struct dtr){ 23, 0x6000 };
    check("set_gdt boot gdt", hypercall(HC_SET_GDT, (long)&d, 0, 0), 0);
    d = (struct dtr){ 0x1000, (u64)buf };
    check("idt limit too large", hypercall(HC_SET_TRAP_TABLE, (long)&d, 0, 0), -EINVAL);
    check("set_trap_table non-canonical", hypercall(HC_SET_TRAP_TABLE, NONCANON, 0, 0), -EFAULT);
    d = (struct dtr){ 63, (u64)buf };
    check("set_trap_table", hypercall(HC_SET_TRAP_TABLE, (long)&d, 0, 0), 0);
    check("idtr in shared page", *(volatile u64 *)(SHARED_PAGE + SH_IDTR + 2), (long)buf);

    check("rdmsr unknown", hypercall(HC_RDMSR, 0xdead, 0, 0), -EINVAL);
    check("rdmsr 64-bit number", hypercall(HC_RDMSR, 1UL << 32, 0, 0), -EINVAL);
    check("wrmsr efer 0", hypercall(HC_WRMSR, 0xc0000080, 0, 0), -EINVAL);
    check("wrmsr unknown", hypercall(HC_WRMSR, 0xdead, 1, 0), -EINVAL);
    check("wrmsr fs base non-canonical", hypercall(HC_WRMSR, 0xc0000100, NONCANON, 0), -EINVAL);
    check("wrmsr kernel gs base", hypercall(HC_WRMSR, 0xc0000102, 0x1234, 0), 0);
    check("rdmsr kernel gs base", hypercall(HC_RDMSR, 0xc0000102, 0, 0), 0);
    check("rdmsr value", SHARED(u64, SH_HC_VALUE), 0x1234);

    check("cpuid unmapped", hypercall(HC_CPUID, 0, UNMAPPED, 0), -EFAULT);
    check("cpuid into text", hypercall(HC_CPUID, 0, text, 0), -EFAULT);
    check("cpuid into start-info", hypercall(HC_CPUID, 0, START_INFO, 0), -EFAULT);
    check("cpuid 64-bit leaf", hypercall(HC_CPUID, 1UL << 32, (long)buf, 0), -EINVAL);
    check("cpuid", hypercall(HC_CPUID, 0x40000000, (long)buf, 0), 0);
    check("cpuid hypervisor name", buf[4] == 'P' && buf[5] == 'V', 1);

    check("io_in size 3", hypercall(HC_IO_IN, 0x3f8, 3, 0), -EINVAL);
    check("io_in port", hypercall(HC_IO_IN, 0x10000, 1, 0), -EINVAL);
    check("io_out value too wide", hypercall(HC_IO_OUT, 0x80, 1, 0x100), -EINVAL);
    check("io_out size 8", hypercall(HC_IO_OUT, 0x80, 8, 0), -EINVAL);
    check("io_in unclaimed port", hypercall(HC_IO_IN, 0x80, 1, 0), 0xff);

    volatile struct pv_mc_entry *q = (struct pv_mc_entry *)(SHARED_PAGE + SH_MC_ENTRIES);
    SHARED(u32, SH_MC_COUNT) = MC_MAX + 1;
    check("multicall too many", hypercall(HC_MULTICALL, 0, 0, 0), -EINVAL);
    q[0] = (struct pv_mc_entry){ HC_CONSOLE_WRITE, (u64)buf, 1, 0, 7 };
    q[1] = (struct pv_mc_entry){ HC_SET_PTE, UNMAPPED, 0, 0, 7 };
    q[2] = (struct pv_mc_entry){ HC_IO_OUT, 0x80, 1, 0x55, 7 };
    q[3] = (struct pv_mc_entry){ HC_INVLPG, NONCANON, 0, 0, 7 };
    q[4] = (struct pv_mc_entry){ HC_SET_PTE, (u64)&table(4)[0], DATA | P_RW, 0, 7 };
    SHARED(u32, SH_MC_COUNT) = 5;
    check("multicall", hypercall(HC_MULTICALL, 0, 0, 0), 5);
    check("multicall not batchable", q[0].result, -EINVAL);
    check("multicall bad pointer", q[1].result, -EFAULT);
    check("multicall io_out", q[2].result, 0);
    check("multicall bad invlpg", q[3].result, -EINVAL);
    check("multicall set_pte", q[4].result, 0);
    check("multicall emptied", SHARED(u32, SH_MC_COUNT), 0);

    check("event_check", hypercall(HC_EVENT_CHECK, 0, 0, 0), 0);
    check("set_timer cancel", hypercall(HC_SET_TIMER, 0, 0, 0), 0);
    check("wbinvd", hypercall(HC_WBINVD, 0, 0, 0), 0);
    long t0 = hypercall(HC_RDTSC, 0, 0, 0), t1 = hypercall(HC_RDTSC, 0, 0, 0);
    check("rdtsc increases", t1 > t0, 1);
}

static long paging(void)
{
    build_tables();
    if (hypercall(HC_NEW_BASEPTR, PT_BASE, 0, 0) || SHARED(u64, SH_CR3) != PT_BASE)
        return 1;
    volatile u64 *window = (u64 *)ALIAS, *frame = (u64 *)DATA;
    window[0] = 0x1234;
    if (frame[0] != 0x1234)
        return 2;
    /* Remap two pages in one multicall, then flush. */
    volatile struct pv_mc_entry *q = (struct pv_mc_entry *)(SHARED_PAGE + SH_MC_ENTRIES);
    q[0] = (struct pv_mc_entry){ HC_SET_PTE, (u64)&table(4)[0], (DATA + 0x10000) | P_RW, 0, 0 };
    q[1] = (struct pv_mc_entry){ HC_INVLPG, ALIAS, 0, 0, 0 };
    SHARED(u32, SH_MC_COUNT) = 2;
    if (hypercall(HC_MULTICALL, 0, 0, 0) != 2 || q[0].result || q[1].result)
        return 3;
    window[0] = 0x5678;
    if (((volatile u64 *)(DATA + 0x10000))[0] != 0x5678 || frame[0] != 0x1234)
        return 4;
    /* Back to the boot tables; the old hierarchy is no longer live, so plain stores work. */
    if (hypercall(HC_NEW_BASEPTR, BOOT_PML4, 0, 0))
        return 5;
    table(4)[0] = 0;
    print("paging ok\n");
    return 0;
}

static int eq(const char *a, const char *b)
{
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

#ifdef WITH_CLI
void sensitive(void) { __asm__ volatile("cli"); }
#endif

__attribute__((noinline)) long guest_main(const struct pv_start_info *si)
{
    const char *cmd = si->cmdline;
    ram_end = si->ram_bytes;
    if (eq(cmd, "errors")) {
        errors();
        print(failures ? "errors FAILED: " : "errors ok: ");
        print_num(checks);
        print(" checks\n");
        return failures;
    }
    if (eq(cmd, "paging"))
        return paging();
    if (eq(cmd, "pt-direct")) {
        build_tables();
        hypercall(HC_NEW_BASEPTR, PT_BASE, 0, 0);
        ((volatile u64 *)table(4))[5] = DATA | P_RW;
        return 0;
    }
    if (eq(cmd, "pt-alias")) {
        build_tables();
        hypercall(HC_NEW_BASEPTR, PT_BASE, 0, 0);
        /* Map the live PT page itself writable at ALIAS + 4 pages: accepted, but a store faults. */
        if (set_pte(&table(4)[4], (u64)table(4) | P_RW))
            return 1;
        hypercall(HC_INVLPG, ALIAS + 4 * 4096, 0, 0);
        ((volatile u64 *)(ALIAS + 4 * 4096))[5] = DATA | P_RW;
        return 0;
    }
    if (eq(cmd, "boot-pt")) {
        *(volatile u64 *)(BOOT_PML4 + 8) = 0x1000000 | P_RW;
        return 0;
    }
    if (eq(cmd, "exec-data")) {
        buf[0] = 0xc3;                                    /* ret */
        PV_CALL_MASKED(buf);
        return 0;
    }
    if (eq(cmd, "write-text")) {
        *(volatile u8 *)guest_main_text() = 0x90;
        return 0;
    }
    if (eq(cmd, "write-hypercall-page")) {
        *(volatile u8 *)hypercall_page = 0x90;
        return 0;
    }
    if (eq(cmd, "write-start-info")) {
        ((volatile struct pv_start_info *)START_INFO)->ram_bytes = 1UL << 40;
        return 0;
    }
    if (eq(cmd, "block")) {
        hypercall(HC_BLOCK, 0, 0, 0);
        return 0;
    }
    if (eq(cmd, "block-unmasked")) {
        SHARED(u8, SH_UPCALL_MASK) = 0;
        hypercall(HC_BLOCK, 0, 0, 0);
        return 0;
    }
    if (eq(cmd, "iret-bad")) {                                /* no interrupt frame at rsp */
        hypercall(HC_IRET, 0, 0, 0);
        return 0;
    }
    if (eq(cmd, "shutdown-wide")) {
        hypercall(HC_SHUTDOWN, 0x1234, 0, 0);                 /* only the low byte counts */
        return 1;
    }
    if (eq(cmd, "syscall")) {
        __asm__ volatile("syscall" ::: "rcx", "r11", "memory");
        return 0;
    }
    if (eq(cmd, "div0")) {
        volatile u64 zero = 0;
        return 10 / zero;
    }
    if (eq(cmd, "ud2"))
        __builtin_trap();
    if (eq(cmd, "unmapped"))
        return *(volatile u64 *)UNMAPPED;
    if (eq(cmd, "loop"))
        for (;;)
            hypercall(HC_WBINVD, 0, 0, 0);
    if (eq(cmd, "spin"))
        for (;;)
            __asm__ volatile("");
    print("unknown scenario\n");
    return 99;
}

void *guest_main_text(void) { return (void *)guest_main; }
