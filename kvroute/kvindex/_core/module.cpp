// kvroute.kvindex._kvcore: the compiled core (pybind11).
//
// Parts:  xxh3.hpp (XXH3-64 from the spec), tables.hpp (open addressing), index.hpp (KVCore:
// [density_heaps.hpp: density-ranked candidate heaps for eviction's learned policy]
// the index tables), pending.hpp (speculative prefixes), vllm_frame.hpp (vLLM KV-event payloads
// parsed into index operations; the Python decoder is the reference), and below: token conversion,
// chained block hashing, the Python classes Index / Hashes / RouterCore.
//
// Thread safety: every Index and RouterCore method takes the object's own mutex, so two
// threads can never corrupt a table; the GIL is released (mutex held) in loops over large
// inputs (LARGE_BLOCKS blocks or more), and hashing a prompt releases it without any mutex.
// Callers still serialise multi-call sequences (the Router's lock does).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <memory>
#include <mutex>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "active.hpp"
#include "density_heaps.hpp"
#include "index.hpp"
#include "pending.hpp"
#include "vllm_frame.hpp"
#include "xxh3.hpp"

namespace py = pybind11;
using namespace kvcore;

static PyObject* g_invalid_tokens = PyExc_ValueError;
static PyObject* g_invalid_hash = PyExc_ValueError;
constexpr size_t LARGE_BLOCKS = 256;

[[noreturn]] static void raise(PyObject* type, const std::string& msg) {
    PyErr_SetString(type, msg.c_str());
    throw py::error_already_set();
}

// Small non-negative exact ints read straight from the object (token ids are < 2**30 in practice):
// the layout of CPython's int objects, by version; anything else takes the API path below.
static inline bool small_int(PyObject* o, uint64_t& out) {
    if (!PyLong_CheckExact(o)) return false;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject*)o)) return false;
    Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject*)o);
    if (v < 0) return false;
    out = (uint64_t)v;
    return true;
#else
    Py_ssize_t size = Py_SIZE(o);
    const digit* d = ((PyLongObject*)o)->ob_digit;
    if (size == 1) {
        out = d[0];
        return true;
    }
    if (size == 0) {
        out = 0;
        return true;
    }
    if (size == 2) {
        out = (uint64_t)d[0] | ((uint64_t)d[1] << PyLong_SHIFT);
        return true;
    }
    return false;
#endif
}

// One Python int (or __index__ object) as an unsigned value <= maxv; false if out of range / not an int.
static inline bool as_uint(PyObject* o, uint64_t maxv, uint64_t& out) {
    if (small_int(o, out)) return out <= maxv;
    if (PyLong_Check(o)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (!overflow) {
            if (v == -1 && PyErr_Occurred()) return false;
            if (v < 0 || (uint64_t)v > maxv) return false;
            out = (uint64_t)v;
            return true;
        }
        if (overflow < 0) return false;
        unsigned long long u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return false;
        }
        if (u > maxv) return false;
        out = u;
        return true;
    }
    PyObject* idx = PyNumber_Index(o);
    if (!idx) {
        PyErr_Clear();
        return false;
    }
    bool ok = as_uint(idx, maxv, out);
    Py_DECREF(idx);
    return ok;
}

// Token ids (list, tuple, 1-D integer numpy array or anything with the buffer protocol) as uint32.
// Returns false for other types (the Python wrapper then converts them).
static bool tokens_u32(py::handle obj, std::vector<uint32_t>& buf, const uint32_t*& ptr, size_t& n) {
    PyObject* o = obj.ptr();
    if (PyList_Check(o) || PyTuple_Check(o)) {
        n = (size_t)PySequence_Fast_GET_SIZE(o);
        PyObject** items = PySequence_Fast_ITEMS(o);
        buf.resize(n);
        for (size_t i = 0; i < n; i++) {
            if (i + 16 < n) kvcore::prefetch_line(items[i + 16]);  // int objects: several misses in flight
            uint64_t v;
            if (!as_uint(items[i], 0xFFFFFFFFULL, v))
                raise(g_invalid_tokens, "token ids must be integers in [0, 2**32 - 1]: bad item at position " + std::to_string(i));
            buf[i] = (uint32_t)v;
        }
        ptr = buf.data();
        return true;
    }
    if (!PyObject_CheckBuffer(o) || PyBytes_Check(o)) return false;
    py::buffer b = py::reinterpret_borrow<py::buffer>(obj);
    py::buffer_info info = b.request();
    if (info.ndim != 1) raise(g_invalid_tokens, "token ids must be one-dimensional, got " + std::to_string(info.ndim) + " dimensions");
    n = (size_t)info.shape[0];
    std::string f = info.format;
    char kind = f.empty() ? '?' : f.back();
    bool little = f.size() == 1 || f[0] == '<' || f[0] == '=' || f[0] == '@';
    if (!little) return false;
    bool is_signed = kind == 'b' || kind == 'h' || kind == 'i' || kind == 'l' || kind == 'q';
    bool is_unsigned = kind == 'B' || kind == 'H' || kind == 'I' || kind == 'L' || kind == 'Q';
    if (!is_signed && !is_unsigned) raise(g_invalid_tokens, "token ids must be integers, got buffer format '" + f + "'");
    const char* base = static_cast<const char*>(info.ptr);
    ssize_t st = info.strides[0];
    if (is_unsigned && info.itemsize == 4 && st == 4) {
        ptr = reinterpret_cast<const uint32_t*>(base);
        return true;
    }
    buf.resize(n);
    for (size_t i = 0; i < n; i++) {
        const char* p = base + (ssize_t)i * st;
        int64_t v;
        uint64_t u;
        bool neg = false;
        switch (info.itemsize) {
            case 1: v = is_signed ? (int64_t)*(const int8_t*)p : (int64_t)*(const uint8_t*)p; u = (uint64_t)v; break;
            case 2: v = is_signed ? (int64_t)*(const int16_t*)p : (int64_t)*(const uint16_t*)p; u = (uint64_t)v; break;
            case 4: v = is_signed ? (int64_t)*(const int32_t*)p : (int64_t)*(const uint32_t*)p; u = (uint64_t)v; break;
            case 8:
                if (is_signed) { v = *(const int64_t*)p; u = (uint64_t)v; }
                else { u = *(const uint64_t*)p; v = 0; }
                break;
            default: raise(g_invalid_tokens, "unsupported token integer width");
        }
        if (is_signed && v < 0) neg = true;
        if (neg || u > 0xFFFFFFFFULL) raise(g_invalid_tokens, "token ids must lie in [0, 2**32 - 1]");
        buf[i] = (uint32_t)u;
    }
    ptr = buf.data();
    return true;
}

