// Open-addressing tables on 64-bit keys (linear probing, any capacity, fast range reduction).
//
// * BlockTable: content hash -> 32-bit holder code.  Deleted entries become tombstones, so a
//   live entry never moves between rehashes: the per-worker alias maps store its slot number
//   (4 bytes) instead of the 8-byte content hash, and a rehash remaps them (KVCore::grow).
// * AliasMap: engine hash -> block slot, deleted by backward shift (nothing points into it).
//
// Both keep a slot's key and value packed together (12 bytes, one cache miss a probe) and grow
// by 1.3x when live + tombstones exceed 85% of the slots (memory first: 12 B / ~0.75 a key).
#pragma once
#include <cstdint>
#include <cstring>
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
static inline size_t home_of(uint64_t key, size_t cap) {
    return (size_t)(((__uint128_t)mix64(key) * cap) >> 64);
}

constexpr uint32_t EMPTY = 0xFFFFFFFFu;
constexpr uint32_t TOMB = 0xFFFFFFFEu;
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
        if (n) __builtin_prefetch(&s[home_of(k, n)]);
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

// content hash -> holder code; tombstones keep live slots in place.
struct BlockTable {
    std::vector<Slot> s;
    size_t size = 0;
    size_t tombs = 0;

    size_t cap() const { return s.size(); }
    inline long find(uint64_t k) const {
        size_t n = s.size();
        if (!n) return -1;
        size_t i = home_of(k, n);
        while (true) {
            uint32_t v = s[i].val;
            if (v == EMPTY) return -1;
            if (v != TOMB && s[i].key == k) return (long)i;
            if (++i == n) i = 0;
        }
    }
    inline void prefetch(uint64_t k) const {
        size_t n = s.size();
        if (!n) return;
        size_t i = home_of(k, n);
        __builtin_prefetch(&s[i]);
    }
    bool needs_rehash() const { return (double)(size + tombs + 1) > MAX_LOAD * (double)cap(); }
    // Place a key known to be absent (no rehash): returns its slot.
    inline size_t place(uint64_t k, uint32_t v) {
        size_t n = s.size();
        size_t i = home_of(k, n);
        while (s[i].val != EMPTY && s[i].val != TOMB) {
            if (++i == n) i = 0;
        }
        if (s[i].val == TOMB) tombs--;
        s[i].key = k;
        s[i].val = v;
        size++;
        return i;
    }
    // Rebuild at ncap; fills remap[old slot] = new slot for live slots.
    void rehash(size_t ncap, std::vector<uint32_t>& remap) {
        std::vector<Slot> old;
        old.swap(s);
        s.assign(ncap, Slot{0, EMPTY});
        remap.assign(old.size(), EMPTY);
        size = 0;
        tombs = 0;
        for (size_t j = 0; j < old.size(); j++) {
            if (j + 16 < old.size()) __builtin_prefetch(&s[home_of(old[j + 16].key, ncap)]);
            if (old[j].val != EMPTY && old[j].val != TOMB) remap[j] = (uint32_t)place(old[j].key, old[j].val);
        }
    }
    void erase_at(size_t i) {
        s[i].val = TOMB;
        size--;
        tombs++;
    }
    size_t bytes() const { return s.capacity() * sizeof(Slot); }
};

}  // namespace kvcore
