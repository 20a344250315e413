/* The deterministic device-memory arena.
 *
 * One virtual-address reservation at a fixed base; a forward-only cursor hands out segments; each segment gets
 * its own physical allocation, mapped on demand. Virtual addresses are never reused, so the address of every
 * segment is a pure function of the sequence of segment sizes asked for — the same in a SAVE and a LOAD process.
 *
 * PyTorch reaches this through CUDAPluggableAllocator (foundry_arena_malloc_<pool> / foundry_arena_free), under a
 * torch.cuda.MemPool, so its caching allocator still splits and caches blocks inside our segments.
 *
 * Every segment handed out or given back is appended to a trace (op, pool, offset, size): SAVE stores it, LOAD
 * compares its own trace with it before rebuilding anything (see foundry_core/layout.py).
 */
#include "driver.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

typedef struct {
    CUdeviceptr addr;
    size_t size;
    CUmemGenericAllocationHandle handle;
    uint8_t pool;
} Chunk;

/* One trace record; mirrored by foundry_core.layout.TRACE_DTYPE (16 bytes, little-endian). */
enum { TRACE_ALLOC = 1, TRACE_FREE = 2, TRACE_MAP = 3 };
typedef struct {
    uint8_t op;
    uint8_t pool; /* 0 init, 1 warmup, 2 graphs, 3 raw (LOAD's capture region), 255 unnamed */
    uint16_t reserved;
    uint32_t granules; /* size in units of the arena granularity */
    uint64_t offset;   /* from the arena base */
} TraceEvent;
_Static_assert(sizeof(TraceEvent) == 16, "TraceEvent must match foundry_core.layout.TRACE_DTYPE");

static struct {
    int ready;
    int device;
    CUdeviceptr base;
    size_t size;
    size_t granularity;
    size_t cursor; /* offset from base */
    Chunk *chunks;
    size_t nchunks, cap;
    TraceEvent *trace;
    size_t ntrace, trace_cap;
    pthread_mutex_t mu;
    char err[512];
} A = {.mu = PTHREAD_MUTEX_INITIALIZER};

#define SET_ERROR(...) snprintf(A.err, sizeof A.err, __VA_ARGS__)
#define FAIL(...) (SET_ERROR(__VA_ARGS__), -1)

const char *foundry_arena_error(void) { return A.err; }

static size_t round_up(size_t x, size_t g) { return (x + g - 1) / g * g; }

/* Reserve [base, base+size) on `device`. Returns 0, or -1 with the reason in foundry_arena_error(); *got receives
 * the address the driver offered (0 if none) so the caller can name what holds the range. */
int foundry_arena_init(uint64_t base, uint64_t size, int device, uint64_t *got) {
    *got = 0;
    pthread_mutex_lock(&A.mu);
    if (A.ready) {
        int same = (A.base == base && A.size == size && A.device == device);
        pthread_mutex_unlock(&A.mu);
        return same ? 0 : FAIL("arena already initialised at 0x%llx+0x%zx", (unsigned long long)A.base, A.size);
    }
    if (foundry_driver_load(A.err, sizeof A.err)) { pthread_mutex_unlock(&A.mu); return -1; }
    CUresult r;
    CUdevice dev;
    CUcontext ctx;
    if ((r = p_cuInit(0)) || (r = p_cuDeviceGet(&dev, device)) || (r = p_cuDevicePrimaryCtxRetain(&ctx, dev)) ||
        (r = p_cuCtxSetCurrent(ctx))) {
        pthread_mutex_unlock(&A.mu);
        return FAIL("CUDA init on device %d failed: %s", device, foundry_cu_error_name(r));
    }
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    size_t gran = 0;
    if ((r = p_cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)) || !gran) {
        pthread_mutex_unlock(&A.mu);
        return FAIL("cuMemGetAllocationGranularity failed: %s", foundry_cu_error_name(r));
    }
    if (base % gran || size % gran) {
        pthread_mutex_unlock(&A.mu);
        return FAIL("arena base 0x%llx and size 0x%llx must be multiples of the granularity 0x%zx",
                    (unsigned long long)base, (unsigned long long)size, gran);
    }
    CUdeviceptr ptr = 0;
    r = p_cuMemAddressReserve(&ptr, size, gran, (CUdeviceptr)base, 0);
    if (r != CUDA_SUCCESS) {
        pthread_mutex_unlock(&A.mu);
        return FAIL("cuMemAddressReserve(0x%llx, 0x%llx) failed: %s", (unsigned long long)base,
                    (unsigned long long)size, foundry_cu_error_name(r));
    }
    if (ptr != (CUdeviceptr)base) {
        *got = ptr;
        p_cuMemAddressFree(ptr, size);
        pthread_mutex_unlock(&A.mu);
        return FAIL("address range 0x%llx-0x%llx is not free (the driver offered 0x%llx)", (unsigned long long)base,
                    (unsigned long long)(base + size), (unsigned long long)ptr);
    }
    A.base = ptr;
    A.size = size;
    A.device = device;
    A.granularity = gran;
    A.cursor = 0;
    A.ready = 1;
    pthread_mutex_unlock(&A.mu);
    return 0;
}

