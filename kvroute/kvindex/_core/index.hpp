// The index tables of the compiled core: which worker slot holds which content hash on which tier.
//
// Layout (all owned by KVCore; the Python wrapper kvroute.kvindex.native.NativeKVIndex maps
// worker ids to slots and engine hashes to 64-bit keys):
//
//   bt        BucketMap   content hash -> holder code (32 bits):
//               bit 31 clear: exactly one holder, inline: (worker slot << 3) | tier bits
//               bit 31 set:   record r = code & 0x7fffffff in `pool`: three masks of W words
//                             (GPU, host, disk), one bit per worker slot
//   pool      records of 3*W uint64 words; freed records are reused (free_recs)
//   workers   per slot: alias map (engine hash -> block slot), copy counts, flags
//
// A block is in `bt` iff some worker holds it on some tier; a record is used iff it has two
// or more holders (canonical form, checked by check()).  The semantics are those of the
// Python reference kvroute.kvindex.index.KVIndex, operation for operation.
#pragma once
#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tables.hpp"

namespace kvcore {

constexpr uint32_t REC_BIT = 0x80000000u;

struct Worker {
    bool live = false;
    bool engine_keys = false;  // some block stored under an engine hash distinct from its content hash
    BucketMap alias;           // engine hash (or the content hash) -> block slot in bt
    std::map<std::pair<uint64_t, int>, uint32_t> copies;  // extra physical copies (sparse)
};

struct Overlap {
    uint32_t slot;
    int64_t total, gpu, host, disk;
};

class KVCore {
   public:
    BucketMap bt;
    std::vector<uint64_t> pool;
    std::vector<uint32_t> free_recs;
    size_t nrec = 0;
    size_t W = 1;
    std::vector<Worker> workers;
    int64_t entries[3] = {0, 0, 0};
    int64_t orphan_stores = 0;
    int64_t capacity_drops = 0;
    int64_t limit = -1;  // max blocks per worker, -1 = none

    // ------------------------------------------------------------- holder codes
    inline uint64_t* rec(uint32_t code) { return &pool[(size_t)(code & ~REC_BIT) * 3 * W]; }
    inline const uint64_t* rec(uint32_t code) const { return &pool[(size_t)(code & ~REC_BIT) * 3 * W]; }

    inline int tiers_of(size_t b, uint32_t s) const {
        uint32_t v = bt.val(b);
        if (!(v & REC_BIT)) return (v >> 3) == s ? (int)(v & 7) : 0;
        const uint64_t* m = rec(v);
        size_t wi = s >> 6;
        if (wi >= W) return 0;
        uint64_t bit = 1ULL << (s & 63);
        return ((m[wi] & bit) ? 1 : 0) | ((m[W + wi] & bit) ? 2 : 0) | ((m[2 * W + wi] & bit) ? 4 : 0);
    }

    uint32_t alloc_rec() {
        uint32_t r;
        if (!free_recs.empty()) {
            r = free_recs.back();
            free_recs.pop_back();
        } else {
            r = (uint32_t)nrec++;
            pool.resize(nrec * 3 * W);
        }
        std::fill(pool.begin() + (size_t)r * 3 * W, pool.begin() + (size_t)(r + 1) * 3 * W, 0);
        return r;
    }

    void set_tier(size_t b, uint32_t s, int t) {
        uint32_t v = bt.val(b);
        if (!(v & REC_BIT)) {
            uint32_t os = v >> 3;
            if (os == s) {
                bt.val(b) = v | (1u << t);
                return;
            }
            uint32_t r = alloc_rec();
            uint64_t* m = &pool[(size_t)r * 3 * W];
            for (int tt = 0; tt < 3; tt++)
                if (v >> tt & 1) m[tt * W + (os >> 6)] |= 1ULL << (os & 63);
            m[t * W + (s >> 6)] |= 1ULL << (s & 63);
            bt.val(b) = REC_BIT | r;
            return;
        }
        rec(v)[t * W + (s >> 6)] |= 1ULL << (s & 63);
    }

    // Clear one (worker, tier) bit of block slot b; erases the block when nobody holds it.
    void clear_tier(size_t b, uint32_t s, int t) {
        uint32_t v = bt.val(b);
        if (!(v & REC_BIT)) {
            v &= ~(1u << t);
            if (v & 7) bt.val(b) = v;
            else bt.erase_at(b);
            return;
        }
        uint64_t* m = rec(v);
        m[t * W + (s >> 6)] &= ~(1ULL << (s & 63));
        normalize(b);
    }

