"""Builds maskprune and its extension maskprune._C.

C++ CPU ops are always built (OpenMP through ATen's parallel_for). CUDA ops are added when torch
has CUDA and nvcc is found, unless MASKPRUNE_NO_CUDA=1. CUDA_HOME and the CUDA include folders are
derived here, because nvcc on many machines is a wrapper outside the toolkit's folder.
"""
import glob
import os
import re
import shutil
import site
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME, /usr/local/cuda, or the one nvcc (or the script it wraps) lives in."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        candidates.append(str(Path(nvcc).parent.parent))
        try:  # a wrapper script: `exec /path/to/cuda/bin/nvcc "$@"`
            match = re.search(r"(/\S+)/bin/nvcc", Path(nvcc).read_text(errors="ignore")[:4096])
            if match:
                candidates.append(match.group(1))
        except OSError:
            pass
    for home in candidates:
        if home and Path(home, "bin", "nvcc").exists() and Path(home, "include", "cuda_runtime.h").exists():
            return str(Path(home).resolve())
    return None


def nvidia_wheel_includes() -> list[str]:
    """Include folders of the `nvidia-*` wheels that the CUDA build of torch depends on (cublas_v2.h, cusparse.h)."""
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if inc not in found:
                found.append(inc)
    return found


def want_cuda() -> tuple[bool, str | None]:
    import torch

    if os.environ.get("MASKPRUNE_NO_CUDA", "0") == "1":
        print("maskprune: MASKPRUNE_NO_CUDA=1, building the CPU ops only")
        return False, None
    if torch.version.cuda is None:
        print("maskprune: torch has no CUDA, building the CPU ops only")
        return False, None
    home = find_cuda_home()
    if home is None:
        print("maskprune: nvcc/CUDA toolkit not found, building the CPU ops only")
        return False, None
    return True, home


def extensions():
    with_cuda, cuda_home = want_cuda()
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++17 up to 2.9, C++20 after)
    extra = {"cxx": cxx}
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("maskprune._C", sources, extra_compile_args=extra,
                            include_dirs=nvidia_wheel_includes(), **kwargs)
        print(f"maskprune: building CPU and CUDA ops (CUDA_HOME={cuda_home}, "
              f"arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = CppExtension("maskprune._C", sources, extra_compile_args=extra, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def version() -> str:
    text = (ROOT / "maskprune" / "__init__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


ext_modules, cmdclass = extensions()
setup(
    name="maskprune",
    version=version(),
    description="Mask training over frozen random networks (edge-popup), with Triton and C++/CUDA kernels",
    python_requires=">=3.10",
    packages=["maskprune", "maskprune.nn", "maskprune.kernels"],
    package_dir={"maskprune": "maskprune", "maskprune.nn": "maskprune/nn", "maskprune.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.6", "numpy", "tqdm"],
    extras_require={"triton": ["triton"], "test": ["pytest"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["maskprune = maskprune.cli:main"]},
)
