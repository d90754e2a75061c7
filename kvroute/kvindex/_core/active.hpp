// Active blocks: the prompt blocks of unfinished requests, per router slot, counted once
// (the compiled twin of kvroute/router/active.py; tests/test_native_route.py compares them).
//
//   holders  : content hash -> [(slot, requests holding it there)] (a short list: few workers hold one block)
//   distinct : slot -> number of distinct active blocks
//
// A request's blocks form a chain, so the blocks of a new prompt active on a slot are a prefix of
// its chain: match() walks the chain once, narrowing the set of slots still matching.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

struct ActiveTable {
    struct Mix {
        size_t operator()(uint64_t x) const noexcept {
            x ^= x >> 33;
            x *= 0xff51afd7ed558ccdULL;
            x ^= x >> 33;
            return (size_t)x;
        }
    };
    using Holders = std::vector<std::pair<uint32_t, uint32_t>>;
    std::unordered_map<uint64_t, Holders, Mix> holders;
    std::unordered_map<uint32_t, int64_t> distinct;

    int64_t distinct_of(uint32_t slot) const {
        auto it = distinct.find(slot);
        return it == distinct.end() ? 0 : it->second;
    }

    void set_distinct(uint32_t slot, int64_t d) {
        if (d) distinct[slot] = d;
        else distinct.erase(slot);
    }

    int64_t add(uint32_t slot, const uint64_t* hs, size_t n) {
        int64_t added = 0;
        for (size_t i = 0; i < n; i++) {
            Holders& v = holders[hs[i]];
            bool found = false;
            for (auto& sc : v)
                if (sc.first == slot) {
                    sc.second++;
                    found = true;
                    break;
                }
            if (!found) {
                v.emplace_back(slot, 1);
                added++;
            }
        }
        int64_t d = distinct_of(slot) + added;
        set_distinct(slot, d);
        return d;
    }

    int64_t remove(uint32_t slot, const uint64_t* hs, size_t n) {
        int64_t gone = 0;
        for (size_t i = 0; i < n; i++) {
            auto it = holders.find(hs[i]);
            if (it == holders.end()) continue;
            Holders& v = it->second;
            for (size_t j = 0; j < v.size(); j++)
                if (v[j].first == slot) {
                    if (--v[j].second == 0) {
                        v[j] = v.back();
                        v.pop_back();
                        gone++;
                        if (v.empty()) holders.erase(it);
                    }
                    break;
                }
        }
        int64_t d = distinct_of(slot) - gone;
        set_distinct(slot, d);
        return d;
    }

    void forget(uint32_t slot) {
        for (auto it = holders.begin(); it != holders.end();) {
            Holders& v = it->second;
            for (size_t j = 0; j < v.size(); j++)
                if (v[j].first == slot) {
                    v[j] = v.back();
                    v.pop_back();
                    break;
                }
            if (v.empty()) it = holders.erase(it);
            else ++it;
        }
        distinct.erase(slot);
    }

    static bool holds(const Holders& v, uint32_t slot) {
        for (auto& sc : v)
            if (sc.first == slot) return true;
        return false;
    }

    // (slot, n): the first n >= 1 blocks of hs are active on that slot.
    void match(const uint64_t* hs, size_t n, std::vector<std::pair<uint32_t, int64_t>>& out) const {
        out.clear();
        if (!n) return;
        auto it = holders.find(hs[0]);
        if (it == holders.end()) return;
        std::vector<uint32_t> alive, next;
        for (auto& sc : it->second) alive.push_back(sc.first);
        size_t depth = 1;
        for (size_t i = 1; i < n && !alive.empty(); i++) {
            auto jt = holders.find(hs[i]);
            next.clear();
            for (uint32_t s : alive) {
                if (jt != holders.end() && holds(jt->second, s)) next.push_back(s);
                else out.emplace_back(s, (int64_t)i);
            }
            alive.swap(next);
            depth = i + 1;
        }
        for (uint32_t s : alive) out.emplace_back(s, (int64_t)depth);
    }

    std::string check() const {
        std::unordered_map<uint32_t, int64_t> per;
        for (auto& kv : holders) {
            if (kv.second.empty()) return "an empty holder list";
            for (size_t j = 0; j < kv.second.size(); j++) {
                if (kv.second[j].second < 1) return "a zero count";
                for (size_t k = j + 1; k < kv.second.size(); k++)
                    if (kv.second[k].first == kv.second[j].first) return "a slot listed twice";
                per[kv.second[j].first]++;
            }
        }
        if (per.size() != distinct.size()) return "distinct totals disagree";
        for (auto& kv : per)
            if (distinct_of(kv.first) != kv.second) return "distinct totals disagree";
        return "";
    }
};
