/* x86-64-v2/v3 code for the Linux-on-the-interpreter test (tests/linux_isa.rs):
 * built static with gcc -O3 -march=x86-64-v2 or -march=x86-64-v3, run on the
 * host and inside the guest; the printed line must be the same. Vectorised
 * loops (SSE4.1/AVX2, FMA contraction under v3), popcount, CRC32, an FMA dot
 * product and glibc's string functions (whose SSE4.2/AVX2 variants glibc
 * picks from CPUID). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#ifdef __SSE4_2__
#include <nmmintrin.h>
#endif

#define N 4096

static uint32_t state = 2463534242u;
static uint32_t next(void)
{
    state ^= state << 13;
    state ^= state >> 17;
    state ^= state << 5;
    return state;
}

static float a[N], b[N], c[N];
static int32_t ia[N], ib[N];
static int16_t sa[N];
static uint8_t bytes[N];
static char text[1 << 16];

int main(void)
{
    for (int i = 0; i < N; i++) {
        a[i] = (float)(next() % 100000) / 7.0f - 5000.0f;
        b[i] = (float)(next() % 100000) / 13.0f;
        c[i] = (float)(next() % 1000) / 3.0f;
        ia[i] = (int32_t)next();
        ib[i] = (int32_t)next();
        sa[i] = (int16_t)next();
        bytes[i] = (uint8_t)next();
    }
    /* Vectorised floating point (FMA-contracted under -march=x86-64-v3). */
    for (int i = 0; i < N; i++)
        c[i] = a[i] * b[i] + c[i] * 0.5f;
    float fmin = c[0], fmax = c[0];
    for (int i = 0; i < N; i++) {
        fmin = c[i] < fmin ? c[i] : fmin;
        fmax = c[i] > fmax ? c[i] : fmax;
    }
    /* Vectorised integer loops: multiplies, shifts, min/max, saturation. */
    int64_t isum = 0;
    for (int i = 0; i < N; i++)
        isum += (int64_t)(ia[i] >> 3) * (ib[i] & 0xfff);
    int32_t imax = ia[0];
    for (int i = 0; i < N; i++)
        imax = ia[i] > imax ? ia[i] : imax;
    uint32_t bsum = 0;
    for (int i = 0; i < N; i++)
        bsum += bytes[i] > 128 ? bytes[i] - 128 : 0;
    int32_t ssum = 0;
    for (int i = 0; i < N; i++)
        ssum += sa[i] * sa[(i * 7) % N];
    /* An FMA dot product (libm's fma, or the instruction). */
    double dot = 0.0;
    for (int i = 0; i < N; i++)
        dot = fma((double)a[i], (double)b[i], dot);
    /* popcount. */
    unsigned pc = 0;
    for (int i = 0; i < N; i++)
        pc += __builtin_popcount((unsigned)ia[i]) +
              __builtin_popcountll(((uint64_t)(uint32_t)ia[i] << 32) | (uint32_t)ib[i]);
    /* CRC32C (SSE4.2). */
    uint64_t crc = ~0u;
#ifdef __SSE4_2__
    for (int i = 0; i < N; i += 2)
        crc = _mm_crc32_u64(crc, ((uint64_t)(uint32_t)ia[i] << 32) | (uint32_t)ia[i + 1]);
    for (int i = 0; i < N; i++)
        crc = _mm_crc32_u8((uint32_t)crc, bytes[i]);
#endif
    /* glibc's string functions over 64 KiB. */
    for (size_t i = 0; i < sizeof text - 1; i++)
        text[i] = (char)('a' + next() % 20);
    text[sizeof text - 1] = 0;
    memcpy(text + 60001, "needle-in-haystack", 18);
    text[40007] = 'z';
    size_t len = strlen(text);
    const char *found = strstr(text, "needle-in-haystack");
    const char *z = memchr(text, 'z', len);
    const char *zr = strrchr(text, 'z');
    int cmp = memcmp(text + 100, text + 101, 3000);
    size_t span = strspn(text, "abcdefghij");
    size_t cspan = strcspn(text, "xyz");
    char copy[256];
    strcpy(copy, text + 1000 - 1000 + (sizeof text - 200));
    printf("fmin=%a fmax=%a c7=%a isum=%lld imax=%d bsum=%u ssum=%d dot=%a pc=%u crc=%08llx "
           "len=%zu strstr=%td memchr=%td strrchr=%td memcmp=%d strspn=%zu strcspn=%zu "
           "copy=%zu\n",
           fmin, fmax, c[7], (long long)isum, imax, bsum, ssum, dot, pc,
           (unsigned long long)(uint32_t)crc, len, found - text, z - text, zr - text,
           cmp > 0 ? 1 : cmp < 0 ? -1 : 0, span, cspan, strlen(copy));
    return 0;
}