    // Back to the canonical form after bits left a record: 0 holders -> erased, 1 -> inline.
    void normalize(size_t b) {
        uint32_t v = bt.val(b);
        uint64_t* m = rec(v);
        int holders = 0;
        size_t who = 0;
        for (size_t wi = 0; wi < W; wi++) {
            uint64_t a = m[wi] | m[W + wi] | m[2 * W + wi];
            if (a) {
                holders += __builtin_popcountll(a);
                who = wi * 64 + __builtin_ctzll(a);
            }
        }
        if (holders >= 2) return;
        free_recs.push_back(v & ~REC_BIT);
        if (holders == 0) {
            bt.erase_at(b);
            return;
        }
        size_t wi = who >> 6;
        uint64_t bit = 1ULL << (who & 63);
        uint32_t tiers = ((m[wi] & bit) ? 1 : 0) | ((m[W + wi] & bit) ? 2 : 0) | ((m[2 * W + wi] & bit) ? 4 : 0);
        bt.val(b) = ((uint32_t)who << 3) | tiers;
    }

    // ----------------------------------------------------------------- workers
    void add_worker(uint32_t s) {
        if (s >= (1u << 27)) throw std::runtime_error("worker slot out of range");
        if (s >= workers.size()) workers.resize(s + 1);
        workers[s].live = true;
        size_t need = (size_t)s / 64 + 1;
        if (need > W) widen(need);
    }
    void widen(size_t nW) {
        std::vector<uint64_t> np(nrec * 3 * nW, 0);
        for (size_t r = 0; r < nrec; r++)
            for (int t = 0; t < 3; t++)
                for (size_t wi = 0; wi < W; wi++) np[r * 3 * nW + t * nW + wi] = pool[r * 3 * W + t * W + wi];
        pool.swap(np);
        W = nW;
    }
    bool live(uint32_t s) const { return s < workers.size() && workers[s].live; }

    // Rehash the block table and point every alias at the new slots.  The remap reads are random
    // (aliases are ordered by engine hash) in an array of 4 B a slot: they are prefetched 8
    // buckets ahead, else each waits a full cache miss.
    void grow() {
        std::vector<uint32_t> remap;
        bt.rehash(bucket_capacity(bt.size), &remap);
        const uint32_t* R = remap.data();
        for (auto& w : workers) {
            if (!w.live) continue;
            Bucket* A = w.alias.b.data();
            size_t nb = w.alias.buckets();
            for (size_t i = 0; i < nb; i++) {
                if (i + 16 < nb) prefetch_line(&A[i + 16]);  // hardware prefetchers barely help here (measured)
                if (i + 8 < nb)
                    for (int j = 0; j < BSLOTS; j++)
                        if (A[i + 8].val[j] != EMPTY) prefetch_line(&R[A[i + 8].val[j]]);
                for (int j = 0; j < BSLOTS; j++)
                    if (A[i].val[j] != EMPTY) A[i].val[j] = R[A[i].val[j]];
            }
        }
    }
    // After erases: rebuild the block table smaller once it is mostly empty (never mid-operation).
    void shrink_if_sparse() {
        if (bt.sparse()) grow();
    }
    size_t insert_block(uint64_t c, uint32_t s, int t) {
        if (bt.needs_grow()) grow();
        return bt.insert_new(c, (s << 3) | (1u << t));
    }

    int64_t clear(uint32_t s) {
        Worker& w = workers[s];
        int64_t dropped = 0;
        for (size_t i = 0; i < w.alias.cap(); i++) {
            uint32_t b = w.alias.val(i);
            if (b == EMPTY) continue;
            int tt = tiers_of(b, s);
            for (int t = 0; t < 3; t++)
                if (tt >> t & 1) {
                    clear_tier(b, s, t);
                    entries[t]--;
                    dropped++;
                }
        }
        w.alias.clear();
        w.copies.clear();
        w.engine_keys = false;
        shrink_if_sparse();
        return dropped;
    }
    int64_t remove_worker(uint32_t s) {
        int64_t n = clear(s);
        workers[s].live = false;
        return n;
    }

