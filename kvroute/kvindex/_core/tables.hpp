// Open-addressing tables on 64-bit keys (any capacity, fast range reduction).
//
// * BucketMap: the index's tables (KVCore: content hash -> holder code; per worker: engine hash ->
//   block slot).  64-byte buckets of 5 keys, 5 values and an overflow count (the keys stored
//   past this bucket whose probe passed through it), probed bucket by bucket from the key's
//   home: a search stops at the first bucket without overflow, so a miss (every new block is
//   one) reads one cache line at almost any load, and a slot never moves until a rehash -- no
//   tombstones, no backward shift: an erase clears the slot and decrements the counts on its
//   probe path.  The per-worker alias maps therefore store a block's slot number (4 bytes)
//   instead of its 8-byte content hash; a rehash of the block table remaps them (KVCore::grow).
//   Max load 0.93, growth 1.5x: 12.8 B a slot, load 0.62-0.93 between growths (on the
//   bench's 1M-entry build, growth 1.3x built ~20% slower; 2x averaged 36 B per entry).
// * AliasMap: key -> 32-bit value, linear probing with 12-byte slots, backward-shift deletion;
//   the speculative-prefix table (pending.hpp) keeps it.
#pragma once
#include <cstdint>
#include <cstring>
#include <sys/mman.h>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvcore {

static inline uint64_t mix64(uint64_t k) {  // murmur3's 64-bit finaliser: engine hashes may be sequential
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}
// A software prefetch the compiler cannot drop.  With __builtin_prefetch inside the tables'
// small prefetch() methods, GCC 12 at -O2 deleted the calls to those methods as side-effect
// free (its early dead-code elimination, -fdump-tree-cddce1), so KVCore::store and the match
// walk never prefetched; an asm volatile prefetch stays.
static inline void prefetch_line(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht0 %0" : : "m"(*(const char*)p));
#else
    __builtin_prefetch(p);
    asm volatile("" : : "r"(p) : "memory");
#endif
}
// Ask for transparent huge pages on the 2 MiB-aligned part of a large, not yet touched block:
// the block table is tens of MiB of random accesses, and every 4 KiB-page TLB miss costs a
// page walk (two-dimensional under a hypervisor), which a software prefetch does not hide.
static inline void huge_pages(void* p, size_t n) {
#ifdef MADV_HUGEPAGE
    constexpr uintptr_t H = 2u << 20;
    if (n < 2 * H) return;
    uintptr_t a = ((uintptr_t)p + H - 1) & ~(H - 1), e = ((uintptr_t)p + n) & ~(H - 1);
    if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}
static inline size_t home_of(uint64_t key, size_t cap) {
    return (size_t)(((__uint128_t)mix64(key) * cap) >> 64);
}

constexpr uint32_t EMPTY = 0xFFFFFFFFu;
constexpr double MAX_LOAD = 0.85;
constexpr double GROWTH = 1.3;  // load right after a growth: MAX_LOAD / GROWTH = 0.65

#pragma pack(push, 4)
struct Slot {
    uint64_t key;
    uint32_t val;
};
#pragma pack(pop)
static_assert(sizeof(Slot) == 12, "packed slot");

static inline size_t grown_capacity(size_t live) {
    size_t c = (size_t)((double)(live + 1) / MAX_LOAD * GROWTH) + 1;
    return c < 16 ? 16 : c;
}

// engine hash -> block slot; backward-shift deletion.
struct AliasMap {
    std::vector<Slot> s;
    size_t size = 0;

    size_t cap() const { return s.size(); }
    void clear() {
        std::vector<Slot>().swap(s);
        size = 0;
    }
    // slot of key, or -1
    inline long find(uint64_t k) const {
        size_t n = s.size();
        if (!n) return -1;
        size_t i = home_of(k, n);
        while (true) {
            uint32_t v = s[i].val;
            if (v == EMPTY) return -1;
            if (s[i].key == k) return (long)i;
            if (++i == n) i = 0;
        }
    }
    inline void prefetch(uint64_t k) const {
        size_t n = s.size();
        if (n) prefetch_line(&s[home_of(k, n)]);
    }
    inline uint32_t get(uint64_t k) const {  // EMPTY when absent
        long i = find(k);
        return i < 0 ? EMPTY : s[i].val;
    }
    void rehash(size_t ncap) {
        std::vector<Slot> old;
        old.swap(s);
        s.assign(ncap, Slot{0, EMPTY});
        for (size_t j = 0; j < old.size(); j++)
            if (old[j].val != EMPTY) place(old[j].key, old[j].val);
    }
    inline void place(uint64_t k, uint32_t v) {
        size_t n = s.size();
        size_t i = home_of(k, n);
        while (s[i].val != EMPTY) {
            if (++i == n) i = 0;
        }
        s[i].key = k;
        s[i].val = v;
    }
    // insert or overwrite
    void put(uint64_t k, uint32_t v) {
        long f = find(k);
        if (f >= 0) {
            s[f].val = v;
            return;
        }
        if ((double)(size + 1) > MAX_LOAD * (double)cap()) rehash(grown_capacity(size));
        place(k, v);
        size++;
    }
    void erase_at(size_t i) {
        size_t n = s.size();
        size_t j = i;
        while (true) {
            if (++j == n) j = 0;
            if (s[j].val == EMPTY) break;
            size_t h = home_of(s[j].key, n);
            bool stays = (i <= j) ? (i < h && h <= j) : (i < h || h <= j);
            if (stays) continue;
            s[i].key = s[j].key;
            s[i].val = s[j].val;
            i = j;
        }
        s[i].val = EMPTY;
        size--;
        if (size == 0 && n > 64) clear();
        else if (n > 64 && (double)size < 0.1 * (double)n) rehash(grown_capacity(size));
    }
    bool erase(uint64_t k) {
        long f = find(k);
        if (f < 0) return false;
        erase_at((size_t)f);
        return true;
    }
    size_t bytes() const { return s.capacity() * sizeof(Slot); }
};

