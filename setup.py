"""Build of loram_fast.

The Triton kernels live in ``triton_kernels/`` and install as ``loram_fast.triton_kernels`` (a PyPI
package named ``triton_kernels`` exists; ours must not clash with it).

Native code (``csrc/``) builds into ``loram_fast._C`` when torch is importable at build time
(``pip install --no-build-isolation -e .``): the CPU kernels always; CUDA kernels (``csrc/cuda/``) with
``LORAM_FAST_CUDA=1`` where torch has CUDA and ``nvcc`` is found. ``LORAM_FAST_NO_EXT=1`` skips native code
entirely. Without a build here, a source checkout JIT-compiles the CPU extension on first use (ninja), and
any install falls back to pure torch when no extension can be had.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("LORAM_FAST_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp:
        return [], {}
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    # CUDA kernels only on request (LORAM_FAST_CUDA=1), where torch has CUDA and nvcc exists
    want_cuda = os.environ.get("LORAM_FAST_CUDA", "0") == "1"
    use_cuda = bool(cu) and want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    # at::parallel_for is OpenMP code in torch's headers: without -fopenmp the extension's loops run on one thread
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++17", *omp]
    if use_cuda:
        ext = CUDAExtension("loram_fast._C", cpp + cu, define_macros=[("LORAM_FAST_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]}, extra_link_args=omp)
    else:
        ext = CppExtension("loram_fast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=omp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="loram_fast",
    version="0.1.0",
    description="Fast, exact LoRA initialisations (LoRAM, PiSSA, MiLoRA, OLoRA, ...) for Hugging Face peft",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["loram_fast", "loram_fast.ops", "loram_fast.methods", "loram_fast.triton_kernels"],
    package_dir={"loram_fast.triton_kernels": "triton_kernels"},
    install_requires=[
        "torch>=2.1",
        "peft>=0.17,<0.23",
        "transformers>=4.40",
        "numpy",
        "tqdm",
        "safetensors",
        "ninja",  # JIT build of the C++ extension on first use, when it was not built at install
        "triton; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest"], "bench": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
