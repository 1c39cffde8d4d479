/* A freestanding start and console for the C benchmark kernels, so gcc's
 * code runs on the pvtool runtime (bare mode) exactly as a PVK kernel does:
 * entered at _start in 64-bit mode with a stack, console on the 16550 UART,
 * exit status to the debug-exit port 0xf4.  Same algorithms as kernels/. */
#ifndef RT_H
#define RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc_(u8 c) {
    while ((inb(0x3fd) & 0x20) == 0)
        __asm__ volatile("pause");
    outb(0x3f8, c);
}

static void puts_(const char *s) {
    while (*s)
        putc_((u8)*s++);
}

static void put_dec(u64 v) {
    char d[20];
    int n = 0;
    do { d[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n)
        putc_((u8)d[--n]);
}

static void put_hex(u64 v) {
    puts_("0x");
    int started = 0;
    for (int shift = 60; shift >= 0; shift -= 4) {
        int d = (int)((v >> shift) & 0xf);
        if (d || started || shift == 0) {
            started = 1;
            putc_((u8)(d < 10 ? '0' + d : 'a' + d - 10));
        }
    }
}

u64 kmain(void);

__attribute__((noreturn, used)) static void start_c(void) {
    u64 status = kmain();
    outb(0xf4, (u8)status);
    for (;;)
        __asm__ volatile("cli; hlt");
}

__asm__(".globl _start\n_start:\n  lea stack_top(%rip), %rsp\n  call start_c\n");
static u8 stack[65536] __attribute__((aligned(16), used));
__asm__(".set stack_top, stack + 65536\n");

#endif