    // ------------------------------------------------------------ store/remove
    int remove_one(uint32_t s, uint64_t k, size_t b, int t) {
        Worker& w = workers[s];
        if (!w.copies.empty()) w.copies.erase({k, t});
        int tt = tiers_of(b, s);
        if (!(tt >> t & 1)) return 0;
        clear_tier(b, s, t);
        entries[t]--;
        if ((tt & ~(1 << t)) == 0) w.alias.erase(k);
        return 1;
    }
    void drop_alias(uint32_t s, uint64_t k) {
        uint32_t b = workers[s].alias.get(k);
        int tt = tiers_of(b, s);
        for (int t = 0; t < 3; t++)
            if (tt >> t & 1) remove_one(s, k, b, t);
    }
    void realias(uint32_t s, size_t b, uint64_t k) {
        Worker& w = workers[s];
        if (w.alias.find(k) >= 0) drop_alias(s, k);
        for (size_t i = 0; i < w.alias.cap(); i++)
            if (w.alias.val(i) == b) {
                uint64_t old = w.alias.key(i);
                w.alias.erase_at(i);
                if (!w.copies.empty())  // the old name's extra copies go with it
                    for (int t = 0; t < 3; t++) w.copies.erase({old, t});
                break;
            }
        w.alias.put(k, (uint32_t)b);
        w.engine_keys = true;
    }

    int64_t store(uint32_t s, const uint64_t* hs, const uint64_t* ks, size_t n, int t) {
        Worker& w = workers[s];
        int64_t added = 0;
        for (size_t i = 0; i < n; i++) {
            if (i + 12 < n) {  // several misses in flight: the tables are far bigger than the caches
                bt.prefetch(hs[i + 12]);
                w.alias.prefetch(ks ? ks[i + 12] : hs[i + 12]);
            }
            uint64_t c = hs[i];
            uint64_t k = ks ? ks[i] : c;
            long b = bt.find(c);
            int held = b >= 0 ? tiers_of((size_t)b, s) : 0;
            if (!held) {
                if (limit >= 0 && (int64_t)w.alias.size >= limit) {
                    capacity_drops += (int64_t)(n - i);
                    break;
                }
                if (w.alias.find(k) >= 0) drop_alias(s, k);  // the engine reuses a name for other content
                if (b < 0) b = (long)insert_block(c, s, t);
                else set_tier((size_t)b, s, t);
                w.alias.insert(k, (uint32_t)b);  // k is absent now
                if (k != c) w.engine_keys = true;
                added++;
            } else {
                if (w.alias.find(k) < 0) realias(s, (size_t)b, k);
                if (!(held >> t & 1)) {
                    set_tier((size_t)b, s, t);
                    added++;
                }
            }
        }
        entries[t] += added;
        return added;
    }

    bool holds_any(uint32_t s, uint64_t c) const {
        long b = bt.find(c);
        return b >= 0 && tiers_of((size_t)b, s);
    }

    // Python's KVIndex._key_of: the alias key naming content hash c for worker s.
    bool key_of(uint32_t s, uint64_t c, uint64_t& k) const {
        const Worker& w = workers[s];
        uint32_t a = w.alias.get(c);
        if (a != EMPTY && bt.key(a) == c) {
            k = c;
            return true;
        }
        if (!w.engine_keys) return false;
        long b = bt.find(c);
        if (b < 0 || !tiers_of((size_t)b, s)) return false;
        for (size_t i = 0; i < w.alias.cap(); i++)
            if (w.alias.val(i) == (uint32_t)b) {
                k = w.alias.key(i);
                return true;
            }
        return false;
    }

    // Removals by engine hash read two random lines a key (its alias, then its block): prefetch
    // the alias 32 keys ahead and, once it is in, the block 12 keys ahead.
    inline void prefetch_removal(const Worker& w, const uint64_t* ks, size_t i, size_t n) const {
        if (i + 32 < n) w.alias.prefetch(ks[i + 32]);
        if (i + 12 < n) {
            uint32_t b = w.alias.get(ks[i + 12]);
            if (b != EMPTY) prefetch_line(&bt.b[b / BSLOTS]);
        }
    }

    int64_t remove_keys(uint32_t s, const uint64_t* ks, size_t n, int t) {
        int64_t removed = 0;
        for (size_t i = 0; i < n; i++) {
            prefetch_removal(workers[s], ks, i, n);
            uint32_t b = workers[s].alias.get(ks[i]);
            if (b != EMPTY) removed += remove_one(s, ks[i], b, t);
        }
        shrink_if_sparse();
        return removed;
    }
    int64_t remove_hashes(uint32_t s, const uint64_t* hs, size_t n, int t) {
        int64_t removed = 0;
        for (size_t i = 0; i < n; i++) {
            uint64_t k;
            if (key_of(s, hs[i], k)) removed += remove_one(s, k, workers[s].alias.get(k), t);
        }
        shrink_if_sparse();
        return removed;
    }

