/* kernels/checksum.pvk in C. */
#include "rt.h"
#define SIZE 1048576
static u8 buf[SIZE];

static void fill(void) {
    u32 x = 0x12345678;
    for (u64 i = 0; i < SIZE; i++) {
        x = x * 1664525u + 1013904223u;
        buf[i] = (u8)(x >> 24);
    }
}

static u32 adler32(void) {
    u32 a = 1, b = 0;
    for (u64 i = 0; i < SIZE; i++) {
        a = (a + buf[i]) % 65521;
        b = (b + a) % 65521;
    }
    return (b << 16) | a;
}

static u32 fnv1a(void) {
    u32 h = 0x811c9dc5u;
    for (u64 i = 0; i < SIZE; i++)
        h = (h ^ buf[i]) * 16777619u;
    return h;
}

u64 kmain(void) {
    fill();
    puts_("adler32: "); put_hex(adler32());
    puts_("\nfnv1a: "); put_hex(fnv1a());
    puts_("\n");
    return 0;
}
