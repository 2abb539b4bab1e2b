"""Builds weightablate._C: the CPU kernels always, the CUDA kernels when nvcc and a
CUDA build of torch are present (no GPU needed). WEIGHTABLATE_CUDA=0/1 forces either way.

    pip install --no-build-isolation -e .
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_cuda_home():
    """CUDA_HOME, seeing through an `nvcc` on PATH that is a wrapper script (exec /x/bin/nvcc)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ["CUDA_PATH"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            m = re.search(rb"exec\s+(\S+/bin/nvcc)", head)
            if m:
                nvcc = m.group(1).decode()
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _want_cuda(cu_sources):
    switch = os.environ.get("WEIGHTABLATE_CUDA")
    if switch == "0" or not cu_sources:
        return False, "disabled" if switch == "0" else "no .cu sources"
    import torch

    home = _real_cuda_home()
    ok = torch.version.cuda is not None and home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    if switch == "1" and not ok:
        sys.exit("WEIGHTABLATE_CUDA=1 but no nvcc / CUDA build of torch was found")
    if ok:
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home  # torch read CUDA_HOME at import: point it at the real toolkit
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return ok, (home if ok else "no nvcc or CPU-only torch")


def extensions():
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda, why = _want_cuda(cu)
    # -fno-trapping-math: GCC may then turn branches on float compares into selects, which AVX2
    # can vectorise; no value changes (no reassociation, no contraction)
    cxx = ["-O3", "-fno-trapping-math", "-fopenmp", "-DWA_OPENMP"]
    args = dict(sources=cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    print(f"weightablate: building CPU kernels ({len(cpp)} files); CUDA: {'yes, ' + why if use_cuda else 'no (' + why + ')'}"
          + (f", arch {os.environ.get('TORCH_CUDA_ARCH_LIST')}" if use_cuda else ""))
    if use_cuda:
        args["sources"] = cpp + cu
        args["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        return [cpp_extension.CUDAExtension("weightablate._C", **args)]
    return [cpp_extension.CppExtension("weightablate._C", **args)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