    // BlockRemoved of an engine: counts into out[0] removed, out[1] unknown, out[2] copies released.
    void apply_removed(uint32_t s, const uint64_t* ks, size_t n, int t, int64_t* out) {
        Worker& w = workers[s];
        for (size_t i = 0; i < n; i++) {
            prefetch_removal(w, ks, i, n);
            uint64_t k = ks[i];
            if (!w.copies.empty()) {
                auto it = w.copies.find({k, t});
                if (it != w.copies.end()) {
                    if (it->second > 1) it->second--;
                    else w.copies.erase(it);
                    out[2]++;
                    continue;
                }
            }
            uint32_t b = w.alias.get(k);
            if (b == EMPTY) out[1]++;
            else if (remove_one(s, k, b, t)) out[0]++;
            else out[1]++;
        }
        shrink_if_sparse();
    }

    // GPU blocks announced again under the same engine hash while held: one more physical copy each.
    int64_t count_copies(uint32_t s, const uint64_t* ks, const uint64_t* hs, size_t n, int t) {
        Worker& w = workers[s];
        if (!w.alias.size) return 0;
        int64_t c = 0;
        for (size_t i = 0; i < n; i++) {
            if (i + 12 < n) w.alias.prefetch(ks[i + 12]);
            uint32_t b = w.alias.get(ks[i]);
            if (b != EMPTY && bt.key(b) == hs[i] && (tiers_of(b, s) >> t & 1)) {
                w.copies[{ks[i], t}]++;
                c++;
            }
        }
        return c;
    }

    // ------------------------------------------------------------------- match
    // Overlap of every worker holding the first block of the n hashes.
    void match(const uint64_t* hs, size_t n, std::vector<Overlap>& out) const {
        match_with([hs](size_t i) { return hs[i]; }, n, out);
    }

    // The same walk with the i-th hash computed on demand (in increasing i, a few blocks ahead):
    // match_tokens hashes only as far as some worker still matches.
    template <class HashAt>
    void match_with(HashAt&& hs, size_t n, std::vector<Overlap>& out) const {
        out.clear();
        if (!n) return;
        long b = bt.find(hs(0));
        if (b < 0) return;
        const size_t nW = W;
        uint64_t run[64], cur[64];  // W <= 64 (4,096 workers) on this path; bigger fleets use vectors
        std::vector<uint64_t> runv, curv;
        uint64_t* R = run;
        uint64_t* C = cur;
        if (nW > 64) {
            runv.assign(nW, 0);
            curv.assign(nW, 0);
            R = runv.data();
            C = curv.data();
        }
        std::vector<int32_t> hostc(64 * nW, 0), diskc(64 * nW, 0);
        auto load = [&](size_t bb, uint64_t* M) {
            uint32_t v = bt.val(bb);
            if (!(v & REC_BIT)) {
                for (size_t wi = 0; wi < nW; wi++) M[wi] = 0;
                uint32_t s = v >> 3;
                M[s >> 6] = 1ULL << (s & 63);
            } else {
                const uint64_t* m = rec(v);
                for (size_t wi = 0; wi < nW; wi++) M[wi] = m[wi] | m[nW + wi] | m[2 * nW + wi];
            }
        };
        auto offtier = [&](size_t bb, const uint64_t* M) {
            uint32_t v = bt.val(bb);
            if (!(v & REC_BIT)) {
                if (!(v & 1)) {
                    uint32_t s = v >> 3;
                    if (M[s >> 6] >> (s & 63) & 1) {
                        if (v & 2) hostc[s]++;
                        else diskc[s]++;
                    }
                }
                return;
            }
            const uint64_t* m = rec(v);
            for (size_t wi = 0; wi < nW; wi++) {
                uint64_t off = (m[nW + wi] | m[2 * nW + wi]) & ~m[wi] & M[wi];
                while (off) {
                    int bit = __builtin_ctzll(off);
                    off &= off - 1;
                    size_t s = wi * 64 + bit;
                    if (m[nW + wi] >> bit & 1) hostc[s]++;
                    else diskc[s]++;
                }
            }
        };
        auto emit = [&](const uint64_t* M, int64_t d) {
            for (size_t wi = 0; wi < nW; wi++) {
                uint64_t x = M[wi];
                while (x) {
                    int bit = __builtin_ctzll(x);
                    x &= x - 1;
                    size_t s = wi * 64 + bit;
                    int64_t h = hostc[s], k = diskc[s];
                    out.push_back({(uint32_t)s, d, d - h - k, h, k});
                }
            }
        };
        load((size_t)b, R);
        offtier((size_t)b, R);
        size_t i = 1;
        for (; i < n; i++) {
            if (i + 12 < n) bt.prefetch(hs(i + 12));
            long bb = bt.find(hs(i));
            if (bb < 0) break;
            load((size_t)bb, C);
            bool changed = false, any = false;
            for (size_t wi = 0; wi < nW; wi++) {
                uint64_t m = R[wi] & C[wi];
                if (m != R[wi]) changed = true;
                if (m) any = true;
            }
            if (changed) {
                for (size_t wi = 0; wi < nW; wi++) {
                    uint64_t gone = R[wi] & ~C[wi];
                    C[wi] = gone;
                    R[wi] &= ~gone;
                }
                emit(C, (int64_t)i);
                if (!any) return;
            }
            offtier((size_t)bb, R);
        }
        emit(R, (int64_t)i);
    }

