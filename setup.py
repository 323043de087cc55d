"""Build sparse_attn and its C++/CUDA extension ``sparse_attn._C``.

The CPU kernels are always built. The CUDA kernels are built whenever nvcc is found
(set ``SPARSE_ATTN_NO_CUDA=1`` to skip them, e.g. for a quick CPU-only rebuild).
``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0``; ``MAX_JOBS`` defaults to what the
machine's cores and memory allow.
"""
import glob
import os
import re
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root_of(nvcc_path):
    """The CUDA toolkit root that an nvcc on PATH belongs to.

    nvcc may be a wrapper script that execs the real compiler: torch's guess (the parent of
    the wrapper's folder) is then wrong and linking fails on -lcudart, so read the script.
    """
    real = os.path.realpath(nvcc_path)
    candidates = [os.path.dirname(os.path.dirname(real))]
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            candidates = [m.decode() for m in re.findall(rb"(/[^\s\"']+)/bin/nvcc\b", head)] + candidates
    except OSError:
        pass
    candidates.append("/usr/local/cuda")  # the conventional default location
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _find_cuda_home():
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    return _toolkit_root_of(nvcc) if nvcc else None


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return max(1, min(cores, int(mem_gib // 4)))  # nvcc peaks near 3-4 GiB per job


WITH_CUDA = os.environ.get("SPARSE_ATTN_NO_CUDA", "0") != "1" and _find_cuda_home() is not None
if WITH_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME when imported: set it first.
    os.environ.setdefault("CUDA_HOME", _find_cuda_home())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _extension():
    sources = ["csrc/ops.cpp", "csrc/encodings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math: the values are unchanged (only floating-point exception flags are not
    # kept), and it lets GCC turn float selects (relu, PReLU, clamps) into vector blends; with the
    # default, every loop holding a float comparison stays scalar ("control flow in loop").
    # -fno-math-errno: the values are unchanged too (sqrt and the like are still correctly rounded;
    # only errno is no longer set on a domain error, which nothing reads), and it lets GCC vectorise
    # sqrt (layer_norm2d's 1/sqrt(var + eps) per pixel): with errno kept, every sqrt is a scalar
    # sqrtss with a branch to the library call.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not WITH_CUDA:
        return CppExtension("sparse_attn._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension("sparse_attn._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(
    name="sparse-attn",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for image-restoration transformers",
    packages=["sparse_attn", "sparse_attn.ops", "sparse_attn.reference", "sparse_attn.nn",
              "sparse_attn.kernels", "sparse_attn.models", "sparse_attn.cli"],
    package_dir={"sparse_attn.kernels": "kernels", "sparse_attn.models": "models"},
    # The Makefile sets SPARSE_ATTN_SKIP_EXTENSION for the editable install, which only registers
    # the package paths; `setup.py build_ext --inplace` then builds the extension incrementally.
    ext_modules=[] if os.environ.get("SPARSE_ATTN_SKIP_EXTENSION") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["sparse-attn = sparse_attn.cli.main:main"]},
    python_requires=">=3.10",
)
