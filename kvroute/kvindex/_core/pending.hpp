// Speculative prefixes of the compiled core: the same two-generation table as the Python
// reference kvroute.router.pending.PendingPrefixes (see its docstring), on open addressing:
// each generation maps a content hash to a record of W words, one bit per router slot
// (in SHARDS tables, see Generation).
#pragma once
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "tables.hpp"

namespace kvcore {

// A generation is split in SHARDS tables by the hash's low bits, each growing on its own: growing
// one rehashes 1/SHARDS of the entries, so no insert stalls for the whole table (a table of millions
// of entries took tens of ms to rehash, under the router's lock; issue 17).
constexpr size_t SHARDS = 256;

struct Generation {
    AliasMap map[SHARDS];                 // content hash -> record index in its shard
    std::vector<uint64_t> words[SHARDS];  // records of W words, per shard
    int64_t pairs = 0;                    // set (block, slot) bits

    static size_t shard(uint64_t h) { return (size_t)(h & (SHARDS - 1)); }
    void reset() {
        for (size_t k = 0; k < SHARDS; k++) {
            map[k].clear();
            std::vector<uint64_t>().swap(words[k]);
        }
        pairs = 0;
    }
    size_t keys() const {
        size_t n = 0;
        for (size_t k = 0; k < SHARDS; k++) n += map[k].size;
        return n;
    }
    const uint64_t* get(uint64_t h, size_t W) const {
        size_t k = shard(h);
        uint32_t r = map[k].get(h);
        return r == EMPTY ? nullptr : &words[k][(size_t)r * W];
    }
    // h's record, added (all zero) when absent
    uint64_t* record(uint64_t h, size_t W) {
        size_t k = shard(h);
        uint32_t r = map[k].get(h);
        if (r == EMPTY) {
            r = (uint32_t)(words[k].size() / W);
            words[k].resize(words[k].size() + W, 0);
            map[k].put(h, r);
        }
        return &words[k][(size_t)r * W];
    }
};

// Python's float floor division (Objects/floatobject.c float_floor_div), so epochs agree bit for bit.
static inline double py_floordiv(double vx, double wx) {
    double mod = std::fmod(vx, wx);
    double div = (vx - mod) / wx;
    if (mod) {
        if ((wx < 0) != (mod < 0)) div -= 1.0;
    }
    double floordiv;
    if (div) {
        floordiv = std::floor(div);
        if (div - floordiv > 0.5) floordiv += 1.0;
    } else {
        floordiv = std::copysign(0.0, vx / wx);
    }
    return floordiv;
}

class Pending {
   public:
    double ttl;
    int64_t epoch = 0;
    size_t W = 1;
    Generation cur, prev;

    Pending(double ttl_s, double now) : ttl(ttl_s) {
        epoch = ttl > 0 ? (int64_t)py_floordiv(now, ttl) : 0;
    }
    void ensure_slot(uint32_t s) {
        size_t need = (size_t)s / 64 + 1;
        if (need <= W) return;
        for (Generation* g : {&cur, &prev}) {
            for (auto& words : g->words) {
                size_t nrec = words.size() / W;
                std::vector<uint64_t> nw(nrec * need, 0);
                for (size_t r = 0; r < nrec; r++)
                    for (size_t wi = 0; wi < W; wi++) nw[r * need + wi] = words[r * W + wi];
                words.swap(nw);
            }
        }
        W = need;
    }
    int64_t size() const { return cur.pairs + prev.pairs; }

    // Dropped generations keep their storage here until reap(): freeing a generation of millions of
    // entries takes tens of ms (munmap), which expire() would spend under the router's lock (issue 17,
    // item 9).  At most two wait; a third drop frees the oldest in place (reap() was not called).
    Generation dead[2];
    int n_dead = 0;

