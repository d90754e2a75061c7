// Density-ranked candidate heaps and the hit-density table: the compiled twins of the learned
// eviction policy's victim search and refresh (kvroute/eviction/policies/adaptive.py is the reference;
// tests/test_eviction_native.py compares them exactly).  Generic: classes, a table of values per class
// and age bin, heaps of (time, seq) entries; no eviction-specific type, so the ground floor may host it.
//
// * DensityHeaps: one min-heap of candidates per class, ordered by (last access t, seq), stale entries
//   dropped lazily (an entry lives while its seq is in `live_`).  The victim is the class head of the
//   lowest rank (level, t, class, seq) at `now`, level = floor(log2(v) / quantum) (v itself when the
//   quantum is 0; -inf when v <= 0), v = table[class][bin(now - t)].  The heads' ranks at one `now` sit
//   in a heap (`vheap_`) that lives until `now` or the table changes: a withdrawn head re-ranks its
//   class only.  Same arithmetic as Adaptive._class_head / _bin (IEEE doubles, libm log2).
// * density_table: Adaptive._density for every row of a (classes x bins) hazard array; open_bins and
//   hazard_table: the rest of Adaptive._refresh (its numpy code is the reference).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <unordered_map>
#include <vector>

namespace kvcore {
namespace py = pybind11;

// Raise a Python exception of `type` (set directly: no C++ exception translator can turn it into another).
[[noreturn]] inline void dh_raise(PyObject* type, const char* msg) {
    PyErr_SetString(type, msg);
    throw py::error_already_set();
}

class DensityHeaps {
public:
    struct Rank {
        double lv, t;
        int c;
        int64_t seq;
        double v;
    };

    DensityHeaps(int nclasses, std::vector<double> edges, int nbins, double quantum)
        : C_(nclasses), nb_(nbins), q_(quantum), edges_(std::move(edges)), heaps_(nclasses),
          vtop_(nclasses, -1), vtop_t_(nclasses, 0.0), table_(size_t(nclasses) * nbins, 1.0) {
        if (nclasses < 1 || nbins < 1 || edges_.empty() || int(edges_.size()) > nbins)
            dh_raise(PyExc_ValueError, "DensityHeaps: bad shape");
    }

    //: The density table, row-major (classes x bins); the snapshot of ranks is dropped.
    void set_table(py::array_t<double, py::array::c_style | py::array::forcecast> tab) {
        if (tab.ndim() != 2 || tab.shape(0) != C_ || tab.shape(1) != nb_)
            dh_raise(PyExc_ValueError, "DensityHeaps.set_table: shape must be (classes, bins)");
        std::copy(tab.data(), tab.data() + table_.size(), table_.begin());
        valid_ = false;
    }

    void invalidate() { valid_ = false; }

    //: Age bin of `age` seconds (Adaptive._bin).
    int bin(double age) const {
        if (age <= 0.0) return 0;
        if (age < edges_.back())
            return int(std::upper_bound(edges_.begin(), edges_.end(), age) - edges_.begin()) - 1;
        return nb_ - 1;
    }

    int nbins() const { return nb_; }

    double value(int c, double t, double now) const {
        check_class(c);
        return table_[size_t(c) * nb_ + bin(now - t)];
    }

    void push(int c, double t, int64_t seq, py::object key) {
        check_class(c);
        live_[seq] = Live{c, std::move(key)};
        auto& h = heaps_[c];
        h.push_back(Ent{t, seq});
        std::push_heap(h.begin(), h.end(), ent_greater);
        ++pushed_;
        if (valid_ && (vtop_[c] < 0 || t < vtop_t_[c] || (t == vtop_t_[c] && seq < vtop_[c]))) {
            auto r = rank_class(c);
            if (r && r->seq != vtop_[c]) set_top(*r);
        }
        if (pushed_ > 4 * live_.size() + 1024) compact();
    }

    //: Entry `seq` is no longer a candidate (unknown seqs are ignored).
    void withdraw(int64_t seq) {
        auto it = live_.find(seq);
        if (it == live_.end()) return;
        int c = it->second.c;
        live_.erase(it);
        if (valid_ && vtop_[c] == seq) rerank(c);
    }

