// Active blocks: the prompt blocks of unfinished requests, per router slot, counted once
// (the compiled twin of kvroute/router/active.py; tests/test_native_route.py compares them).
//
//   per_slot[s] : content hash -> requests on slot s holding that block (an open-addressing
//                 AliasMap, tables.hpp: no allocation per block; its size is the slot's
//                 distinct active blocks)
//
// A request's blocks form a chain, so the blocks of a new prompt active on a slot are a prefix of
// its chain: match() walks the chain once, narrowing the set of slots still matching.
// (A first version kept hash -> [(slot, count)] in std::unordered_map + std::vector: two heap
// allocations per new block, ~100 us of a route + finish of an 8,192-token prompt.)
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tables.hpp"

struct ActiveTable {
    std::vector<kvcore::AliasMap> per_slot;

    int64_t distinct_of(uint32_t slot) const {
        return slot < per_slot.size() ? (int64_t)per_slot[slot].size : 0;
    }

    int64_t add(uint32_t slot, const uint64_t* hs, size_t n) {
        if (slot >= per_slot.size()) per_slot.resize((size_t)slot + 1);
        kvcore::AliasMap& m = per_slot[slot];
        for (size_t i = 0; i < n; i++) {
            long f = m.find(hs[i]);
            if (f >= 0) {
                m.s[(size_t)f].val++;
                continue;
            }
            // a new block: insert without put()'s second search
            if ((double)(m.size + 1) > kvcore::MAX_LOAD * (double)m.cap()) m.rehash(kvcore::grown_capacity(m.size));
            m.place(hs[i], 1);
            m.size++;
        }
        return (int64_t)m.size;
    }

    int64_t remove(uint32_t slot, const uint64_t* hs, size_t n) {
        if (slot >= per_slot.size()) return 0;
        kvcore::AliasMap& m = per_slot[slot];
        for (size_t i = 0; i < n; i++) {
            long f = m.find(hs[i]);
            if (f < 0) continue;
            if (--m.s[(size_t)f].val == 0) m.erase_at((size_t)f);
        }
        return (int64_t)m.size;
    }

    void forget(uint32_t slot) {
        if (slot < per_slot.size()) per_slot[slot].clear();
    }

    // (slot, n): the first n >= 1 blocks of hs are active on that slot.
    void match(const uint64_t* hs, size_t n, std::vector<std::pair<uint32_t, int64_t>>& out) const {
        out.clear();
        if (!n) return;
        std::vector<uint32_t> alive, next;
        for (uint32_t s = 0; s < per_slot.size(); s++)
            if (per_slot[s].size && per_slot[s].find(hs[0]) >= 0) alive.push_back(s);
        size_t depth = 1;
        for (size_t i = 1; i < n && !alive.empty(); i++) {
            next.clear();
            for (uint32_t s : alive) {
                if (per_slot[s].find(hs[i]) >= 0) next.push_back(s);
                else out.emplace_back(s, (int64_t)i);
            }
            alive.swap(next);
            depth = i + 1;
        }
        for (uint32_t s : alive) out.emplace_back(s, (int64_t)depth);
    }

    std::string check() const {
        for (const auto& m : per_slot) {
            size_t used = 0;
            for (const auto& sl : m.s)
                if (sl.val != kvcore::EMPTY) {
                    if (sl.val < 1) return "a zero count";
                    if (m.find(sl.key) < 0) return "a block its own slot's table cannot find";
                    used++;
                }
            if (used != m.size) return "distinct totals disagree";
        }
        return "";
    }
};