    // ------------------------------------------------------------------ checks
    std::string check() const {
        std::vector<int64_t> held(workers.size(), 0);
        int64_t cnt[3] = {0, 0, 0};
        std::string e = bt.check();
        if (!e.empty()) return "block table: " + e;
        size_t live_blocks = 0;
        std::vector<char> rec_used(nrec, 0);
        for (size_t b = 0; b < bt.cap(); b++) {
            uint32_t v = bt.val(b);
            if (v == EMPTY) continue;
            live_blocks++;
            if (!(v & REC_BIT)) {
                uint32_t s = v >> 3;
                if (!(v & 7)) return "inline holder without tiers";
                if (!live(s)) return "block held by a dead slot";
                held[s]++;
                for (int t = 0; t < 3; t++) cnt[t] += v >> t & 1;
                continue;
            }
            uint32_t r = v & ~REC_BIT;
            if (r >= nrec) return "record out of range";
            if (rec_used[r]) return "record shared by two blocks";
            rec_used[r] = 1;
            const uint64_t* m = rec(v);
            int holders = 0;
            for (size_t wi = 0; wi < W; wi++) {
                uint64_t a = m[wi] | m[W + wi] | m[2 * W + wi];
                holders += __builtin_popcountll(a);
                for (int t = 0; t < 3; t++) cnt[t] += __builtin_popcountll(m[t * W + wi]);
                while (a) {
                    size_t s = wi * 64 + __builtin_ctzll(a);
                    a &= a - 1;
                    if (!live((uint32_t)s)) return "block held by a dead slot";
                    held[s]++;
                }
            }
            if (holders < 2) return "record with fewer than two holders (not canonical)";
        }
        if (live_blocks != bt.size) return "block table counters drifted";
        for (uint32_t r : free_recs)
            if (r >= nrec || rec_used[r]) return "a used record is on the free list";
        if (free_recs.size() + std::count(rec_used.begin(), rec_used.end(), 1) != nrec) return "records leaked";
        for (int t = 0; t < 3; t++)
            if (cnt[t] != entries[t]) return "entry counters drifted";
        for (size_t s = 0; s < workers.size(); s++) {
            const Worker& w = workers[s];
            if (!w.live) {
                if (w.alias.size) return "dead slot with aliases";
                continue;
            }
            if ((int64_t)w.alias.size != held[s]) return "alias count differs from blocks held";
            e = w.alias.check();
            if (!e.empty()) return "alias table: " + e;
            std::vector<uint32_t> vs;
            size_t n = 0;
            for (size_t i = 0; i < w.alias.cap(); i++) {
                uint32_t b = w.alias.val(i);
                if (b == EMPTY) continue;
                n++;
                if (b >= bt.cap() || bt.val(b) == EMPTY) return "alias to a dead block";
                if (!tiers_of(b, (uint32_t)s)) return "alias to a block the worker does not hold";
                if (w.alias.find(w.alias.key(i)) != (long)i) return "alias table probe chain broken";
                vs.push_back(b);
            }
            if (n != w.alias.size) return "alias size counter drifted";
            std::sort(vs.begin(), vs.end());
            if (std::adjacent_find(vs.begin(), vs.end()) != vs.end()) return "two aliases for one block";
            for (auto& kv : w.copies) {
                if (kv.second < 1) return "zero copy count kept";
                uint32_t b = w.alias.get(kv.first.first);
                if (b == EMPTY || !(tiers_of(b, (uint32_t)s) >> kv.first.second & 1)) return "copies of a block it lacks";
            }
        }
        return "";
    }

    size_t bytes() const {
        size_t n = bt.bytes() + pool.capacity() * 8 + free_recs.capacity() * 4 + workers.capacity() * sizeof(Worker);
        for (auto& w : workers) n += w.alias.bytes() + w.copies.size() * 64;
        return n;
    }
};

}  // namespace kvcore