// Per-block extra keys, already msgpack-encoded by the wrapper: None or a list of bytes|None.
struct Extras {
    std::vector<std::string> data;
    std::vector<char> has;
    bool any = false;
};
static void read_extras(py::handle ex, Extras& out) {
    if (ex.is_none()) return;
    py::sequence seq = py::reinterpret_borrow<py::sequence>(ex);
    size_t n = py::len(seq);
    out.data.resize(n);
    out.has.assign(n, 0);
    for (size_t i = 0; i < n; i++) {
        py::handle it = seq[i];
        if (it.is_none()) continue;
        out.data[i] = py::cast<std::string>(it);
        out.has[i] = 1;
        out.any = true;
    }
}

static void chain(const uint8_t* data, size_t ntok, size_t bs, uint64_t seed, const Extras& ex, std::vector<uint64_t>& out) {
    size_t step = bs * 4;
    size_t n = ntok / bs;
    out.resize(n);
    uint64_t h = seed;
    for (size_t i = 0; i < n; i++) {
        if (ex.any && i < ex.has.size() && ex.has[i]) h = xxh3::hash64(ex.data[i].data(), ex.data[i].size(), h);
        h = xxh3::hash64(data + i * step, step, h);
        out[i] = h;
    }
}

static void chain_maybe_nogil(const uint8_t* data, size_t ntok, size_t bs, uint64_t seed, const Extras& ex, std::vector<uint64_t>& out) {
    if (bs && ntok / bs >= LARGE_BLOCKS) {
        py::gil_scoped_release nogil;
        chain(data, ntok, bs, seed, ex, out);
    } else {
        chain(data, ntok, bs, seed, ex, out);
    }
}

// Token ids -> chained hashes; false when the container is not one tokens_u32 reads.
static bool hash_tokens(py::handle tokens, size_t bs, uint64_t seed, py::handle extras, std::vector<uint64_t>& out) {
    std::vector<uint32_t> buf;
    const uint32_t* p = nullptr;
    size_t n = 0;
    if (!tokens_u32(tokens, buf, p, n)) return false;
    Extras ex;
    read_extras(extras, ex);
    chain_maybe_nogil(reinterpret_cast<const uint8_t*>(p), n, bs, seed, ex, out);
    return true;
}

static py::list to_list(const std::vector<uint64_t>& v) {
    PyObject* l = PyList_New((Py_ssize_t)v.size());
    if (!l) throw py::error_already_set();
    for (size_t i = 0; i < v.size(); i++) PyList_SET_ITEM(l, i, PyLong_FromUnsignedLongLong(v[i]));
    return py::reinterpret_steal<py::list>(l);
}

// Content hashes / engine keys from a list, tuple or uint64 numpy array.  Returns false when an
// item is bytes (engine keys only; the wrapper maps those), raises InvalidHashError otherwise.
static bool u64s(py::handle obj, std::vector<uint64_t>& out, bool allow_bytes, bool wrap_negative) {
    PyObject* o = obj.ptr();
    if (py::isinstance<py::array>(obj)) {
        py::array a = py::reinterpret_borrow<py::array>(obj);
        if (a.dtype().kind() == 'u' && a.dtype().itemsize() == 8 && a.ndim() == 1) {
            auto arr = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
            out.assign(arr.data(), arr.data() + arr.size());
            return true;
        }
    }
    py::object fast = py::reinterpret_steal<py::object>(PySequence_Fast(o, "hashes must be a sequence"));
    if (!fast) throw py::error_already_set();
    size_t n = (size_t)PySequence_Fast_GET_SIZE(fast.ptr());
    PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
    out.resize(n);
    for (size_t i = 0; i < n; i++) {
        if (i + 16 < n) kvcore::prefetch_line(items[i + 16]);  // int objects: several misses in flight
        PyObject* it = items[i];
        if (allow_bytes && (PyBytes_Check(it) || PyByteArray_Check(it) || PyMemoryView_Check(it))) return false;
        if (PyBool_Check(it) && wrap_negative) raise(PyExc_TypeError, "a bool is not a block hash");
        uint64_t v;
        if (as_uint(it, ~0ULL, v)) {
            out[i] = v;
            continue;
        }
        if (wrap_negative && PyLong_Check(it)) {
            int overflow = 0;
            long long s = PyLong_AsLongLongAndOverflow(it, &overflow);
            if (!overflow && !(s == -1 && PyErr_Occurred())) {
                out[i] = (uint64_t)s;
                continue;
            }
            PyErr_Clear();
        }
        raise(g_invalid_hash, "hashes must be integers in [0, 2**64 - 1]");
    }
    return true;
}

// ------------------------------------------------------------- msgpack int arrays
// The items of a msgpack array of unsigned ints (any int format; signed formats with a value >= 0),
// as read by the sidecar for a big request's token ids or hashes (kvroute/sidecar/decode.py).  Stops
// at the first item it cannot take: returns its index (count when all were taken) and the reason:
// 0 none, 1 boolean, 2 negative, 3 above max_value, 4 not an int, 5 truncated.
enum { U_OK = 0, U_BOOL, U_NEG, U_BIG, U_TYPE, U_TRUNC };

template <class T>
static size_t unpack_uints(const uint8_t* p, size_t len, size_t& pos, size_t count, uint64_t max_value, T* out, int& why) {
    auto be = [&](size_t nbytes, uint64_t& v) {
        if (len - pos < nbytes) return false;
        v = 0;
        for (size_t k = 0; k < nbytes; k++) v = v << 8 | p[pos + k];
        pos += nbytes;
        return true;
    };
    why = U_OK;
    for (size_t i = 0; i < count; i++) {
        if (pos >= len) { why = U_TRUNC; return i; }
        size_t at = pos;
        uint8_t t = p[pos++];
        uint64_t v;
        bool neg = false;
        if (t <= 0x7f) v = t;
        else if (t >= 0xe0) neg = true;
        else if (t >= 0xcc && t <= 0xcf) {
            if (!be((size_t)1 << (t - 0xcc), v)) { why = U_TRUNC; pos = at; return i; }
        } else if (t >= 0xd0 && t <= 0xd3) {
            size_t nb = (size_t)1 << (t - 0xd0);
            if (!be(nb, v)) { why = U_TRUNC; pos = at; return i; }
            neg = nb < 8 ? (v >> (8 * nb - 1)) & 1 : (v >> 63) & 1;
        } else {
            why = (t == 0xc2 || t == 0xc3) ? U_BOOL : U_TYPE;
            pos = at;
            return i;
        }
        if (neg) { why = U_NEG; pos = at; return i; }
        if (v > max_value) { why = U_BIG; pos = at; return i; }
        out[i] = (T)v;
    }
    return count;
}