    void expire(double now) {
        if (ttl == 0) return;
        int64_t e = (int64_t)py_floordiv(now, ttl);
        if (e == epoch) return;
        if (e == epoch + 1) {
            std::swap(prev, cur);
            bury(cur);
        } else {
            bury(prev);
            bury(cur);
        }
        epoch = e;
    }
    // g's storage moves to dead[] (a pointer swap per shard); g is left empty.
    void bury(Generation& g) {
        if (!g.pairs && !g.keys()) return;
        if (n_dead == 2) {
            dead[0].reset();
            swap_storage(dead[0], dead[1]);
            n_dead = 1;
        }
        swap_storage(dead[n_dead], g);  // dead[n_dead] is empty: g becomes empty
        n_dead++;
    }
    static void swap_storage(Generation& a, Generation& b) {
        for (size_t k = 0; k < SHARDS; k++) {
            std::swap(a.map[k].s, b.map[k].s);
            std::swap(a.map[k].size, b.map[k].size);
            a.words[k].swap(b.words[k]);
        }
        std::swap(a.pairs, b.pairs);
    }
    // Entries held by dropped generations that reap() has not freed yet.
    size_t dead_keys() const {
        size_t n = 0;
        for (int i = 0; i < n_dead; i++) n += dead[i].keys();
        return n;
    }
    // Hands the dropped generations' storage to `out` (two empty generations); the caller frees them,
    // outside the lock.  Returns how many were handed over.
    int take_dead(Generation* out) {
        int n = n_dead;
        for (int i = 0; i < n; i++) swap_storage(out[i], dead[i]);
        n_dead = 0;
        return n;
    }

    // Add hs[start:stop] of the chain hs[0:n] for slot s, continuing earlier calls that added
    // hs[0:start]: returns where the next call continues (stop, or n when start is 0 and the whole
    // chain is already pending), or 0 without adding anything when hs[start - 1] is no longer in the
    // current generation for s (rotated out or forgotten): the caller restarts from 0, so every
    // generation stays prefix-closed per slot, which walk() relies on.  add() is one call over [0, n).
    size_t add_range(uint32_t s, const uint64_t* hs, size_t n, size_t start, size_t stop, double now) {
        if (!n || ttl == 0) return n;
        expire(now);
        ensure_slot(s);
        size_t wi = s >> 6;
        uint64_t bit = 1ULL << (s & 63);
        if (start == 0) {
            const uint64_t* last = cur.get(hs[n - 1], W);
            if (last && (last[wi] & bit)) return n;  // the whole chain is already pending (chained hashes)
        } else {
            const uint64_t* prev_block = cur.get(hs[start - 1], W);
            if (!prev_block || !(prev_block[wi] & bit)) return 0;
        }
        if (stop > n) stop = n;
        int64_t added = 0;
        for (size_t i = start; i < stop; i++) {
            uint64_t& w = cur.record(hs[i], W)[wi];
            if (!(w & bit)) {
                w |= bit;
                added++;
            }
        }
        cur.pairs += added;
        return stop;
    }

    void add(uint32_t s, const uint64_t* hs, size_t n, double now) { add_range(s, hs, n, 0, n, now); }

    void forget(uint32_t s) {
        size_t wi = s >> 6;
        if (wi >= W) return;
        uint64_t bit = 1ULL << (s & 63);
        for (Generation* g : {&cur, &prev}) {
            // drop the slot's bit; records left empty are unlinked from the map
            for (size_t k = 0; k < SHARDS; k++) {
                AliasMap& map = g->map[k];
                std::vector<uint64_t> dead;
                for (size_t i = 0; i < map.s.size(); i++) {
                    uint32_t r = map.s[i].val;
                    if (r == EMPTY) continue;
                    uint64_t* m = &g->words[k][(size_t)r * W];
                    if (!(m[wi] & bit)) continue;
                    m[wi] &= ~bit;
                    g->pairs--;
                    bool empty = true;
                    for (size_t j = 0; j < W; j++)
                        if (m[j]) empty = false;
                    if (empty) dead.push_back(map.s[i].key);
                }
                for (uint64_t h : dead) map.erase(h);
            }
        }
    }

