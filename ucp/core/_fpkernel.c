/* The inner loop of ucp's tensor fingerprints (ucp/core/_fingerprint.py): for an m x k block of
 * element bit patterns (rows `stride` elements apart, columns contiguous),
 *
 *     sum over i < m of  rw[i] * (sum over j < k of  cols[j] * g(b[i][j]))   (mod 2**64)
 *
 * where g sign-extends an element to 64 bits (8-byte elements: their high half folded into the
 * low one, x ^ (x >> 32)). uint64 arithmetic wraps modulo 2**64 by definition. Compiled on first
 * use by ucp.core._fpkernel; the numpy code in _fingerprint.py computes the same sums without it.
 * On x86-64, gcc builds one copy per instruction set and picks at load time (x86-64-v4's AVX-512DQ
 * has a 64-bit multiply), so a cached build runs on any x86-64 machine; a compiler that does not
 * know these targets builds it plainly (-DUCP_NO_CLONES). */
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(UCP_NO_CLONES)
#define UCP_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define UCP_CLONES
#endif

#define UCP_ROWS(NAME, TYPE, G)                                                               \
    UCP_CLONES uint64_t NAME(const TYPE *b, ptrdiff_t stride, size_t m, size_t k,            \
                             const uint64_t *cols, const uint64_t *rw) {                     \
        uint64_t total = 0;                                                                   \
        for (size_t i = 0; i < m; i++) {                                                      \
            const TYPE *row = b + (ptrdiff_t)i * stride;                                      \
            uint64_t s = 0;                                                                   \
            for (size_t j = 0; j < k; j++) {                                                  \
                uint64_t x = (uint64_t)(int64_t)row[j];                                       \
                s += cols[j] * (G);                                                           \
            }                                                                                 \
            total += rw[i] * s;                                                               \
        }                                                                                     \
        return total;                                                                         \
    }

UCP_ROWS(ucp_rows_1, int8_t, x)
UCP_ROWS(ucp_rows_2, int16_t, x)
UCP_ROWS(ucp_rows_4, int32_t, x)
UCP_ROWS(ucp_rows_8, int64_t, x ^ (x >> 32))

/* The version of this file's formula and entry points (checked on loading). */
int ucp_fpkernel_version(void) { return 1; }
