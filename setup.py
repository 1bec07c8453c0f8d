"""Build script for entangle_fast.

`kernels/` (Triton) installs as the subpackage `entangle_fast.kernels`. The CUDA extension in `csrc/` is built
just-in-time on first use; an ahead-of-time build is opt-in (see docs/cuda.md once it lands).

Torch is required but deliberately unpinned from above: a GPU machine keeps its CUDA build of torch, and a CPU machine
that already has torch installed is not upgraded to a newer (CUDA) build by pip.
"""
import importlib.util
import os

from setuptools import find_packages, setup


def _cuda_build():
    """The optional ahead-of-time CUDA extension of csrc/build.py (ENTANGLE_FAST_BUILD_CUDA=1); none by default."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "build.py")
    if not os.path.exists(path):
        return [], {}
    spec = importlib.util.spec_from_file_location("_entangle_fast_csrc_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ext = mod.cuda_extension()
    return ([ext] if ext is not None else []), mod.cmdclass(ext)


ext_modules, cmdclass = _cuda_build()

setup(
    name="entangle-fast",
    version="0.1.0",
    description="Fused kernels that measure gradient entanglement in preference alignment at every training step",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Every subpackage of entangle_fast/, plus kernels/, csrc/ and benchmarks/ installed under it.
    packages=find_packages(include=["entangle_fast", "entangle_fast.*"])
    + ["entangle_fast.kernels", "entangle_fast.csrc", "entangle_fast.benchmarks"],
    package_dir={"entangle_fast": "entangle_fast", "entangle_fast.kernels": "kernels", "entangle_fast.csrc": "csrc",
                 "entangle_fast.benchmarks": "benchmarks"},
    # The CUDA sources travel in the wheel for the just-in-time build (no compiled code, no CUDA needed to install);
    # the benchmark suites (pytest files and their helpers) for `entangle-fast bench` from an installed wheel
    # (entangle_fast.bench.benchmarks_dir), without the committed results.
    package_data={"entangle_fast.csrc": ["*.cu", "*.cuh", "*.cpp"], "entangle_fast.benchmarks": ["*.py"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.46",
        "ninja",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "wheel"],
        # TRL's DPOTrainer integration (entangle_fast.integrations.trl) and PEFT LoRA coverage of the monitor.
        "trl": ["trl>=0.29,<2", "peft>=0.13", "accelerate>=1.4"],
    },
    entry_points={"console_scripts": ["entangle-fast = entangle_fast.cli:main"]},
)