static int push_chunk(Chunk c) {
    if (A.nchunks == A.cap) {
        size_t cap = A.cap ? A.cap * 2 : 256;
        Chunk *n = realloc(A.chunks, cap * sizeof(Chunk));
        if (!n) return -1;
        A.chunks = n;
        A.cap = cap;
    }
    A.chunks[A.nchunks++] = c;
    return 0;
}

/* Caller holds the lock. A trace that cannot grow is marked by a record with op 0 (LOAD then refuses). */
static void trace_locked(uint8_t op, uint8_t pool, size_t offset, size_t size) {
    if (A.ntrace == A.trace_cap) {
        size_t cap = A.trace_cap ? A.trace_cap * 2 : 1024;
        TraceEvent *n = realloc(A.trace, cap * sizeof(TraceEvent));
        if (!n) {
            if (A.ntrace) A.trace[A.ntrace - 1].op = 0;
            return;
        }
        A.trace = n;
        A.trace_cap = cap;
    }
    TraceEvent e = {op, pool, 0, (uint32_t)(size / A.granularity), (uint64_t)offset};
    A.trace[A.ntrace++] = e;
}

/* Map physical memory at [addr, addr+size); caller holds the lock. */
static int map_locked(CUdeviceptr addr, size_t size, uint8_t pool) {
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = A.device;
    CUmemGenericAllocationHandle h;
    CUresult r = p_cuMemCreate(&h, size, &prop, 0);
    if (r != CUDA_SUCCESS) return FAIL("cuMemCreate(%zu bytes) failed: %s", size, foundry_cu_error_name(r));
    if ((r = p_cuMemMap(addr, size, 0, h, 0)) != CUDA_SUCCESS) {
        p_cuMemRelease(h);
        return FAIL("cuMemMap at 0x%llx failed: %s", (unsigned long long)addr, foundry_cu_error_name(r));
    }
    CUmemAccessDesc acc;
    memset(&acc, 0, sizeof acc);
    acc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    acc.location.id = A.device;
    acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if ((r = p_cuMemSetAccess(addr, size, &acc, 1)) != CUDA_SUCCESS) {
        p_cuMemUnmap(addr, size);
        p_cuMemRelease(h);
        return FAIL("cuMemSetAccess at 0x%llx failed: %s", (unsigned long long)addr, foundry_cu_error_name(r));
    }
    Chunk c = {addr, size, h, pool};
    if (push_chunk(c)) {
        p_cuMemUnmap(addr, size);
        p_cuMemRelease(h);
        return FAIL("out of host memory for the chunk table");
    }
    return 0;
}

/* PyTorch CUDAPluggableAllocator entry points: one malloc per pool so the trace knows which pool asked. */
static void *arena_malloc(ssize_t size, int device, uint8_t pool) {
    void *out = NULL;
    pthread_mutex_lock(&A.mu);
    if (!A.ready) {
        SET_ERROR("arena used before foundry_arena_init");
    } else if (device != A.device) {
        SET_ERROR("allocation on device %d but the arena lives on device %d", device, A.device);
    } else if (size > 0) {
        size_t bytes = round_up((size_t)size, A.granularity);
        if (A.cursor + bytes > A.size) {
            SET_ERROR("arena exhausted: %zu bytes asked, %zu of %zu used", bytes, A.cursor, A.size);
        } else if (map_locked(A.base + A.cursor, bytes, pool) == 0) {
            out = (void *)(A.base + A.cursor);
            trace_locked(TRACE_ALLOC, pool, A.cursor, bytes);
            A.cursor += bytes;
        }
    }
    pthread_mutex_unlock(&A.mu);
    return out;
}

