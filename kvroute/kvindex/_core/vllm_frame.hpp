// vLLM / SGLang KV-event payloads (msgpack) parsed straight into index operations.
//
// The reference decoder is kvroute/adapters/vllm.py (msgpack -> frozen dataclasses); this parser
// accepts a strict SUBSET of what that decoder accepts and reads it the same way.  Whatever it is
// not sure of -- bytes or negative hashes, LoRA names, non-nil extra keys, tagged-array events,
// a medium spelled other than GPU/CPU/STORAGE, non-ASCII strings, bin/ext values, deep nesting,
// repeated known keys, anything the reference would reject -- makes parse() return false and the
// caller runs the reference decoder on the same bytes (which decodes it or raises its typed
// DecodeError).  So the compiled path can never accept a frame the reference refuses, and every
// read stays inside [p, end): a hostile frame is a fallback, never a crash or an over-read.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kvcore {

// DecodeLimits of the reference, plus the msgpack caps the reference derives from them.
struct FrameLimits {
    uint64_t max_payload = 64u << 20, max_events = 1u << 16, max_hashes = 1u << 17, max_tokens = 1u << 21,
             max_str = 1u << 16, max_map = 1u << 10;
};

enum : uint8_t { EV_STORED = 0, EV_REMOVED = 1, EV_CLEARED = 2 };

struct FrameEvent {
    uint8_t kind = EV_CLEARED;
    uint8_t tier = 0;         // 0 GPU, 1 host (CPU), 2 disk (STORAGE)
    bool has_parent = false;  // parent_block_hash given (stored)
    bool has_group = false;   // group_idx given
    bool has_spec = false;    // kv_cache_spec_kind given
    bool spec_indexed = true; // spec kind absent or one the index tracks
    uint64_t parent = 0;
    int64_t group = 0;
    uint64_t bs = 0;          // block_size (stored)
    size_t hoff = 0, hn = 0;  // block hashes: frame.hashes[hoff, hoff + hn)
    size_t toff = 0, tn = 0;  // token ids: frame.tokens[toff, toff + tn)
    std::string spec;         // kv_cache_spec_kind when given
};

struct Frame {
    double ts = 0;
    bool has_rank = false;
    int64_t rank = 0;
    bool has_clear = false;
    std::vector<FrameEvent> ev;
    std::vector<uint64_t> hashes;
    std::vector<uint32_t> tokens;
};

class FrameParser {
   public:
    FrameParser(const uint8_t* p, size_t n, const FrameLimits& lim) : p_(p), end_(p + n), n_(n), lim_(lim) {
        uint64_t big = lim.max_events;
        if (lim.max_hashes > big) big = lim.max_hashes;
        if (lim.max_tokens > big) big = lim.max_tokens;
        arr_cap_ = n < big ? n : big;
        if (arr_cap_ < 3) arr_cap_ = 3;
        uint64_t n1 = n ? n : 1;
        map_cap_ = lim.max_map < n1 ? lim.max_map : n1;
        str_cap_ = lim.max_str < n1 ? lim.max_str : n1;
    }

    // true: `out` holds the whole batch exactly as the reference decodes it; false: use the reference.
    bool parse(Frame& out) {
        if (n_ > lim_.max_payload) return false;
        uint64_t n;
        if (!array_header(n) || n < 2 || n > 3) return false;
        if (!number(out.ts)) return false;
        uint64_t ne;
        if (!array_header(ne) || ne > lim_.max_events || ne > (uint64_t)(end_ - p_)) return false;
        out.ev.reserve(ne);
        for (uint64_t i = 0; i < ne; i++)
            if (!event(out)) return false;
        if (n == 3) {
            if (!nil()) {
                uint64_t r;
                if (!uint(r) || r > (uint64_t)INT64_MAX) return false;
                out.has_rank = true;
                out.rank = (int64_t)r;
            }
        }
        return p_ == end_;  // trailing bytes: the reference raises ExtraData
    }

   private:
    const uint8_t* p_;
    const uint8_t* end_;
    size_t n_;
    FrameLimits lim_;
    uint64_t arr_cap_, map_cap_, str_cap_;

