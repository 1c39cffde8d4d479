/* A native guest for the bare and trap modes: real privileged instructions in
 * inline asm.  The start-info command line picks a scenario (see guest_main).
 *
 * Build (from tests/guests/):
 *   gcc -ffreestanding -nostdlib -static -no-pie -O2 -g -mno-red-zone -fno-pic \
 *       -fno-stack-protector -fcf-protection=none -Wl,-T,guest.ld -Wl,--build-id=none \
 *       -o native.elf native.c
 */
#include "native.h"

#define PT_BASE  0x1000000UL     /* 16 MiB: page-table pages */
#define DATA     0x1400000UL     /* 20 MiB: data frames */
#define ALIAS    0x40000000UL    /* 1 GiB: a window onto DATA */
#define P_RW     0x3UL
#define HUGE     0x80UL

static int eq(const char *a, const char *b)
{
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

static u64 *table(int i) { return (u64 *)(PT_BASE + i * 4096UL); }

/* Build 0..1 GiB identity (2 MiB pages) plus ALIAS -> DATA (4 KiB pages) with plain stores. */
static void build_tables(void)
{
    for (int t = 0; t < 5; t++)
        for (int i = 0; i < 512; i++)
            table(t)[i] = 0;
    for (u64 i = 0; i < 32; i++)                    /* 64 MiB of RAM */
        table(2)[i] = (i << 21) | P_RW | HUGE;
    for (u64 i = 0; i < 16; i++)
        table(4)[i] = (DATA + i * 4096) | P_RW;
    table(3)[0] = (u64)table(4) | P_RW;
    table(1)[0] = (u64)table(2) | P_RW;
    table(1)[1] = (u64)table(3) | P_RW;
    table(0)[0] = (u64)table(1) | P_RW;
}

static long paging(void)
{
    build_tables();
    write_cr3(PT_BASE);
    if (read_cr3() != PT_BASE)
        return 1;
    volatile u64 *window = (u64 *)ALIAS, *frame = (u64 *)DATA;
    window[0] = 0x1234;
    if (frame[0] != 0x1234)
        return 2;
    /* Remap with a store into the live page table (trap: trapped, validated, emulated). */
    ((volatile u64 *)table(4))[0] = (DATA + 0x10000) | P_RW;
    invlpg(ALIAS);
    window[0] = 0x5678;
    if (((volatile u64 *)(DATA + 0x10000))[0] != 0x5678 || frame[0] != 0x1234)
        return 3;
    print("paging ok\n");
    return 0;
}

struct __attribute__((packed)) dtr { u16 limit; u64 base; };
static u64 gdt[16];
static u64 idt[32];

static long sensitive(void)
{
    u32 r[4];
    cpuid(0, r);
    char vendor[13] = {0};
    *(u32 *)&vendor[0] = r[1]; *(u32 *)&vendor[4] = r[3]; *(u32 *)&vendor[8] = r[2];
    print("vendor "); print(vendor); print("\n");
    cpuid(0x40000000, r);
    char hv[13] = {0};
    *(u32 *)&hv[0] = r[1]; *(u32 *)&hv[4] = r[2]; *(u32 *)&hv[8] = r[3];
    print("hypervisor "); print(hv); print("\n");

    cli();
    u64 off = save_flags() & 0x200;
    sti();
    u64 on = save_flags() & 0x200;
    u64 f = save_flags();
    cli();
    restore_flags(f);
    u64 restored = save_flags() & 0x200;
    cli();
    if (off || !on || !restored)
        return 1;
    print("irqflags ok\n");

    struct dtr d;
    sgdt(&d);
    for (int i = 0; i < (d.limit + 1) / 8; i++)
        gdt[i] = ((u64 *)d.base)[i];
    struct dtr nd = { d.limit, (u64)gdt };
    lgdt(&nd);
    sgdt(&d);
    if (d.base != (u64)gdt || d.limit != nd.limit)
        return 2;
    struct dtr id = { sizeof idt - 1, (u64)idt };
    lidt(&id);
    sidt(&d);
    if (d.base != (u64)idt || d.limit != sizeof idt - 1)
        return 3;
    print("tables ok\n");

    u64 cr0 = read_cr0();
    if (!(cr0 & 1) || !(cr0 & 0x80000000) || !(read_cr4() & 0x20))
        return 4;
    write_cr0(cr0);
    wrmsr(0xc0000102, 0x123456789abcUL);
    if (rdmsr(0xc0000102) != 0x123456789abcUL)
        return 5;
    u64 t0 = rdtsc(), t1 = rdtsc();
    if (t1 <= t0)
        return 6;
    wbinvd();
    print("tsc "); print_hex(t1 - t0); print("\n");
    print("sensitive ok\n");
    return 0;
}

static long pic(void)
{
    outb(0x20, 0x11); outb(0x21, 0x20); outb(0x21, 0x04); outb(0x21, 0x01);   /* remap master to 0x20 */
    outb(0xa0, 0x11); outb(0xa1, 0x28); outb(0xa1, 0x02); outb(0xa1, 0x01);
    outb(0x21, 0xfb); outb(0xa1, 0xff);
    print("pic masks "); print_hex(inb(0x21)); print(" "); print_hex(inb(0xa1)); print("\n");
    outw(0x3f8 + 7, 0x41);                          /* scratch register, a 2-byte access */
    return inb(0x3ff) == 0x41 ? 0 : 1;
}

static long bad_pte(void)
{
    build_tables();
    write_cr3(PT_BASE);
    /* A 4 KiB leaf that maps the start-info page writable: refused. */
    ((volatile u64 *)table(4))[1] = 0x1000 | P_RW;
    return 0;
}

static long bad_cr3(void)
{
    build_tables();
    table(1)[2] = 0x7000 | P_RW;                    /* a "table" in hypervisor memory */
    write_cr3(PT_BASE);
    return 0;
}

long guest_main(const struct start_info *si)
{
    const char *cmd = si->cmdline;
    if (eq(cmd, "") || eq(cmd, "hello")) {
        print("hello from a native guest\n");
        return 0;
    }
    if (eq(cmd, "paging"))
        return paging();
    if (eq(cmd, "sensitive"))
        return sensitive();
    if (eq(cmd, "pic"))
        return pic();
    if (eq(cmd, "bad-pte"))
        return bad_pte();
    if (eq(cmd, "bad-cr3"))
        return bad_cr3();
    if (eq(cmd, "hole")) {
        /* Map the whole first GiB, beyond the end of RAM too, as paging.pvk does. */
        build_tables();
        for (u64 i = 0; i < 512; i++)
            table(2)[i] = (i << 21) | P_RW | HUGE;
        write_cr3(PT_BASE);
        print("cr3 ok\n");
        return *(volatile u64 *)(si->ram_bytes + 0x1000);
    }
    if (eq(cmd, "hlt")) {
        cli();
        hlt();
        return 0;
    }
    if (eq(cmd, "hlt-sti")) {
        sti();
        hlt();
        return 0;
    }
    if (eq(cmd, "cr0-nopg")) {
        write_cr0(read_cr0() & ~0x80000000UL);
        return 0;
    }
    if (eq(cmd, "loop"))
        for (;;)
            __asm__ volatile("");
    print("unknown scenario\n");
    return 99;
}
