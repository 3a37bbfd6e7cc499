"""Builds maskprune and its extension maskprune._C.

C++ CPU ops are always built (OpenMP through ATen's parallel_for). CUDA ops are added when torch
has CUDA and nvcc is found, unless MASKPRUNE_NO_CUDA=1. CUDA_HOME and the CUDA include folders are
derived here, because nvcc on many machines is a wrapper outside the toolkit's folder.

Release settings:
- CUDA code is SASS for sm_80 and sm_90 plus PTX of sm_90 (`9.0+PTX`), which the driver JIT-compiles on
  newer GPUs instead of failing with "no kernel image"; TORCH_CUDA_ARCH_LIST overrides.
- The wheel requires exactly the torch it was built against (`torch==<major.minor.patch>`): the .so
  links against that build's libraries and fails to load with any other.
- MASKPRUNE_STRIP=1 strips the .so's symbols and debug info at link time (28 MB -> a few MB);
  default: on for `pip wheel` / `bdist_wheel`, off for editable and other builds. MASKPRUNE_STRIP=0 keeps them.
- MASKPRUNE_PTXAS_VERBOSE=1 passes -Xptxas -v to nvcc (registers, spills, shared memory per kernel in
  the build log; scripts/check_ptxas.py compiles the .cu files itself and checks the same).
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


# SASS for A100 and H100, and PTX (+PTX) of the last so that newer GPUs JIT-compile it.
CUDA_ARCH_LIST = "8.0;9.0+PTX"


def want_strip(argv: list[str]) -> bool:
    """Whether to strip the extension: MASKPRUNE_STRIP=1/0, else only when building a wheel for release."""
    flag = os.environ.get("MASKPRUNE_STRIP")
    if flag is not None:
        if flag not in ("0", "1"):
            raise SystemExit(f"MASKPRUNE_STRIP must be 0 or 1, got {flag!r}")
        return flag == "1"
    return "bdist_wheel" in argv


def torch_requirement() -> str:
    """torch==<the build's major.minor.patch> (a local tag such as +cu130 is dropped: `==2.14.1` matches
    2.14.1+cu130), because the compiled extension loads only with that torch."""
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    # The C++ standard comes from torch (C++17 up to 2.9, C++20 after). No FMA contraction: the passes compiled
    # for AVX2 / AVX-512 and chosen at run time must give the baseline (SSE2) pass's bits.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    extra = {"cxx": cxx}
    strip = want_strip(sys.argv)
    kwargs = dict(extra_link_args=["-fopenmp"] + (["-s"] if strip else []))
    if strip:
        print("maskprune: stripping the extension (MASKPRUNE_STRIP=0 keeps symbols and debug info)")
    if with_cuda:
        sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"] + ([] if strip else ["-lineinfo"])
        if os.environ.get("MASKPRUNE_PTXAS_VERBOSE") == "1":
            extra["nvcc"].append("-Xptxas=-v")
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
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["maskprune", "maskprune.nn", "maskprune.masks", "maskprune.kernels"],
    package_dir={"maskprune": "maskprune", "maskprune.nn": "maskprune/nn", "maskprune.masks": "maskprune/masks",
                 "maskprune.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[torch_requirement(), "numpy", "tqdm"],
    extras_require={"triton": ["triton"], "test": ["pytest"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["maskprune = maskprune.cli:main"]},
)