    // {slot: depth} of one generation, by the reference's bisection (pending.py _walk).
    void walk(const Generation& g, const uint64_t* hs, size_t n, std::vector<std::pair<uint32_t, int64_t>>& out) const {
        const uint64_t* m0 = g.get(hs[0], W);
        if (!m0) return;
        std::vector<uint64_t> full(W), S0(W);
        const uint64_t* ml = n > 1 ? g.get(hs[n - 1], W) : m0;
        for (size_t wi = 0; wi < W; wi++) {
            full[wi] = n > 1 ? ((ml ? ml[wi] : 0) & m0[wi]) : m0[wi];
            S0[wi] = m0[wi] & ~full[wi];
        }
        auto emit = [&](const std::vector<uint64_t>& M, int64_t d) {
            for (size_t wi = 0; wi < W; wi++) {
                uint64_t x = M[wi];
                while (x) {
                    int b = __builtin_ctzll(x);
                    x &= x - 1;
                    out.push_back({(uint32_t)(wi * 64 + b), d});
                }
            }
        };
        emit(full, (int64_t)n);
        if (n <= 1) return;
        struct Item {
            size_t lo, hi;
            std::vector<uint64_t> S;
        };
        std::vector<Item> stack;
        stack.push_back({0, n - 1, S0});
        while (!stack.empty()) {
            Item it = std::move(stack.back());
            stack.pop_back();
            bool nz = false;
            for (auto x : it.S)
                if (x) nz = true;
            if (!nz) continue;
            if (it.hi - it.lo == 1) {
                emit(it.S, (int64_t)it.hi);
                continue;
            }
            size_t mid = (it.lo + it.hi) >> 1;
            const uint64_t* mm = g.get(hs[mid], W);
            std::vector<uint64_t> at(W), rest(W);
            for (size_t wi = 0; wi < W; wi++) {
                at[wi] = (mm ? mm[wi] : 0) & it.S[wi];
                rest[wi] = it.S[wi] & ~at[wi];
            }
            stack.push_back({it.lo, mid, std::move(rest)});
            stack.push_back({mid, it.hi, std::move(at)});
        }
    }

    // depth[slot] (0 = none) over both generations; `depth` must have 64 * W entries.
    void match(const uint64_t* hs, size_t n, double now, std::vector<std::pair<uint32_t, int64_t>>& out) {
        out.clear();
        if (!n) return;
        expire(now);
        walk(cur, hs, n, out);
        if (prev.pairs || prev.keys()) {
            std::vector<std::pair<uint32_t, int64_t>> p;
            walk(prev, hs, n, p);
            for (auto& sd : p) {
                bool found = false;
                for (auto& o : out)
                    if (o.first == sd.first) {
                        found = true;
                        if (sd.second > o.second) o.second = sd.second;
                        break;
                    }
                if (!found) out.push_back(sd);
            }
        }
    }

    std::string check() const {
        for (const Generation* g : {&cur, &prev}) {
            int64_t n = 0;
            for (size_t k = 0; k < SHARDS; k++) {
                const AliasMap& map = g->map[k];
                for (size_t i = 0; i < map.s.size(); i++) {
                    uint32_t r = map.s[i].val;
                    if (r == EMPTY) continue;
                    if (Generation::shard(map.s[i].key) != k) return "pending entry in the wrong shard";
                    bool any = false;
                    for (size_t wi = 0; wi < W; wi++) {
                        uint64_t x = g->words[k][(size_t)r * W + wi];
                        n += __builtin_popcountll(x);
                        if (x) any = true;
                    }
                    if (!any) return "empty pending mask kept";
                }
            }
            if (n != g->pairs) return "pending pair counter drifted";
        }
        return "";
    }
};

}  // namespace kvcore