    std::optional<Rank> peek_rank(double now) {
        if (!valid_ || now != vnow_) rebuild(now);
        while (!vheap_.empty()) {
            const Rank e = vheap_.front();
            if (vtop_[e.c] == e.seq) {
                if (live_.count(e.seq)) return e;
                pop_v();
                rerank(e.c);
            } else {
                pop_v();
            }
        }
        return std::nullopt;
    }

    py::object peek(double now) {
        auto r = peek_rank(now);
        if (!r) return py::none();
        return py::make_tuple(r->lv, r->t, r->c, r->seq, live_.at(r->seq).key, r->v);
    }

    //: Whether an entry of class c last used at t ranks above the victim at `now` by (level, t) (True when
    //: there is no victim): Adaptive._union_admit's comparison.
    bool outranks(int c, double t, double now) {
        check_class(c);
        auto r = peek_rank(now);
        if (!r) return true;
        const double v = value(c, t, now);
        const double lv = q_ != 0.0 ? (v > 0 ? std::floor(std::log2(v) / q_) : -std::numeric_limits<double>::infinity()) : v;
        return lv > r->lv || (lv == r->lv && t > r->t);
    }

    //: (t, seq, key) of class c's live head, or None.
    py::object head(int c) {
        check_class(c);
        const Ent* e = clean_head(c);
        if (!e) return py::none();
        return py::make_tuple(e->t, e->seq, live_.at(e->seq).key);
    }

    size_t entries() const {
        size_t n = 0;
        for (auto& h : heaps_) n += h.size();
        return n;
    }
    size_t live() const { return live_.size(); }

private:
    struct Ent {
        double t;
        int64_t seq;
    };
    struct Live {
        int c;
        py::object key;
    };
    static bool ent_greater(const Ent& a, const Ent& b) { return a.t > b.t || (a.t == b.t && a.seq > b.seq); }
    static bool rank_greater(const Rank& a, const Rank& b) {
        if (a.lv != b.lv) return a.lv > b.lv;
        if (a.t != b.t) return a.t > b.t;
        if (a.c != b.c) return a.c > b.c;
        return a.seq > b.seq;
    }

    void check_class(int c) const {
        if (c < 0 || c >= C_) dh_raise(PyExc_IndexError, "DensityHeaps: class out of range");
    }

    const Ent* clean_head(int c) {
        auto& h = heaps_[c];
        while (!h.empty()) {
            auto it = live_.find(h.front().seq);
            if (it != live_.end() && it->second.c == c) return &h.front();
            std::pop_heap(h.begin(), h.end(), ent_greater);
            h.pop_back();
        }
        return nullptr;
    }

    std::optional<Rank> rank_class(int c) {
        const Ent* e = clean_head(c);
        if (!e) return std::nullopt;
        double v = value(c, e->t, vnow_);
        double lv;
        if (q_ != 0.0)
            lv = v > 0 ? std::floor(std::log2(v) / q_) : -std::numeric_limits<double>::infinity();
        else
            lv = v;
        return Rank{lv, e->t, c, e->seq, v};
    }

    void set_top(const Rank& r) {
        vheap_.push_back(r);
        std::push_heap(vheap_.begin(), vheap_.end(), rank_greater);
        vtop_[r.c] = r.seq;
        vtop_t_[r.c] = r.t;
    }

    void rerank(int c) {
        auto r = rank_class(c);
        if (r)
            set_top(*r);
        else
            vtop_[c] = -1;
    }

    void pop_v() {
        std::pop_heap(vheap_.begin(), vheap_.end(), rank_greater);
        vheap_.pop_back();
    }

    void rebuild(double now) {
        vnow_ = now;
        valid_ = true;
        vheap_.clear();
        std::fill(vtop_.begin(), vtop_.end(), -1);
        for (int c = 0; c < C_; ++c) {
            if (heaps_[c].empty()) continue;
            auto r = rank_class(c);
            if (r) {
                vheap_.push_back(*r);
                vtop_[c] = r->seq;
                vtop_t_[c] = r->t;
            }
        }
        std::make_heap(vheap_.begin(), vheap_.end(), rank_greater);
    }

    void compact() {
        size_t n = 0;
        for (int c = 0; c < C_; ++c) {
            auto& h = heaps_[c];
            h.erase(std::remove_if(h.begin(), h.end(),
                                   [&](const Ent& e) {
                                       auto it = live_.find(e.seq);
                                       return it == live_.end() || it->second.c != c;
                                   }),
                    h.end());
            std::make_heap(h.begin(), h.end(), ent_greater);
            n += h.size();
        }
        pushed_ = n;
    }

