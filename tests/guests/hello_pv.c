/* A paravirtualized guest written in C from the PV ABI (docs/abi.md): prints a
 * line through the console_write hypercall, another through the UART with
 * io_out, checks the start-info page, and shuts down with status 7.
 *
 * Build (from tests/guests/):
 *   gcc -ffreestanding -nostdlib -static -no-pie -O2 -g -mno-red-zone -fno-pic \
 *       -fno-stack-protector -fcf-protection=none -Wl,-T,guest.ld -Wl,--build-id=none \
 *       -o hello_pv.elf hello_pv.c
 * Run:
 *   python -m pvtool run hello_pv.elf        # prints two lines, exits with status 7
 */
#include "pv.h"

static void uart_puts(const char *s)
{
    for (; *s; s++) {
        while (!(hypercall(HC_IO_IN, 0x3fd, 1, 0) & 0x20))   /* LSR: transmitter empty */
            ;
        hypercall_at(hypercall_page + HC_IO_OUT * HYPERCALL_STRIDE, HC_IO_OUT, 0x3f8, 1, (u8)*s, 0, 0);
    }
}

long guest_main(const struct start_info *si)
{
    if (si->magic != 0x0054524154535650UL || si->abi_version != 1 || !(si->flags & 1))
        return 1;
    if (si->hypercall_page != (u64)hypercall_page || !SHARED(u8, SH_UPCALL_MASK))
        return 2;
    print("hello from a C paravirtual guest\n");
    uart_puts("and hello through the virtual UART\n");
    return 7;
}
