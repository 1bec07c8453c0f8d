"""Build settings of the CUDA extension, shared by the ahead-of-time build (setup.py) and the just-in-time one
(entangle_fast/_cuda.py), so both compile the same sources with the same flags.

Environment:
    ENTANGLE_FAST_BUILD_CUDA=1         build the extension ahead of time in ``pip install`` (default: off; the
                                       extension is then compiled just in time on first use of ``impl="cuda"``)
    ENTANGLE_FAST_CUDA_ARCH_LIST       compute capabilities, ``;``- or ``,``-separated (default ``"8.0;9.0"``); an
                                       entry may end in ``a`` (``9.0a``) or ``+PTX`` (also embed PTX for newer GPUs)
    MAX_JOBS                           parallel compile jobs (read by torch's ninja build itself)

This file imports torch only inside :func:`cuda_extension` / :func:`cmdclass`, and only when the build is asked for,
so ``pip install`` on a machine without CUDA (or without torch in the build environment) never needs it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

CSRC = Path(__file__).resolve().parent
SOURCES = ("bindings.cpp", "logprob.cu", "ghost_gram.cu", "pair_wgrad.cu")
CUDA_SOURCES = ("logprob.cu", "ghost_gram.cu", "pair_wgrad.cu")
DEFAULT_ARCH_LIST = "8.0;9.0"
EXTENSION_NAME = "entangle_fast._cuda_C"  # ahead-of-time module; the just-in-time one is "entangle_fast_cuda"

_ARCH = re.compile(r"^(\d+)\.(\d)(a?)(\+PTX)?$")


def arch_list(value: str | None = None) -> list[str]:
    """The requested architectures, e.g. ``["8.0", "9.0"]``, from ``value`` or ENTANGLE_FAST_CUDA_ARCH_LIST."""
    if value is None:
        value = os.environ.get("ENTANGLE_FAST_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    archs = [a for a in re.split(r"[;,\s]+", value.strip()) if a]
    for a in archs:
        m = _ARCH.match(a)
        if m is None:
            raise ValueError(f"ENTANGLE_FAST_CUDA_ARCH_LIST entry {a!r} is not of the form 8.0, 9.0a or 9.0+PTX")
        if int(m.group(1)) < 8:
            raise ValueError(f"ENTANGLE_FAST_CUDA_ARCH_LIST entry {a!r}: the kernels need compute capability >= 8.0 "
                             "(bf16 tensor cores)")
    if not archs:
        raise ValueError("ENTANGLE_FAST_CUDA_ARCH_LIST is empty")
    return archs


def gencode_flags(archs: list[str] | None = None) -> list[str]:
    """nvcc ``-gencode`` flags for ``archs`` (default: :func:`arch_list`)."""
    flags = []
    for a in archs if archs is not None else arch_list():
        major, minor, suffix, ptx = _ARCH.match(a).groups()
        num = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cxx_flags() -> list[str]:
    # No -std: torch picks the C++ standard its headers need (C++20 for torch 2.13) and the sources accept C++17 up.
    return ["-O3"]


def nvcc_flags(archs: list[str] | None = None) -> list[str]:
    """Flags for the .cu files. torch adds its own (-D__CUDA_NO_HALF_OPERATORS__ and friends, which the sources
    respect); giving -gencode here stops torch from choosing architectures from TORCH_CUDA_ARCH_LIST or the GPU."""
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *gencode_flags(archs)]


def build_requested() -> bool:
    return os.environ.get("ENTANGLE_FAST_BUILD_CUDA", "0").strip().lower() in ("1", "true", "yes", "on")


def cuda_extension():
    """A ``CUDAExtension`` for ``entangle_fast._cuda_C`` when ENTANGLE_FAST_BUILD_CUDA=1, else None.

    Needs torch with CUDA in the build environment (``pip install --no-build-isolation``) and nvcc.
    """
    if not build_requested():
        return None
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None:
        raise RuntimeError(f"ENTANGLE_FAST_BUILD_CUDA=1 needs a CUDA build of torch; torch {torch.__version__} is "
                           "CPU-only. Unset it to install without the extension (impl='triton'/'torch' still work).")
    if CUDA_HOME is None:
        raise RuntimeError("ENTANGLE_FAST_BUILD_CUDA=1 needs nvcc: set CUDA_HOME or put nvcc on PATH")
    root = CSRC.parent
    return CUDAExtension(
        name=EXTENSION_NAME,
        # setuptools wants source paths relative to setup.py.
        sources=[str((CSRC / s).relative_to(root)) for s in SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
    )


def cmdclass(extension) -> dict:
    """``{"build_ext": BuildExtension}`` (ninja, honours MAX_JOBS) when ``extension`` is not None, else ``{}``."""
    if extension is None:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}