    int C_, nb_;
    double q_;
    std::vector<double> edges_;
    std::vector<std::vector<Ent>> heaps_;
    std::unordered_map<int64_t, Live> live_;
    size_t pushed_ = 0;
    // snapshot of the class heads' ranks at vnow_ (valid_ false: rebuilt by the next peek)
    bool valid_ = false;
    double vnow_ = 0.0;
    std::vector<Rank> vheap_;
    std::vector<int64_t> vtop_;
    std::vector<double> vtop_t_;
    std::vector<double> table_;
};

//: Adaptive._density for every row of lam (classes x bins): hit density per age bin over horizon T,
//: with the scalar reference's arithmetic in its order (built with -ffp-contract=off).
inline py::array_t<double> density_table(py::array_t<double, py::array::c_style | py::array::forcecast> lam, double T,
                                         const std::vector<double>& mids, const std::vector<double>& a0) {
    if (lam.ndim() != 2) dh_raise(PyExc_ValueError, "density_table: lam must be 2-d");
    const py::ssize_t C = lam.shape(0), nb = lam.shape(1);
    if (py::ssize_t(mids.size()) != nb || py::ssize_t(a0.size()) != nb)
        dh_raise(PyExc_ValueError, "density_table: mids and a0 must have one entry per bin");
    py::array_t<double> out({C, nb});
    const double* L = lam.data();
    double* H = out.mutable_data();
    for (py::ssize_t r = 0; r < C; ++r) {
        const double* lr = L + r * nb;
        double* hr = H + r * nb;
        for (py::ssize_t i = 0; i < nb; ++i) {
            const double a = a0[i], lim = a + T;
            double surv = 1.0, got = 0.0, space = 0.0;
            for (py::ssize_t j = i; j < nb; ++j) {
                const double mj = mids[j];
                if (mj > lim) break;
                const double pj = surv * lr[j];
                got += pj;
                const double w = mj - a;
                space += pj * (w < 0.125 ? 0.125 : w);
                surv -= pj;
            }
            const double rest = 1.0 - got;
            space += (rest < 0.0 ? 0.0 : rest) * T;
            hr[i] = space > 0 ? got / space : 0.0;
        }
    }
    return out;
}

//: Open lifetimes per class and age bin (Adaptive._refresh's `ob`): opens[c] is a dict {start slot: count};
//: a lifetime's age is now - (slot + 0.5) * slot_s, binned as DensityHeaps::bin.  Integer counts: exact sums.
inline py::array_t<double> open_bins(py::list opens, double now, double slot_s, const DensityHeaps& bins) {
    const py::ssize_t C = py::ssize_t(opens.size()), nb = bins.nbins();
    py::array_t<double> out({C, nb});
    double* O = out.mutable_data();
    std::fill(O, O + C * nb, 0.0);
    for (py::ssize_t c = 0; c < C; ++c) {
        PyObject* d = PyList_GET_ITEM(opens.ptr(), c);
        if (!PyDict_Check(d)) dh_raise(PyExc_TypeError, "open_bins: opens must be a list of dicts");
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(d, &pos, &k, &v)) {
            const double s = PyFloat_AsDouble(k), n = PyFloat_AsDouble(v);
            if (PyErr_Occurred()) throw py::error_already_set();
            const double age = now - (s + 0.5) * slot_s;
            O[c * nb + bins.bin(age)] += n;
        }
    }
    return out;
}