constexpr int BSLOTS = 5;           // slots per bucket (5 x 12 B + a 4-byte count = one cache line)
#ifndef KV_BMAX_LOAD  // (overridable for experiments only)
#define KV_BMAX_LOAD 0.93
#define KV_BGROWTH 1.5
#endif
constexpr double BMAX_LOAD = KV_BMAX_LOAD;  // grow when live keys would exceed this share of the slots
constexpr double BGROWTH = KV_BGROWTH;      // load right after a growth: BMAX_LOAD / BGROWTH = 0.62

struct alignas(64) Bucket {
    uint64_t key[BSLOTS];  // keys of the used slots (stale in free ones)
    uint32_t val[BSLOTS];  // EMPTY: a free slot
    uint32_t over;         // keys stored in a later bucket whose probe passed through this one
};
static_assert(sizeof(Bucket) == 64, "one cache line a bucket");

// Slot capacity to rebuild at for `live` keys: room to grow by BGROWTH, at least one bucket.
static inline size_t bucket_capacity(size_t live) {
    size_t c = (size_t)((double)(live + 1) / BMAX_LOAD * BGROWTH) + 1;
    return c < BSLOTS ? BSLOTS : c;
}

// key -> 32-bit value in 5-slot buckets with overflow counts (see the file comment).  A slot
// number i is bucket i / 5, place i % 5, and stays the key's until erase_at or a rehash.
struct BucketMap {
    std::vector<Bucket> b;
    size_t size = 0;  // used slots

    size_t buckets() const { return b.size(); }
    size_t cap() const { return b.size() * BSLOTS; }
    void clear() {
        std::vector<Bucket>().swap(b);
        size = 0;
    }
    inline uint64_t key(size_t i) const { return b[i / BSLOTS].key[i % BSLOTS]; }
    inline uint32_t& val(size_t i) { return b[i / BSLOTS].val[i % BSLOTS]; }
    inline uint32_t val(size_t i) const { return b[i / BSLOTS].val[i % BSLOTS]; }
    inline size_t home(uint64_t k) const { return (size_t)(((__uint128_t)mix64(k) * b.size()) >> 64); }

    // slot of key, or -1
    inline long find(uint64_t k) const {
        size_t n = b.size();
        if (!n) return -1;
        size_t h = home(k);
        for (size_t steps = 0; steps < n; steps++) {
            const Bucket& B = b[h];
            unsigned m = 0;  // the used slots holding k, without a branch per slot
#pragma GCC unroll 5
            for (int j = 0; j < BSLOTS; j++) m |= (unsigned)(B.key[j] == k && B.val[j] != EMPTY) << j;
            if (m) return (long)(h * BSLOTS + (size_t)__builtin_ctz(m));
            if (!B.over) return -1;
            if (++h == n) h = 0;
        }
        return -1;
    }
    // The home bucket and the next one (read when the home bucket has overflowed: often near
    // the maximum load; measured 3-4% faster builds than the home bucket alone).
    inline void prefetch(uint64_t k) const {
        if (b.empty()) return;
        size_t h = home(k);
        prefetch_line(&b[h]);
        prefetch_line(&b[h + 1 == b.size() ? 0 : h + 1]);
    }
    inline uint32_t get(uint64_t k) const {  // EMPTY when absent
        long i = find(k);
        return i < 0 ? EMPTY : val((size_t)i);
    }
    bool needs_grow() const { return (double)(size + 1) > BMAX_LOAD * (double)cap(); }

