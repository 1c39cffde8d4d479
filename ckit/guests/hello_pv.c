/* A paravirtualized guest written in C with the kit (docs/abi.md, "Writing a
 * guest in C"): prints a line through the console_write hypercall, another
 * through the UART with io_out, checks the start-info page, and shuts down
 * with status 7.
 *
 * Build (from the repository root):
 *   gcc -ffreestanding -nostdlib -static -no-pie -fno-pic -mno-red-zone \
 *       -fno-stack-protector -fcf-protection=none -fno-asynchronous-unwind-tables \
 *       -fno-jump-tables -O2 -g -Ickit -Wa,ckit/bundle.s \
 *       -Wl,-T,ckit/pvguest.ld -Wl,--build-id=none -Wl,-z,max-page-size=4096 \
 *       -o hello_pv.elf ckit/guests/hello_pv.c
 * Check and run:
 *   python -m pvtool check hello_pv.elf     # passes the code rules
 *   python -m pvtool run hello_pv.elf       # prints two lines, exits with status 7
 */
#define PVGUEST_MAIN
#include "pvguest.h"

static u64 length(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

static void print(const char *s) { hc_console_write((long)s, length(s)); }

static void uart_puts(const char *s)
{
    for (; *s; s++) {
        while (!(hc_io_in(0x3fd, 1) & 0x20))        /* LSR: transmitter empty */
            ;
        hc_io_out(0x3f8, 1, (u8)*s);
    }
}

long guest_main(const struct pv_start_info *si)
{
    if (si->magic != START_INFO_MAGIC || si->abi_version != ABI_VERSION || !(si->flags & 1))
        return 1;
    if (si->hypercall_page != (u64)hypercall_page || !PV_SHARED(u8, SH_UPCALL_MASK))
        return 2;
    print("hello from a C paravirtual guest\n");
    uart_puts("and hello through the virtual UART\n");
    return 7;
}