// ------------------------------------------------------------------------- Index
struct Index {
    KVCore core;
    std::mutex mu;
};

using Guard = std::lock_guard<std::mutex>;

// BlockStored with tokens, under the index mutex: (stored, copies_added); stored = -1 when the
// parent block is unknown to the worker.  Shared by Index.apply_stored and Index.apply_frame.
static std::pair<int64_t, int64_t> stored_locked(Index& x, uint32_t s, const uint64_t* ks, size_t n,
                                                 const std::optional<uint64_t>& pk, const uint8_t* data, size_t ntok,
                                                 size_t bs, int t, const Extras& ex, std::vector<uint64_t>& hs) {
    Guard g(x.mu);
    uint64_t seed = 0x6B76726F757465ULL;
    if (pk) {
        uint32_t b = x.core.live(s) ? x.core.workers[s].alias.get(*pk) : EMPTY;
        if (b == EMPTY) return {-1, 0};
        seed = x.core.bt.key(b);
    }
    chain(data, ntok, bs, seed, ex, hs);
    int64_t copies = 0;
    if (t == 0) copies = x.core.count_copies(s, ks, hs.data(), n, t);
    return {x.core.store(s, hs.data(), ks, n, t), copies};
}

// Placeholder BlockStored (offload tier), under the mutex: blocks resolved by alias; -1 when one is unknown.
static int64_t placeholder_locked(Index& x, uint32_t s, const uint64_t* ks, size_t n, int t) {
    Guard g(x.mu);
    std::vector<uint64_t> hs(n);
    for (size_t i = 0; i < n; i++) {
        uint32_t b = x.core.workers[s].alias.get(ks[i]);
        if (b == EMPTY) return -1;
        hs[i] = x.core.bt.key(b);
    }
    return x.core.store(s, hs.data(), ks, n, t);
}

// A parsed payload (vllm_frame.hpp) as a Python object; only the wrappers read it.
struct PyFrame {
    Frame f;
};

static py::object group_key(const FrameEvent& e) { return e.has_group ? py::object(py::int_(e.group)) : py::object(py::none()); }

// {worker id: Overlap(total, gpu, host, disk)} built here (the namedtuple made as tuple.__new__ does).
static py::dict overlaps_dict(const std::vector<Overlap>& ov, py::list ids, py::handle overlap_type) {
    py::dict d;
    PyTypeObject* tp = (PyTypeObject*)overlap_type.ptr();
    for (const Overlap& o : ov) {
        PyObject* args = Py_BuildValue("((LLLL))", (long long)o.total, (long long)o.gpu, (long long)o.host, (long long)o.disk);
        if (!args) throw py::error_already_set();
        PyObject* val = PyTuple_Type.tp_new(tp, args, nullptr);
        Py_DECREF(args);
        if (!val) throw py::error_already_set();
        PyObject* key = PyList_GET_ITEM(ids.ptr(), o.slot);
        int rc = PyDict_SetItem(d.ptr(), key, val);
        Py_DECREF(val);
        if (rc) throw py::error_already_set();
    }
    return d;
}

static py::tuple overlaps_tuple(const std::vector<Overlap>& ov) {
    py::tuple t(ov.size());
    for (size_t i = 0; i < ov.size(); i++) t[i] = py::make_tuple(ov[i].slot, ov[i].total, ov[i].gpu, ov[i].host, ov[i].disk);
    return t;
}

// ---------------------------------------------------------------------- Hashes
// A prompt's chained hashes, kept in C++ between RouterCore calls (no Python list built).
struct Hashes {
    std::vector<uint64_t> h;
    size_t ntok = 0;
};

static void hash_prompt(py::handle tokens, size_t bs, py::handle extras, uint64_t seed, Hashes& out) {
    if (bs == 0) raise(PyExc_ValueError, "block_size must be positive");
    std::vector<uint32_t> buf;
    const uint32_t* p = nullptr;
    size_t n = 0;
    if (!tokens_u32(tokens, buf, p, n)) raise(PyExc_TypeError, "unsupported token container");
    Extras ex;
    read_extras(extras, ex);
    out.ntok = n;
    chain_maybe_nogil(reinterpret_cast<const uint8_t*>(p), n, bs, seed, ex, out.h);
}

// ------------------------------------------------------------------ RouterCore
struct Row {  // a router slot's load, mirrored from WorkerState by Router._sync
    int64_t prefill_tokens = 0, prefill_requests = 0, decode_blocks = 0, active = 0, routed = 0;
    int64_t rep_waiting = -1, rep_queue = -1, capacity = 0;
    double rep_kv = NAN;
};

struct Weights {
    double t = 3.2e-5, host = 2.4e-6, disk = 1.9e-5, dec = 4.0e-8, dec_w = 1.0, fleet_w = 1.5, cap = 16.0,
           relief = 2.0, kv_high = 0.9, kv_w = 1.0, pfloor = 1.0, qfloor = 128.0;
    int64_t rrt = 1024;
};

struct RouterCore {
    Index* index;
    py::object index_ref;
    Pending pending;
    size_t bs;
    Weights w;
    std::vector<Row> rows;
    std::vector<uint32_t> pool_r, pool_i;  // prefill pool in order: router slot, index slot
    std::mutex mu;
    // scratch
    std::vector<Overlap> ov;
    std::vector<std::pair<uint32_t, int64_t>> pd;
    std::vector<int32_t> ov_at, pd_at;

    RouterCore(py::object idx, double ttl, double now, size_t block_size)
        : index(idx.cast<Index*>()), index_ref(idx), pending(ttl, now), bs(block_size) {}
};

