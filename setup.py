"""Builds kvroute's compiled core (kvroute.kvindex._kvcore, C++ via pybind11); metadata lives in pyproject.toml."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

core = Pybind11Extension(
    "kvroute.kvindex._kvcore",
    ["kvroute/kvindex/_core/module.cpp"],
    depends=[f"kvroute/kvindex/_core/{h}" for h in ("xxh3.hpp", "tables.hpp", "index.hpp", "pending.hpp", "vllm_frame.hpp", "density_heaps.hpp", "active.hpp")],
    cxx_std=17,
    # -ffp-contract=off: no fused multiply-add, so the compiled route's costs equal the Python policy's bit for bit
    extra_compile_args=["-O2", "-ffp-contract=off", "-fvisibility=hidden"],
)

setup(ext_modules=[core], cmdclass={"build_ext": build_ext})