    bool have(size_t k) const { return (size_t)(end_ - p_) >= k; }
    uint64_t be(size_t k) {  // caller checked have(k)
        uint64_t v = 0;
        for (size_t i = 0; i < k; i++) v = (v << 8) | p_[i];
        p_ += k;
        return v;
    }
    bool nil() {
        if (have(1) && *p_ == 0xc0) {
            p_++;
            return true;
        }
        return false;
    }
    // A container header: fix form (high nibble `fix`), 16-bit (`b16`) or 32-bit (`b16 + 1`) length.
    bool header(uint8_t fix, uint8_t b16, uint64_t cap, uint64_t& n) {
        if (!have(1)) return false;
        uint8_t b = *p_;
        if ((b & 0xf0) == fix) { p_++; n = b & 0x0f; }
        else if (b == b16 && have(3)) { p_++; n = be(2); }
        else if (b == b16 + 1 && have(5)) { p_++; n = be(4); }
        else return false;
        return n <= cap;
    }
    bool array_header(uint64_t& n) { return header(0x90, 0xdc, arr_cap_, n); }
    bool map_header(uint64_t& n) { return header(0x80, 0xde, map_cap_, n); }
    // An ASCII str (non-ASCII: the reference's UTF-8 check is not repeated here, so fall back).
    bool str(const char*& s, size_t& len) {
        if (!have(1)) return false;
        uint8_t b = *p_;
        uint64_t n;
        if ((b & 0xe0) == 0xa0) { p_++; n = b & 0x1f; }
        else if (b == 0xd9 && have(2)) { p_++; n = be(1); }
        else if (b == 0xda && have(3)) { p_++; n = be(2); }
        else if (b == 0xdb && have(5)) { p_++; n = be(4); }
        else return false;
        if (n > str_cap_ || !have(n)) return false;
        for (uint64_t i = 0; i < n; i++)
            if (p_[i] & 0x80) return false;
        s = reinterpret_cast<const char*>(p_);
        len = n;
        p_ += n;
        return true;
    }
    // A non-negative integer (any int encoding; bools are not ints here).
    bool uint(uint64_t& v) {
        if (!have(1)) return false;
        uint8_t b = *p_;
        if (b < 0x80) { p_++; v = b; return true; }
        switch (b) {
            case 0xcc: if (!have(2)) return false; p_++; v = be(1); return true;
            case 0xcd: if (!have(3)) return false; p_++; v = be(2); return true;
            case 0xce: if (!have(5)) return false; p_++; v = be(4); return true;
            case 0xcf: if (!have(9)) return false; p_++; v = be(8); return true;
            case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
                size_t k = (size_t)1 << (b - 0xd0);
                if (!have(1 + k)) return false;
                p_++;
                uint64_t u = be(k);
                int64_t s = k == 8 ? (int64_t)u : (int64_t)(u << (64 - 8 * k)) >> (64 - 8 * k);
                if (s < 0) return false;
                v = (uint64_t)s;
                return true;
            }
            default: return false;
        }
    }
    // Batch ts: an int (made a float, as the reference does) or a finite float.
    bool number(double& d) {
        if (!have(1)) return false;
        uint8_t b = *p_;
        if (b == 0xcb && have(9)) {
            p_++;
            uint64_t u = be(8);
            std::memcpy(&d, &u, 8);
            return std::isfinite(d);
        }
        if (b == 0xca && have(5)) {
            p_++;
            uint32_t u = (uint32_t)be(4);
            float f;
            std::memcpy(&f, &u, 4);
            d = f;
            return std::isfinite(d);
        }
        uint64_t v;
        if (uint(v)) {
            d = (double)v;
            return true;
        }
        return false;  // negative ints, bools, anything else: the reference decides
    }
    // Any value the reference would decode without error, skipped; false when unsure.
    bool skip(int depth) {
        if (depth > 16 || !have(1)) return false;
        uint8_t b = *p_;
        if (b < 0x80 || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) { p_++; return true; }
        if ((b & 0xe0) == 0xa0 || b == 0xd9 || b == 0xda || b == 0xdb) {
            const char* s;
            size_t n;
            return str(s, n);
        }
        if ((b & 0xf0) == 0x90 || b == 0xdc || b == 0xdd) {
            uint64_t n;
            if (!array_header(n) || n > (uint64_t)(end_ - p_)) return false;
            for (uint64_t i = 0; i < n; i++)
                if (!skip(depth + 1)) return false;
            return true;
        }
        if ((b & 0xf0) == 0x80 || b == 0xde || b == 0xdf) {
            uint64_t n;
            if (!map_header(n) || n > (uint64_t)(end_ - p_)) return false;
            for (uint64_t i = 0; i < n; i++) {
                const char* s;
                size_t len;
                if (!str(s, len) || !skip(depth + 1)) return false;  // strict_map_key: str keys
            }
            return true;
        }
        size_t k = 0;
        switch (b) {
            case 0xca: k = 4; break;
            case 0xcb: k = 8; break;
            case 0xcc: case 0xd0: k = 1; break;
            case 0xcd: case 0xd1: k = 2; break;
            case 0xce: case 0xd2: k = 4; break;
            case 0xcf: case 0xd3: k = 8; break;
            default: return false;  // bin, ext, 0xc1: the reference decides
        }
        if (!have(1 + k)) return false;
        p_ += 1 + k;
        return true;
    }
    static bool is(const char* s, size_t n, const char* lit) {
        size_t m = std::strlen(lit);
        return n == m && std::memcmp(s, lit, m) == 0;
    }
    // block hashes into f.hashes; false if any is not an unsigned 64-bit int
    bool hash_array(Frame& f, size_t& off, size_t& cnt) {
        uint64_t n;
        if (!array_header(n) || n > lim_.max_hashes || n > (uint64_t)(end_ - p_)) return false;
        off = f.hashes.size();
        cnt = n;
        f.hashes.resize(off + n);
        uint64_t* out = f.hashes.data() + off;
        for (uint64_t i = 0; i < n; i++)
            if (!uint(out[i])) return false;
        return true;
    }
    bool token_array(Frame& f, size_t& off, size_t& cnt) {
        uint64_t n;
        if (!array_header(n) || n > lim_.max_tokens || n > (uint64_t)(end_ - p_)) return false;
        off = f.tokens.size();
        cnt = n;
        f.tokens.resize(off + n);
        uint32_t* out = f.tokens.data() + off;
        for (uint64_t i = 0; i < n; i++) {
            if (p_ < end_ && *p_ < 0x80) {  // positive fixint
                out[i] = *p_++;
                continue;
            }
            uint64_t v;
            if (!uint(v) || v > 0xFFFFFFFFULL) return false;
            out[i] = (uint32_t)v;
        }
        return true;
    }

    enum Field : uint32_t {
        F_TYPE = 1, F_HASHES = 2, F_PARENT = 4, F_TOKENS = 8, F_BS = 16, F_MEDIUM = 32, F_LORA = 64,
        F_EXTRAS = 128, F_GROUP = 256, F_SPEC = 512
    };

    bool event(Frame& f) {
        uint64_t n;
        if (!map_header(n) || n > (uint64_t)(end_ - p_)) return false;  // tagged arrays: reference
        FrameEvent e;
        uint32_t seen = 0;
        int kind = -1;
        bool hashes_ok = false, tokens_ok = true, parent_ok = true, bs_ok = true, medium_ok = true, group_ok = true,
             spec_ok = true, plain = true;  // plain: no LoRA name, no extra keys
        size_t tok_mark = f.tokens.size(), hash_mark = f.hashes.size();
        for (uint64_t i = 0; i < n; i++) {
            const char* k;
            size_t kl;
            if (!str(k, kl)) return false;
            uint32_t fld = 0;
            if (is(k, kl, "type")) fld = F_TYPE;
            else if (is(k, kl, "block_hashes")) fld = F_HASHES;
            else if (is(k, kl, "parent_block_hash")) fld = F_PARENT;
            else if (is(k, kl, "token_ids")) fld = F_TOKENS;
            else if (is(k, kl, "block_size")) fld = F_BS;
            else if (is(k, kl, "medium")) fld = F_MEDIUM;
            else if (is(k, kl, "lora_name")) fld = F_LORA;
            else if (is(k, kl, "extra_keys")) fld = F_EXTRAS;
            else if (is(k, kl, "group_idx")) fld = F_GROUP;
            else if (is(k, kl, "kv_cache_spec_kind")) fld = F_SPEC;
            if (fld == 0) {
                if (!skip(0)) return false;
                continue;
            }
            if (seen & fld) return false;  // a repeated key: the reference keeps the last one
            seen |= fld;
            const uint8_t* at = p_;
            switch (fld) {
                case F_TYPE: {
                    const char* s;
                    size_t sl;
                    if (!str(s, sl)) return false;
                    if (is(s, sl, "BlockStored")) kind = EV_STORED;
                    else if (is(s, sl, "BlockRemoved")) kind = EV_REMOVED;
                    else if (is(s, sl, "AllBlocksCleared")) kind = EV_CLEARED;
                    else return false;
                    break;
                }
                case F_HASHES:
                    hashes_ok = hash_array(f, e.hoff, e.hn);
                    if (!hashes_ok) { p_ = at; f.hashes.resize(hash_mark); if (!skip(0)) return false; }
                    break;
                case F_PARENT:
                    if (!nil()) {
                        parent_ok = uint(e.parent);
                        e.has_parent = true;
                        if (!parent_ok) { p_ = at; if (!skip(0)) return false; }
                    }
                    break;
                case F_TOKENS:
                    if (!nil()) {
                        tokens_ok = token_array(f, e.toff, e.tn);
                        if (!tokens_ok) { p_ = at; f.tokens.resize(tok_mark); e.tn = 0; if (!skip(0)) return false; }
                    }
                    break;
                case F_BS:
                    bs_ok = uint(e.bs) && e.bs <= lim_.max_tokens;
                    if (!bs_ok) { p_ = at; if (!skip(0)) return false; }
                    break;
                case F_MEDIUM:
                    if (!nil()) {
                        const char* s;
                        size_t sl;
                        if (!str(s, sl)) { medium_ok = false; p_ = at; if (!skip(0)) return false; break; }
                        if (is(s, sl, "GPU")) e.tier = 0;
                        else if (is(s, sl, "CPU")) e.tier = 1;
                        else if (is(s, sl, "STORAGE")) e.tier = 2;
                        else medium_ok = false;  // other spellings Tier.parse takes: the reference
                    }
                    break;
                case F_LORA:
                    if (!nil()) { plain = false; if (!skip(0)) return false; }
                    break;
                case F_EXTRAS:
                    if (!nil()) {
                        uint64_t m;
                        if (array_header(m) && m <= (uint64_t)(end_ - p_)) {
                            for (uint64_t j = 0; j < m; j++)
                                if (!nil()) { plain = false; if (!skip(0)) return false; }
                        } else {
                            p_ = at;
                            plain = false;
                            if (!skip(0)) return false;
                        }
                    }
                    break;
                case F_GROUP:
                    if (!nil()) {
                        uint64_t g;
                        group_ok = uint(g) && g <= (uint64_t)INT64_MAX;
                        if (!group_ok) { p_ = at; if (!skip(0)) return false; }
                        e.has_group = true;
                        e.group = (int64_t)g;
                    }
                    break;
                case F_SPEC:
                    if (!nil()) {
                        const char* s;
                        size_t sl;
                        if (!str(s, sl)) { spec_ok = false; p_ = at; if (!skip(0)) return false; break; }
                        e.has_spec = true;
                        e.spec.assign(s, sl);
                        e.spec_indexed = is(s, sl, "full_attention") || is(s, sl, "mla_attention");
                    }
                    break;
            }
        }
        if (kind < 0) return false;
        e.kind = (uint8_t)kind;
        if (kind == EV_CLEARED) {
            f.tokens.resize(tok_mark);
            f.hashes.resize(hash_mark);
            e = FrameEvent();
            e.kind = EV_CLEARED;
            f.has_clear = true;
        } else if (kind == EV_REMOVED) {
            if (!hashes_ok || !medium_ok || !group_ok) return false;
            f.tokens.resize(tok_mark);
            e.tn = 0;
            e.has_parent = false;
            e.bs = 0;
            e.has_spec = false;
            e.spec.clear();
            e.spec_indexed = true;
        } else {
            if (!hashes_ok || !tokens_ok || !parent_ok || !bs_ok || !medium_ok || !group_ok || !spec_ok) return false;
            if (!plain) return false;  // LoRA name / extra keys: the reference builds the extras
            if (e.tn && (e.bs == 0 || e.tn != e.hn * e.bs)) return false;  // the reference's bad_token_count
        }
        f.ev.push_back(std::move(e));
        return true;
    }
};

}  // namespace kvcore