PYBIND11_MODULE(_kvcore, m) {
    m.doc() = "kvroute's compiled core: XXH3-64, chained block hashes, the index tables, speculative prefixes, route.";
    m.attr("LARGE_BLOCKS") = LARGE_BLOCKS;
    bind_density_heaps(m);  // eviction's learned-victim heaps and density table (density_heaps.hpp)
#if defined(__GLIBC__)
    // The tables grow by reallocation; a fixed mmap threshold (glibc's default one rises after
    // the first free) makes every big table its own mapping, returned to the OS when replaced,
    // instead of a hole in the heap that RSS keeps counting.
    mallopt(M_MMAP_THRESHOLD, 32 * 1024);
#endif

    m.def("set_error_types", [](py::object tokens, py::object hash) {
        g_invalid_tokens = tokens.ptr();
        Py_INCREF(g_invalid_tokens);
        g_invalid_hash = hash.ptr();
        Py_INCREF(g_invalid_hash);
    });
    m.def("xxh3_64", [](py::bytes data, uint64_t seed) {
        std::string_view s = data;
        return xxh3::hash64(s.data(), s.size(), seed);
    }, py::arg("data"), py::arg("seed") = 0);
    m.def("chain_hashes", [](py::buffer data, size_t bs, uint64_t seed, py::object extras) {
        if (bs == 0) raise(PyExc_ValueError, "block_size must be positive, got 0");
        py::buffer_info info = data.request();
        Extras ex;
        read_extras(extras, ex);
        std::vector<uint64_t> out;
        chain_maybe_nogil(static_cast<const uint8_t*>(info.ptr), (size_t)(info.size * info.itemsize) / 4, bs, seed, ex, out);
        return to_list(out);
    }, py::arg("data"), py::arg("block_size"), py::arg("seed"), py::arg("extras") = py::none());
    // Token ids -> chained hashes as a list / a uint64 array; None when the container type is not handled here.
    m.def("block_hash_list", [](py::handle tokens, size_t bs, uint64_t seed, py::object extras) -> py::object {
        std::vector<uint64_t> out;
        if (!hash_tokens(tokens, bs, seed, extras, out)) return py::none();
        return to_list(out);
    });
    m.def("block_hash_array", [](py::handle tokens, size_t bs, uint64_t seed, py::object extras) -> py::object {
        std::vector<uint64_t> out;
        if (!hash_tokens(tokens, bs, seed, extras, out)) return py::none();
        py::array_t<uint64_t> a(out.size());
        std::copy(out.begin(), out.end(), a.mutable_data());
        return std::move(a);
    });

    // (array, end, taken, reason): `count` msgpack ints read from data[offset:] into a uint32 (bits 32) or
    // uint64 (bits 64) array, the GIL released; `taken` < count when item `taken` could not be read
    // (reason as unpack_uints; the array then holds the items before it), `end` the offset after the last
    // item read.
    m.def("unpack_uint_array", [](py::buffer data, size_t offset, size_t count, int bits) {
        if (bits != 32 && bits != 64) raise(PyExc_ValueError, "bits must be 32 or 64");
        py::buffer_info info = data.request();
        size_t len = (size_t)(info.size * info.itemsize);
        if (offset > len) raise(PyExc_ValueError, "offset beyond the data");
        const uint8_t* p = static_cast<const uint8_t*>(info.ptr);
        if (count > len - offset) count = len - offset + 1;  // each item takes a byte at least: cap the allocation
        size_t pos = offset, taken;
        int why;
        py::array out = bits == 32 ? py::array(py::array_t<uint32_t>(count)) : py::array(py::array_t<uint64_t>(count));
        void* dst = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            taken = bits == 32 ? unpack_uints(p, len, pos, count, 0xFFFFFFFFULL, static_cast<uint32_t*>(dst), why)
                               : unpack_uints(p, len, pos, count, ~0ULL, static_cast<uint64_t*>(dst), why);
        }
        return py::make_tuple(out, pos, taken, why);
    }, py::arg("data"), py::arg("offset"), py::arg("count"), py::arg("bits"));

    py::class_<Hashes>(m, "Hashes")
        .def("__len__", [](const Hashes& h) { return h.h.size(); })
        .def_readonly("num_tokens", &Hashes::ntok)
        .def("tolist", [](const Hashes& h) { return to_list(h.h); });
    // A chain of content hashes (list, tuple or uint64 array) as a Hashes object (num_tokens 0).
    m.def("as_hashes", [](py::handle hashes) {
        auto* h = new Hashes();
        try {
            u64s(hashes, h->h, false, false);
        } catch (...) {
            delete h;
            throw;
        }
        return py::cast(h, py::return_value_policy::take_ownership);
    });
    m.def("hash_prompt", [](py::handle tokens, size_t bs, py::handle extras, uint64_t seed) -> py::object {
        auto* h = new Hashes();
        try {
            hash_prompt(tokens, bs, extras, seed, *h);
        } catch (...) {
            delete h;
            throw;
        }
        return py::cast(h, py::return_value_policy::take_ownership);
    });


    py::class_<PyFrame>(m, "Frame")
        .def_property_readonly("ts", [](const PyFrame& p) { return p.f.ts; })
        .def_property_readonly("dp_rank", [](const PyFrame& p) -> py::object {
            return p.f.has_rank ? py::object(py::int_(p.f.rank)) : py::object(py::none());
        })
        .def_property_readonly("n_events", [](const PyFrame& p) { return p.f.ev.size(); })
        .def_property_readonly("has_clear", [](const PyFrame& p) { return p.f.has_clear; })
        .def_property_readonly("n_blocks", [](const PyFrame& p) { return p.f.hashes.size(); })
        // The events as plain tuples (kind, tier, hashes, parent, token uint32-LE bytes, block_size,
        // group_idx, spec_kind); the Python wrapper makes them the reference's dataclasses.
        .def("raw", [](const PyFrame& p) {
            py::list out;
            for (const FrameEvent& e : p.f.ev) {
                std::vector<uint64_t> hs(p.f.hashes.begin() + e.hoff, p.f.hashes.begin() + e.hoff + e.hn);
                py::bytes tb(reinterpret_cast<const char*>(p.f.tokens.data() + e.toff), e.tn * 4);
                out.append(py::make_tuple(e.kind, e.tier, to_list(hs),
                                          e.has_parent ? py::object(py::int_(e.parent)) : py::object(py::none()), tb, e.bs,
                                          group_key(e), e.has_spec ? py::object(py::str(e.spec)) : py::object(py::none())));
            }
            return out;
        });
    // A vLLM/SGLang KV-event payload -> Frame, or None when the reference decoder must read it
    // (vllm_frame.hpp says when).  `limits`: the DecodeLimits fields in declaration order.
    m.def("parse_frame", [](py::handle payload, std::tuple<uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t> lim) -> py::object {
        if (!PyBytes_Check(payload.ptr())) return py::none();
        char* data;
        Py_ssize_t n;
        if (PyBytes_AsStringAndSize(payload.ptr(), &data, &n)) throw py::error_already_set();
        FrameLimits L;
        std::tie(L.max_payload, L.max_events, L.max_hashes, L.max_tokens, L.max_str, L.max_map) = lim;
        auto pf = std::make_unique<PyFrame>();
        bool ok;
        if (n >= (1 << 16)) {
            py::gil_scoped_release nogil;  // the bytes object is immutable and held by the caller
            ok = FrameParser(reinterpret_cast<const uint8_t*>(data), (size_t)n, L).parse(pf->f);
        } else {
            ok = FrameParser(reinterpret_cast<const uint8_t*>(data), (size_t)n, L).parse(pf->f);
        }
        if (!ok) return py::none();
        return py::cast(std::move(pf));
    });

    py::class_<Index>(m, "Index")
        .def(py::init<>())
        .def("set_limit", [](Index& x, int64_t lim) { Guard g(x.mu); x.core.limit = lim; })
        .def("add_worker", [](Index& x, uint32_t s) { Guard g(x.mu); x.core.add_worker(s); })
        .def("remove_worker", [](Index& x, uint32_t s) { Guard g(x.mu); return x.core.remove_worker(s); })
        .def("clear", [](Index& x, uint32_t s) { Guard g(x.mu); return x.core.clear(s); })
        .def("store", [](Index& x, uint32_t s, py::handle hashes, py::handle keys, int t, py::handle parent) {
            std::vector<uint64_t> hs, ks;
            u64s(hashes, hs, false, false);
            bool has_keys = !keys.is_none();
            if (has_keys) {
                if (!u64s(keys, ks, false, true)) raise(g_invalid_hash, "bad engine hash");
                if (ks.size() != hs.size()) raise(PyExc_ValueError, std::to_string(ks.size()) + " engine hashes for " + std::to_string(hs.size()) + " blocks");
            }
            std::optional<uint64_t> par;
            if (!parent.is_none()) {
                uint64_t v;
                if (!as_uint(parent.ptr(), ~0ULL, v)) raise(g_invalid_hash, "parent must be an integer in [0, 2**64 - 1]");
                par = v;
            }
            auto run = [&]() {
                Guard g(x.mu);
                if (par && !x.core.holds_any(s, *par)) x.core.orphan_stores++;
                return x.core.store(s, hs.data(), has_keys ? ks.data() : nullptr, hs.size(), t);
            };
            if (hs.size() >= LARGE_BLOCKS) {
                py::gil_scoped_release nogil;
                return run();
            }
            return run();
        })
        .def("remove_keys", [](Index& x, uint32_t s, std::vector<uint64_t> ks, int t) {
            Guard g(x.mu);
            return x.core.remove_keys(s, ks.data(), ks.size(), t);
        })
        .def("remove_hashes", [](Index& x, uint32_t s, py::handle hashes, int t) {
            std::vector<uint64_t> hs;
            u64s(hashes, hs, false, false);
            Guard g(x.mu);
            return x.core.remove_hashes(s, hs.data(), hs.size(), t);
        })
        // BlockRemoved: keys already mapped to u64 by the wrapper when they were bytes
        .def("apply_removed", [](Index& x, uint32_t s, py::handle keys, int t) -> py::object {
            std::vector<uint64_t> ks;
            if (!u64s(keys, ks, true, true)) return py::none();
            int64_t out[3] = {0, 0, 0};
            Guard g(x.mu);
            x.core.apply_removed(s, ks.data(), ks.size(), t, out);
            return py::make_tuple(out[0], out[1], out[2]);
        })
        // BlockStored with tokens: returns (stored, copies_added), or None when a key is bytes
        // (the wrapper maps them and calls again), or -1 as stored when the parent is unknown.
        .def("apply_stored", [](Index& x, uint32_t s, py::handle keys, py::handle parent, py::handle tokens,
                                py::handle token_bytes, size_t bs, int t, py::handle extras) -> py::object {
            std::vector<uint64_t> ks;
            if (!u64s(keys, ks, true, true)) return py::none();
            std::vector<uint32_t> buf;
            const uint8_t* data;
            size_t ntok;
            std::string tb_hold;
            if (!token_bytes.is_none()) {
                std::string_view sv = py::reinterpret_borrow<py::bytes>(token_bytes);
                data = reinterpret_cast<const uint8_t*>(sv.data());
                ntok = sv.size() / 4;
            } else {
                const uint32_t* p;
                if (!tokens_u32(tokens, buf, p, ntok)) raise(g_invalid_tokens, "token ids must be a list or an array");
                data = reinterpret_cast<const uint8_t*>(p);
            }
            Extras ex;
            read_extras(extras, ex);
            std::optional<uint64_t> pk;
            if (!parent.is_none()) {
                std::vector<uint64_t> one;
                py::list l;
                l.append(parent);
                if (!u64s(l, one, true, true)) return py::none();
                pk = one[0];
            }
            std::vector<uint64_t> hs;
            auto run = [&]() { return stored_locked(x, s, ks.data(), ks.size(), pk, data, ntok, bs, t, ex, hs); };
            std::pair<int64_t, int64_t> r;
            if (ks.size() >= LARGE_BLOCKS) {
                py::gil_scoped_release nogil;
                r = run();
            } else {
                r = run();
            }
            return py::make_tuple(r.first, r.second);
        })
        // placeholder BlockStored (offload tier): resolve keys by alias; -1 when one is unknown
        .def("apply_placeholder", [](Index& x, uint32_t s, py::handle keys, int t) -> py::object {
            std::vector<uint64_t> ks;
            if (!u64s(keys, ks, true, true)) return py::none();
            return py::int_(placeholder_locked(x, s, ks.data(), ks.size(), t));
        })
        // A parsed payload applied as NativeKVIndex.apply applies its decoded events.  `bs` is the
        // index's block size (-1: none); `groups` is the wrapper's set of the worker's KV-cache
        // groups (read and updated here).  Returns (stored, removed, cleared, orphans,
        // unknown_removed, ignored, copies_added, copies_released, block_size_mismatch, malformed,
        // reasons): reasons lists, per orphan event in order, 0 (parent unknown) or 1 (placeholder).
        .def("apply_frame", [](Index& x, uint32_t s, const PyFrame& pf, int64_t bs, py::set groups) {
            const Frame& f = pf.f;
            int64_t c[10] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
            py::list reasons;
            Extras none;
            std::vector<uint64_t> hs;
            for (const FrameEvent& e : f.ev) {
                const uint64_t* ks = f.hashes.data() + e.hoff;
                int t = e.tier;
                if (e.kind == EV_REMOVED) {
                    if (e.has_group && !groups.contains(py::int_(e.group))) { c[5]++; continue; }
                    int64_t out[3] = {0, 0, 0};
                    {
                        Guard g(x.mu);
                        x.core.apply_removed(s, ks, e.hn, t, out);
                    }
                    c[1] += out[0]; c[4] += out[1]; c[7] += out[2];
                } else if (e.kind == EV_CLEARED) {
                    PySet_Clear(groups.ptr());
                    Guard g(x.mu);
                    c[2] += x.core.clear(s);
                } else if (!e.spec_indexed) {
                    c[5]++;
                } else if (e.tn == 0) {
                    int64_t r = placeholder_locked(x, s, ks, e.hn, t);
                    if (r < 0) { c[3]++; reasons.append(1); continue; }
                    c[0] += r;
                } else if (bs >= 0 && (int64_t)e.bs != bs) {
                    c[8]++;
                } else if (e.bs == 0 || e.tn != e.hn * e.bs) {
                    c[9]++;
                } else {
                    std::optional<uint64_t> pk;
                    if (e.has_parent) pk = e.parent;
                    const uint8_t* data = reinterpret_cast<const uint8_t*>(f.tokens.data() + e.toff);
                    std::pair<int64_t, int64_t> r;
                    if (e.hn >= LARGE_BLOCKS) {
                        py::gil_scoped_release nogil;
                        r = stored_locked(x, s, ks, e.hn, pk, data, e.tn, e.bs, t, none, hs);
                    } else {
                        r = stored_locked(x, s, ks, e.hn, pk, data, e.tn, e.bs, t, none, hs);
                    }
                    if (r.first < 0) { c[3]++; reasons.append(0); continue; }
                    groups.add(group_key(e));
                    c[6] += r.second;
                    c[0] += r.first;
                }
            }
            return py::make_tuple(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], reasons);
        })
        .def("match", [](Index& x, py::handle hashes) {
            std::vector<uint64_t> hs;
            u64s(hashes, hs, false, false);
            std::vector<Overlap> ov;
            {
                Guard g(x.mu);
                x.core.match(hs.data(), hs.size(), ov);
            }
            return overlaps_tuple(ov);
        })
        .def("match_dict", [](Index& x, py::handle hashes, py::list ids, py::handle overlap_type) {
            std::vector<uint64_t> hs;
            u64s(hashes, hs, false, false);
            std::vector<Overlap> ov;
            {
                Guard g(x.mu);
                x.core.match(hs.data(), hs.size(), ov);
            }
            return overlaps_dict(ov, ids, overlap_type);
        })
        // Hash a prompt and match it in one walk: blocks after the last one any worker holds are
        // never hashed (every token is still converted and checked).  None: container not handled.
        .def("match_tokens_dict", [](Index& x, py::handle tokens, size_t bs, py::handle extras, uint64_t seed,
                                     py::list ids, py::handle overlap_type) -> py::object {
            std::vector<uint32_t> buf;
            const uint32_t* p = nullptr;
            size_t ntok = 0;
            if (!tokens_u32(tokens, buf, p, ntok)) return py::none();
            Extras ex;
            read_extras(extras, ex);
            const uint8_t* data = reinterpret_cast<const uint8_t*>(p);
            size_t nb = ntok / bs, step = bs * 4;
            std::vector<uint64_t> hs;
            hs.reserve(nb);
            uint64_t h = seed;
            auto at = [&](size_t i) {
                while (hs.size() <= i) {
                    size_t j = hs.size();
                    if (ex.any && j < ex.has.size() && ex.has[j]) h = xxh3::hash64(ex.data[j].data(), ex.data[j].size(), h);
                    h = xxh3::hash64(data + j * step, step, h);
                    hs.push_back(h);
                }
                return hs[i];
            };
            std::vector<Overlap> ov;
            {
                Guard g(x.mu);
                x.core.match_with(at, nb, ov);
            }
            return overlaps_dict(ov, ids, overlap_type);
        })
        .def("match_hashes", [](Index& x, const Hashes& h) {
            std::vector<Overlap> ov;
            {
                Guard g(x.mu);
                x.core.match(h.h.data(), h.h.size(), ov);
            }
            return overlaps_tuple(ov);
        })
        .def("tiers", [](Index& x, uint32_t s, uint64_t c) {
            Guard g(x.mu);
            long b = x.core.bt.find(c);
            return b < 0 ? 0 : x.core.tiers_of((size_t)b, s);
        })
        .def("content_hash_of", [](Index& x, uint32_t s, uint64_t k) -> py::object {
            Guard g(x.mu);
            uint32_t b = x.core.workers[s].alias.get(k);
            if (b == EMPTY) return py::none();
            return py::int_(x.core.bt.key(b));
        })
        // (content hashes, alias keys, tier bits) of a worker, as numpy arrays
        .def("rows", [](Index& x, uint32_t s) {
            Guard g(x.mu);
            const Worker& w = x.core.workers[s];
            size_t n = w.alias.size;
            py::array_t<uint64_t> cs(n), ks(n);
            py::array_t<uint8_t> bits(n);
            auto C = cs.mutable_data();
            auto K = ks.mutable_data();
            auto B = bits.mutable_data();
            size_t j = 0;
            for (size_t i = 0; i < w.alias.cap(); i++) {
                uint32_t b = w.alias.val(i);
                if (b == EMPTY) continue;
                C[j] = x.core.bt.key(b);
                K[j] = w.alias.key(i);
                B[j] = (uint8_t)x.core.tiers_of(b, s);
                j++;
            }
            return py::make_tuple(cs, ks, bits);
        })
        .def("copies", [](Index& x, uint32_t s) {
            Guard g(x.mu);
            py::list l;
            for (auto& kv : x.core.workers[s].copies) l.append(py::make_tuple(kv.first.first, kv.first.second, kv.second));
            return l;
        })
        .def("set_copies", [](Index& x, uint32_t s, uint64_t k, int t, uint32_t n) {
            Guard g(x.mu);
            x.core.workers[s].copies[{k, t}] = n;
        })
        .def("engine_keys", [](Index& x, uint32_t s) { Guard g(x.mu); return x.core.workers[s].engine_keys; })
        .def("alias_count", [](Index& x, uint32_t s) { Guard g(x.mu); return x.core.workers[s].alias.size; })
        .def("counts", [](Index& x) {
            Guard g(x.mu);
            auto& c = x.core;
            return py::make_tuple(c.entries[0], c.entries[1], c.entries[2], c.bt.size, c.orphan_stores, c.capacity_drops, c.bytes());
        })
        .def("check", [](Index& x) { Guard g(x.mu); return x.core.check(); });

    // The router's active-block table (kvroute/router/active.py's ActiveBlocks, compiled): hashes as a
    // Hashes object or any sequence of uint64.
    auto active_hashes = [](py::handle hashes, std::vector<uint64_t>& tmp) -> std::pair<const uint64_t*, size_t> {
        if (py::isinstance<Hashes>(hashes)) {
            const Hashes& H = hashes.cast<const Hashes&>();
            return {H.h.data(), H.h.size()};
        }
        u64s(hashes, tmp, false, false);
        return {tmp.data(), tmp.size()};
    };
    py::class_<ActiveTable>(m, "ActiveTable")
        .def(py::init<>())
        .def("add", [active_hashes](ActiveTable& a, uint32_t slot, py::handle hashes) {
            std::vector<uint64_t> tmp;
            auto [p, n] = active_hashes(hashes, tmp);
            return a.add(slot, p, n);
        })
        .def("remove", [active_hashes](ActiveTable& a, uint32_t slot, py::handle hashes) {
            std::vector<uint64_t> tmp;
            auto [p, n] = active_hashes(hashes, tmp);
            return a.remove(slot, p, n);
        })
        .def("match", [active_hashes](const ActiveTable& a, py::handle hashes) {
            std::vector<uint64_t> tmp;
            auto [p, n] = active_hashes(hashes, tmp);
            std::vector<std::pair<uint32_t, int64_t>> out;
            a.match(p, n, out);
            py::dict d;
            for (auto& sd : out) d[py::int_(sd.first)] = sd.second;
            return d;
        })
        .def("distinct", &ActiveTable::distinct_of)
        .def("forget", &ActiveTable::forget)
        .def("check", &ActiveTable::check);

    py::class_<RouterCore>(m, "RouterCore")
        .def(py::init<py::object, double, double, size_t>())
        .def("set_weights", [](RouterCore& r, py::dict d) {
            Guard g(r.mu);
            Weights& w = r.w;
            w.t = d["prefill_s_per_token"].cast<double>();
            w.host = d["host_reload_s_per_token"].cast<double>();
            w.disk = d["disk_reload_s_per_token"].cast<double>();
            w.dec = d["decode_s_per_token"].cast<double>();
            w.dec_w = d["decode_weight"].cast<double>();
            w.rrt = d["reported_request_tokens"].cast<int64_t>();
            w.fleet_w = d["fleet_weight"].cast<double>();
            w.cap = d["fleet_pressure_cap"].cast<double>();
            w.pfloor = d["fleet_pressure_floor"].cast<double>();
            w.qfloor = d["queued_request_floor_tokens"].cast<double>();
            w.relief = d["relief_ratio"].cast<double>();
            w.kv_high = d["kv_high"].cast<double>();
            w.kv_w = d["kv_weight"].cast<double>();
        })
        .def("set_row", [](RouterCore& r, uint32_t slot, int64_t pt, int64_t pr, int64_t db, int64_t act, int64_t routed,
                           int64_t rw, int64_t rq, double rkv, int64_t cap) {
            Guard g(r.mu);
            if (slot >= r.rows.size()) r.rows.resize(slot + 1);
            r.rows[slot] = Row{pt, pr, db, act, routed, rw, rq, cap, rkv};
            r.pending.ensure_slot(slot);
        })
        .def("set_pool", [](RouterCore& r, std::vector<uint32_t> rs, std::vector<uint32_t> is) {
            Guard g(r.mu);
            r.pool_r = std::move(rs);
            r.pool_i = std::move(is);
        })
        // pending table (the router's speculative prefixes)
        .def("pending_add", [](RouterCore& r, uint32_t slot, py::handle hashes, double now) {
            std::vector<uint64_t> hs;
            u64s(hashes, hs, false, false);
            Guard g(r.mu);
            r.pending.add(slot, hs.data(), hs.size(), now);
        })
        // The chain in a Hashes object, hs[start:stop] (Pending::add_range: returns where to continue).
        .def("pending_add_range", [](RouterCore& r, uint32_t slot, const Hashes& H, size_t start, size_t stop, double now) {
            Guard g(r.mu);
            return r.pending.add_range(slot, H.h.data(), H.h.size(), start, stop, now);
        })
        .def("pending_match", [](RouterCore& r, py::handle hashes, double now) {
            std::vector<uint64_t> hs;
            u64s(hashes, hs, false, false);
            Guard g(r.mu);
            r.pending.match(hs.data(), hs.size(), now, r.pd);
            py::dict d;
            for (auto& sd : r.pd) d[py::int_(sd.first)] = sd.second;
            return d;
        })
        .def("pending_expire", [](RouterCore& r, double now) { Guard g(r.mu); r.pending.expire(now); })
        .def("pending_dead_len", [](RouterCore& r) { Guard g(r.mu); return r.pending.dead_keys(); })
        // Frees the generations expire() dropped: taken under the core's mutex (pointer swaps), freed
        // after it and without the GIL.  The router calls it with its own lock released.
        .def("pending_reap", [](RouterCore& r) {
            auto out = std::make_unique<Generation[]>(2);
            int n;
            {
                Guard g(r.mu);
                n = r.pending.take_dead(out.get());
            }
            if (n) {
                py::gil_scoped_release nogil;
                out.reset();
            }
            return n;
        })
        .def("pending_forget", [](RouterCore& r, uint32_t slot) { Guard g(r.mu); r.pending.forget(slot); })
        .def("pending_len", [](RouterCore& r) { Guard g(r.mu); return r.pending.size(); })
        .def("pending_check", [](RouterCore& r) { Guard g(r.mu); return r.pending.check(); })
        .def_property_readonly("ttl_s", [](RouterCore& r) { return r.pending.ttl; })
        // One routing decision with the kvroute cost model (kvroute/router/policies/kvroute_cost.py, same
        // arithmetic in the same order).  Returns (tied, reason, costs): tied = [(pool position, total, gpu,
        // host, disk, pending)] (several when the Python side must break the tie with its seeded rng; the
        // pending add is then left to it), reason 0 cold / 1 best cached / 2 load outweighs cache / 3 relief.
        // add_limit: the pending add (when the core makes it) covers blocks [0, add_limit) only; the
        // caller continues with pending_add_range from the returned pend_at (the router's lock released
        // between chunks).
        // room: None, or one wait-for-KV-room cost per pool position (KVRoutePolicy.room_waits), added to
        // the cost after the fleet term as the Python policy adds it.
        .def("route", [](RouterCore& r, const Hashes& H, double now_expire, double now_pending, size_t add_limit,
                         py::object room) {
            std::vector<double> roomv;
            if (!room.is_none()) roomv = room.cast<std::vector<double>>();
            Guard g(r.mu);
            const std::vector<uint64_t>& hs = H.h;
            size_t nb = hs.size();
            int64_t ntok = std::max<int64_t>((int64_t)H.ntok, (int64_t)(nb * r.bs));
            r.pending.expire(now_expire);
            {
                Guard gi(r.index->mu);
                r.index->core.match(hs.data(), nb, r.ov);
            }
            r.pending.match(hs.data(), nb, now_pending, r.pd);
            size_t np = r.pool_r.size();
            // index slot -> overlap position; router slot -> pending depth
            size_t isz = 64 * r.index->core.W, rsz = 64 * r.pending.W;
            if (r.ov_at.size() < isz) r.ov_at.assign(isz, -1);
            if (r.pd_at.size() < rsz) r.pd_at.assign(rsz, 0);
            for (size_t i = 0; i < r.ov.size(); i++) r.ov_at[r.ov[i].slot] = (int32_t)i;
            for (auto& sd : r.pd) r.pd_at[sd.first] = (int32_t)sd.second;
            struct Cand {
                int64_t total, gpu, host, disk, pend;
            };
            std::vector<Cand> cands(np);
            for (size_t j = 0; j < np; j++) {
                int32_t oi = r.pool_i[j] < isz ? r.ov_at[r.pool_i[j]] : -1;
                int64_t pdd = r.pool_r[j] < rsz ? r.pd_at[r.pool_r[j]] : 0;
                if (oi < 0) cands[j] = pdd ? Cand{pdd, 0, 0, 0, pdd} : Cand{0, 0, 0, 0, 0};
                else {
                    const Overlap& o = r.ov[oi];
                    if (pdd > o.total) cands[j] = Cand{pdd, o.gpu, o.host, o.disk, pdd - o.total};
                    else cands[j] = Cand{o.total, o.gpu, o.host, o.disk, 0};
                }
            }
            for (auto& o : r.ov) r.ov_at[o.slot] = -1;
            for (auto& sd : r.pd) r.pd_at[sd.first] = 0;
            // ttfts_fast
            const Weights& w = r.w;
            double bs = (double)r.bs, t = w.t;
            double th = bs * w.host, td = bs * w.disk, tdec = w.dec_w * bs * w.dec;
            double kv_span = std::max(1e-9, 1.0 - w.kv_high);
            std::vector<double> ttft(np), costs(np);
            int64_t best = 0;
            std::vector<int64_t> nqv(np);
            for (size_t j = 0; j < np; j++) {
                const Row& s = r.rows[r.pool_r[j]];
                const Cand& c = cands[j];
                int64_t rep = s.rep_queue;
                bool has_rep = rep >= 0;
                if (!has_rep && s.rep_waiting >= 0) {
                    rep = s.rep_waiting * w.rrt;
                    has_rep = true;
                }
                // queue: max(in-flight prefill tokens, floor x queued requests, reported tokens), as in Python
                double q = (double)s.prefill_tokens;
                if (s.prefill_requests && w.qfloor * (double)s.prefill_requests > q) q = w.qfloor * (double)s.prefill_requests;
                if (has_rep && rep && (double)rep > q) q = (double)rep;
                int64_t nq = s.prefill_requests;
                if (s.rep_waiting > 0 && s.rep_waiting > nq) nq = s.rep_waiting;
                nqv[j] = nq ? nq : (q > 0 ? 1 : 0);
                if (c.total > best) best = c.total;
                int64_t un = ntok - (int64_t)r.bs * c.total;
                double prefill = un > 0 ? (double)un * t : 0.0;
                double cost = q * t + prefill + (double)s.decode_blocks * tdec;
                if (c.host || c.disk) cost += (double)c.host * th + (double)c.disk * td;
                bool has_kv = !std::isnan(s.rep_kv);
                if (has_kv || s.capacity) {
                    double u = has_kv ? s.rep_kv : std::min(1.0, (double)s.decode_blocks / (double)s.capacity);
                    if (u > w.kv_high && w.kv_w) cost += w.kv_w * std::min(1.0, (u - w.kv_high) / kv_span) * prefill;
                }
                ttft[j] = cost;
            }
            // fleet pressure over the candidates holding less than the best (all of them when all tie)
            int64_t n_others = 0, sum_others = 0;
            for (size_t j = 0; j < np; j++)
                if (cands[j].total < best) { n_others++; sum_others += nqv[j]; }
            if (!n_others) {
                n_others = (int64_t)np;
                for (size_t j = 0; j < np; j++) sum_others += nqv[j];
            }
            double busy = n_others ? std::min(w.cap, std::max(w.pfloor, (double)sum_others / (double)n_others)) : 0.0;
            double per_block = w.fleet_w * busy * bs * t;
            if (!roomv.empty() && roomv.size() != np) raise(PyExc_ValueError, "room: one cost per pool worker");
            for (size_t j = 0; j < np; j++) costs[j] = ttft[j] + per_block * (double)(best - cands[j].total);
            if (!roomv.empty())
                for (size_t j = 0; j < np; j++) costs[j] += roomv[j];
            int reason;
            const std::vector<double>* vals = &costs;
            bool relief = false;
            if (best > 0) {
                double tb = INFINITY, tmin = INFINITY;
                for (size_t j = 0; j < np; j++) {
                    if (cands[j].total == best && ttft[j] < tb) tb = ttft[j];
                    if (ttft[j] < tmin) tmin = ttft[j];
                }
                if (tb > w.relief * tmin && tmin < tb) relief = true;
            }
            if (relief) vals = &ttft;
            // argmin_tiebreak with the fair-share secondary key
            double bestv = INFINITY;
            for (double v : *vals) bestv = std::min(bestv, v);
            double tol = std::fabs(bestv) * 1e-9 + 1e-12;
            std::vector<size_t> tied;
            for (size_t j = 0; j < np; j++)
                if ((*vals)[j] <= bestv + tol) tied.push_back(j);
            if (tied.size() > 1) {  // cached_then_fair_share: more of the prompt, fewest in flight, fewest routed
                std::tuple<int64_t, int64_t, int64_t> k0{INT64_MAX, INT64_MAX, INT64_MAX};
                for (size_t j : tied) {
                    const Row& s = r.rows[r.pool_r[j]];
                    k0 = std::min(k0, std::make_tuple(-cands[j].total, s.active, s.routed));
                }
                std::vector<size_t> t2;
                for (size_t j : tied) {
                    const Row& s = r.rows[r.pool_r[j]];
                    if (std::make_tuple(-cands[j].total, s.active, s.routed) == k0) t2.push_back(j);
                }
                tied.swap(t2);
            }
            if (relief) reason = 3;
            else if (best == 0) reason = 0;
            else if (tied.size() == 1 && cands[tied[0]].total == best) reason = 1;
            else reason = 2;  // (several tied: the Python side recomputes the reason for its pick)
            py::list tl;
            for (size_t j : tied) {
                const Cand& c = cands[j];
                tl.append(py::make_tuple(j, c.total, c.gpu, c.host, c.disk, c.pend));
            }
            PyObject* cl = PyList_New((Py_ssize_t)np);
            for (size_t j = 0; j < np; j++) PyList_SET_ITEM(cl, j, PyFloat_FromDouble((*vals)[j]));
            size_t pend_at = nb;  // where the caller continues the pending add (nb: nothing left to add)
            if (tied.size() == 1) {
                const Cand& c = cands[tied[0]];
                if (nb && c.gpu + c.host + c.disk < (int64_t)nb)
                    pend_at = r.pending.add_range(r.pool_r[tied[0]], hs.data(), nb, 0, add_limit, now_pending);
            }
            return py::make_tuple(tl, reason, py::reinterpret_steal<py::list>(cl), best, ntok, pend_at);
        });
}