//: Adaptive._refresh's hazards and densities (its numpy code is the reference): risk sets (Kaplan-Meier),
//: hazards shrunk toward their group's and the groups' toward all classes', then density_table.
inline py::array_t<double> hazard_table(py::array_t<double, py::array::c_style | py::array::forcecast> hits_a,
                                        py::array_t<double, py::array::c_style | py::array::forcecast> gone_a,
                                        py::array_t<double, py::array::c_style | py::array::forcecast> ob_a,
                                        const std::vector<std::vector<int>>& groups, double k, double T,
                                        const std::vector<double>& mids, const std::vector<double>& a0) {
    if (hits_a.ndim() != 2 || gone_a.ndim() != 2 || ob_a.ndim() != 2)
        dh_raise(PyExc_ValueError, "hazard_table: 2-d arrays expected");
    const py::ssize_t C = hits_a.shape(0), nb = hits_a.shape(1);
    if (gone_a.shape(0) != C || ob_a.shape(0) != C || gone_a.shape(1) != nb || ob_a.shape(1) != nb)
        dh_raise(PyExc_ValueError, "hazard_table: shapes differ");
    const double *H = hits_a.data(), *G = gone_a.data(), *O = ob_a.data();
    std::vector<double> risk(size_t(C * nb));
    for (py::ssize_t c = 0; c < C; ++c) {
        const py::ssize_t r = c * nb;
        double acc = 0.0;  // sum of x over the later bins, added from the last bin down (numpy's reversed cumsum)
        for (py::ssize_t j = nb - 1; j >= 0; --j) {
            risk[r + j] = ((acc + H[r + j]) + G[r + j]) + 0.5 * O[r + j];
            const double x = (H[r + j] + G[r + j]) + O[r + j];
            acc = (j == nb - 1) ? x : acc + x;
        }
    }
    auto pooled = [&](const std::vector<int>& cs, std::vector<double>& ph, std::vector<double>& pr) {
        ph.assign(size_t(nb), 0.0);
        pr.assign(size_t(nb), 0.0);
        bool first = true;
        for (int c : cs) {
            if (c < 0 || c >= C) dh_raise(PyExc_IndexError, "hazard_table: class out of range");
            const py::ssize_t r = py::ssize_t(c) * nb;
            for (py::ssize_t j = 0; j < nb; ++j) {
                ph[j] = first ? H[r + j] : ph[j] + H[r + j];
                pr[j] = first ? risk[r + j] : pr[j] + risk[r + j];
            }
            first = false;
        }
    };
    auto shrunk = [&](double h, double r, double prior) {
        const double d = r + k;
        return d > 0 ? (h + k * prior) / d : prior;
    };
    std::vector<int> all(static_cast<size_t>(C));
    for (py::ssize_t c = 0; c < C; ++c) all[c] = int(c);
    std::vector<double> ah, ar, gh, gr;
    std::vector<double> top(static_cast<size_t>(nb)), glam(static_cast<size_t>(nb));
    pooled(all, ah, ar);
    for (py::ssize_t j = 0; j < nb; ++j) top[j] = ar[j] > 0 ? ah[j] / ar[j] : 0.0;
    py::array_t<double> lam({C, nb});
    double* L = lam.mutable_data();
    for (const auto& cs : groups) {
        pooled(cs, gh, gr);
        for (py::ssize_t j = 0; j < nb; ++j) glam[j] = shrunk(gh[j], gr[j], top[j]);
        for (int c : cs) {
            const py::ssize_t r = py::ssize_t(c) * nb;
            for (py::ssize_t j = 0; j < nb; ++j) L[r + j] = shrunk(H[r + j], risk[r + j], glam[j]);
        }
    }
    return density_table(lam, T, mids, a0);
}

inline void bind_density_heaps(py::module_& m) {
    py::class_<DensityHeaps>(m, "DensityHeaps",
                             "Per-class candidate heaps ranked by a density table (twin of adaptive's victim search).")
        .def(py::init<int, std::vector<double>, int, double>(), py::arg("nclasses"), py::arg("edges"),
             py::arg("nbins"), py::arg("quantum"))
        .def("set_table", &DensityHeaps::set_table)
        .def("invalidate", &DensityHeaps::invalidate)
        .def("bin", &DensityHeaps::bin)
        .def("value", &DensityHeaps::value)
        .def("push", &DensityHeaps::push)
        .def("withdraw", &DensityHeaps::withdraw)
        .def("peek", &DensityHeaps::peek)
        .def("head", &DensityHeaps::head)
        .def("outranks", &DensityHeaps::outranks)
        .def("entries", &DensityHeaps::entries)
        .def("live", &DensityHeaps::live);
    m.def("density_table", &density_table, py::arg("lam"), py::arg("T"), py::arg("mids"), py::arg("a0"));
    m.def("open_bins", &open_bins, py::arg("opens"), py::arg("now"), py::arg("slot_s"), py::arg("bins"));
    m.def("hazard_table", &hazard_table, py::arg("hits"), py::arg("gone"), py::arg("ob"), py::arg("groups"),
          py::arg("k"), py::arg("T"), py::arg("mids"), py::arg("a0"));
}

}  // namespace kvcore
