/* kernels/sort.pvk in C. */
#include "rt.h"
#define N 200000
static u32 data[N];

static void sift_down(u32 *a, u64 start, u64 end) {
    u64 root = start;
    while (root * 2 + 1 < end) {
        u64 child = root * 2 + 1;
        if (child + 1 < end && a[child] < a[child + 1])
            child++;
        if (a[root] >= a[child])
            return;
        u32 t = a[root]; a[root] = a[child]; a[child] = t;
        root = child;
    }
}

static void heapsort(u32 *a, u64 n) {
    for (u64 start = n / 2; start > 0;)
        sift_down(a, --start, n);
    for (u64 end = n; end > 1;) {
        end--;
        u32 t = a[0]; a[0] = a[end]; a[end] = t;
        sift_down(a, 0, end);
    }
}

u64 kmain(void) {
    u32 x = 2463534242u;
    for (u64 i = 0; i < N; i++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        data[i] = x;
    }
    heapsort(data, N);
    u64 sum = 0;
    for (u64 i = 0; i < N; i++) {
        if (i > 0 && data[i - 1] > data[i]) {
            puts_("not sorted\n");
            return 1;
        }
        sum += (u64)data[i] * (i + 1);
    }
    puts_("sorted "); put_dec(N); puts_(" values\n");
    puts_("min: "); put_dec(data[0]);
    puts_("\nmax: "); put_dec(data[N - 1]);
    puts_("\nweighted sum: "); put_dec(sum);
    puts_("\n");
    return 0;
}