void *foundry_arena_malloc(ssize_t size, int device, void *stream) { (void)stream; return arena_malloc(size, device, 255); }
void *foundry_arena_malloc_init(ssize_t size, int device, void *stream) { (void)stream; return arena_malloc(size, device, 0); }
void *foundry_arena_malloc_warmup(ssize_t size, int device, void *stream) {
    (void)stream;
    return arena_malloc(size, device, 1);
}
void *foundry_arena_malloc_graphs(ssize_t size, int device, void *stream) {
    (void)stream;
    return arena_malloc(size, device, 2);
}

void foundry_arena_free(void *ptr, ssize_t size, int device, void *stream) {
    (void)size, (void)device, (void)stream;
    pthread_mutex_lock(&A.mu);
    for (size_t i = 0; i < A.nchunks; i++) {
        if (A.chunks[i].addr == (CUdeviceptr)ptr) {
            trace_locked(TRACE_FREE, A.chunks[i].pool, A.chunks[i].addr - A.base, A.chunks[i].size);
            p_cuMemUnmap(A.chunks[i].addr, A.chunks[i].size);
            p_cuMemRelease(A.chunks[i].handle);
            A.chunks[i] = A.chunks[--A.nchunks]; /* the virtual range stays consumed: never reused */
            break;
        }
    }
    pthread_mutex_unlock(&A.mu);
}

/* LOAD: map [base+offset, base+offset+size) outside PyTorch and move the cursor past it if needed. */
int foundry_arena_map(uint64_t offset, uint64_t size) {
    pthread_mutex_lock(&A.mu);
    int rc;
    if (!A.ready) rc = FAIL("arena not initialised");
    else if (offset % A.granularity || size % A.granularity || offset + size > A.size)
        rc = FAIL("bad raw mapping 0x%llx+0x%llx", (unsigned long long)offset, (unsigned long long)size);
    else if (offset < A.cursor)
        rc = FAIL("raw mapping at offset 0x%llx overlaps memory already handed out (cursor 0x%zx): the allocation "
                  "sequence before capture differs from SAVE", (unsigned long long)offset, A.cursor);
    else {
        rc = map_locked(A.base + offset, size, 3);
        if (rc == 0) {
            trace_locked(TRACE_MAP, 3, offset, size);
            A.cursor = offset + size;
        }
    }
    pthread_mutex_unlock(&A.mu);
    return rc;
}

uint64_t foundry_arena_base(void) { return A.base; }
uint64_t foundry_arena_size(void) { return A.size; }
uint64_t foundry_arena_granularity(void) { return A.granularity; }

uint64_t foundry_arena_cursor(void) {
    pthread_mutex_lock(&A.mu);
    uint64_t c = A.cursor;
    pthread_mutex_unlock(&A.mu);
    return c;
}

/* Skip forward (never back) so that later segments land where they did in SAVE. */
int foundry_arena_advance(uint64_t offset) {
    pthread_mutex_lock(&A.mu);
    int rc = 0;
    if (offset < A.cursor || offset > A.size || offset % A.granularity)
        rc = FAIL("cannot move the arena cursor from 0x%zx to 0x%llx", A.cursor, (unsigned long long)offset);
    else
        A.cursor = offset;
    pthread_mutex_unlock(&A.mu);
    return rc;
}

/* The allocation trace: number of records, and a copy of records [start, start+n) into dst (returns how many). */
uint64_t foundry_arena_trace_len(void) {
    pthread_mutex_lock(&A.mu);
    uint64_t n = A.ntrace;
    pthread_mutex_unlock(&A.mu);
    return n;
}

uint64_t foundry_arena_trace_copy(void *dst, uint64_t start, uint64_t n) {
    pthread_mutex_lock(&A.mu);
    if (start > A.ntrace) start = A.ntrace;
    if (n > A.ntrace - start) n = A.ntrace - start;
    if (n) memcpy(dst, A.trace + start, n * sizeof(TraceEvent));
    pthread_mutex_unlock(&A.mu);
    return n;
}
