"""Builds harmonica_kernels._C (C++ CPU ops always, CUDA ops when possible) with ninja.

Environment:
  HARMONICA_NO_EXT=1       build no extension; every op runs on the torch reference path
  FORCE_CUDA=1             compile the CUDA ops even without a visible CUDA torch/toolkit pairing
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0")
  MAX_JOBS                 parallel compile jobs (read by torch's ninja builder)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["harmonica_kernels", "harmonica_kernels.*"]) + find_packages(
    "python", include=["harmonica", "harmonica.*"]
)
PACKAGE_DIR = {"harmonica_kernels": "harmonica_kernels", "harmonica": "python/harmonica"}


def _extensions():
    if os.environ.get("HARMONICA_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden"]
    link_flags = []
    # at::parallel_for is only parallel when the extension itself is compiled with OpenMP
    # (it then shares torch's libgomp); without it the CPU kernels silently run on one thread.
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    if with_cuda:
        ext = CUDAExtension(
            "harmonica_kernels._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_link_args=link_flags,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"],
            },
        )
    else:
        ext = CppExtension(
            "harmonica_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_link_args=link_flags,
            extra_compile_args={"cxx": cxx_flags},
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    include_package_data=True,
)