    // Place a key known to be absent, without growing (room is the caller's check): its slot.
    inline size_t insert_new(uint64_t k, uint32_t v) {
        size_t n = b.size();
        size_t h = home(k);
        while (true) {
            Bucket& B = b[h];
            unsigned m = 0;  // free slots, without a branch per slot
#pragma GCC unroll 5
            for (int j = 0; j < BSLOTS; j++) m |= (unsigned)(B.val[j] == EMPTY) << j;
            if (m) {
                int j = __builtin_ctz(m);
                B.key[j] = k;
                B.val[j] = v;
                size++;
                return h * BSLOTS + (size_t)j;
            }
            B.over++;
            if (++h == n) h = 0;
        }
    }
    // Insert a key known to be absent, growing first if needed: its slot.
    inline size_t insert(uint64_t k, uint32_t v) {
        if (needs_grow()) rehash(bucket_capacity(size));
        return insert_new(k, v);
    }
    // insert or overwrite
    void put(uint64_t k, uint32_t v) {
        long f = find(k);
        if (f >= 0) val((size_t)f) = v;
        else insert(k, v);
    }

    // Rebuild with room for ncap slots; fills remap[old slot] = new slot for used slots (when given).
    void rehash(size_t ncap, std::vector<uint32_t>* remap = nullptr) {
        std::vector<Bucket> old;
        old.swap(b);
        size_t nb = (ncap + BSLOTS - 1) / BSLOTS;
        Bucket e;
        for (int j = 0; j < BSLOTS; j++) {
            e.key[j] = 0;
            e.val[j] = EMPTY;
        }
        e.over = 0;
        b.reserve(nb);
        huge_pages(b.data(), nb * sizeof(Bucket));
        b.assign(nb, e);
        if (remap) remap->assign(old.size() * BSLOTS, EMPTY);
        size = 0;
        // Homes are monotonic in mix64(key) (multiply-shift range reduction), so reading the old
        // buckets in order writes the new ones nearly in order: no random access to hide.  The
        // new table starts empty and nothing is erased meanwhile, so a bucket's used slots are a
        // prefix and its first free slot is its count of used ones.
        size_t n = b.size();
        for (size_t ob = 0; ob < old.size(); ob++) {
            if (ob + 16 < old.size()) prefetch_line(&old[ob + 16]);
            if (ob + 8 < old.size()) prefetch_line(&b[home(old[ob + 8].key[0])]);
            const Bucket& O = old[ob];
            for (int j = 0; j < BSLOTS; j++) {
                if (O.val[j] == EMPTY) continue;
                size_t h = home(O.key[j]);
                while (true) {
                    Bucket& B = b[h];
                    int used = 0;
                    for (int q = 0; q < BSLOTS; q++) used += B.val[q] != EMPTY;
                    if (used < BSLOTS) {
                        B.key[used] = O.key[j];
                        B.val[used] = O.val[j];
                        if (remap) (*remap)[ob * BSLOTS + j] = (uint32_t)(h * BSLOTS + used);
                        break;
                    }
                    B.over++;
                    if (++h == n) h = 0;
                }
                size++;
            }
        }
    }
    // Free slot i: the counts on its probe path go down (no tombstone; nothing else moves).
    void erase_at(size_t i) {
        size_t n = b.size();
        size_t p = i / BSLOTS;
        for (size_t h = home(key(i)); h != p;) {
            b[h].over--;
            if (++h == n) h = 0;
        }
        b[p].val[i % BSLOTS] = EMPTY;
        size--;
    }
    // Whether it is worth rebuilding smaller (after erases): under a tenth of the slots used.
    bool sparse() const { return cap() > 64 * BSLOTS && (double)size < 0.1 * (double)cap(); }
    bool erase(uint64_t k) {  // with shrinking: only for tables nothing points into
        long f = find(k);
        if (f < 0) return false;
        erase_at((size_t)f);
        if (size == 0) clear();
        else if (sparse()) rehash(bucket_capacity(size));
        return true;
    }
    // "" or what is wrong: every key found at its slot, counts equal to the probe paths crossing them.
    std::string check() const {
        size_t n = b.size(), used = 0;
        std::vector<uint32_t> over(n, 0);
        for (size_t i = 0; i < cap(); i++) {
            if (val(i) == EMPTY) continue;
            used++;
            for (size_t h = home(key(i)); h != i / BSLOTS;) {
                over[h]++;
                if (++h == n) h = 0;
            }
            if (find(key(i)) != (long)i) return "bucket probe path broken";
        }
        if (used != size) return "bucket table size counter drifted";
        for (size_t h = 0; h < n; h++)
            if (over[h] != b[h].over) return "bucket overflow count drifted";
        return "";
    }
    size_t bytes() const { return b.capacity() * sizeof(Bucket); }
};

}  // namespace kvcore
