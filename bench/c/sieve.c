/* kernels/sieve.pvk in C. */
#include "rt.h"
#define N 1000000
static u8 composite[N];

u64 kmain(void) {
    u64 count = 0, largest = 0;
    for (u64 i = 2; i < N; i++) {
        if (composite[i] == 0) {
            count++;
            largest = i;
            for (u64 j = i * i; j < N; j += i)
                composite[j] = 1;
        }
    }
    puts_("primes below 1000000: "); put_dec(count); puts_("\n");
    puts_("largest: "); put_dec(largest); puts_("\n");
    return 0;
}
