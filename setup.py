"""Build of loram_fast.

The Triton kernels live in ``triton_kernels/`` and install as ``loram_fast.triton_kernels`` (a PyPI
package named ``triton_kernels`` exists; ours must not clash with it).

Native code (``csrc/``) builds into ``loram_fast._C`` when torch is importable at build time
(``pip install --no-build-isolation -e .``): the CPU kernels always; CUDA kernels (``csrc/cuda/``) with
``LORAM_FAST_CUDA=1`` where torch has CUDA and ``nvcc`` is found. ``LORAM_FAST_NO_EXT=1`` skips native code
entirely. Otherwise (a plain ``pip install -e .`` builds in an isolated environment without torch) the extension
is built once per machine on first use, or ahead of time by ``python -m loram_fast.build``; any install falls
back to pure torch when no extension can be had. Flags and sources come from ``loram_fast/build.py``, shared
with that build; the C++ standard is the one torch chooses.
"""
import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch versions that CI tests: the lowest (2.13, the "low" leg of .ci/run) and the newest admitted (2.14)
TORCH_RANGE = "torch>=2.13,<2.15"


def _build_config():
    """loram_fast/build.py loaded by path (importing the package would import torch and peft)."""
    spec = importlib.util.spec_from_file_location("_loram_fast_build", os.path.join(ROOT, "loram_fast", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ext_modules():
    if os.environ.get("LORAM_FAST_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    cfg = _build_config()
    cpp = [os.path.relpath(f, ROOT) for f in cfg.sources(cuda=False)]
    if not cpp:
        return [], {}
    cu = [os.path.relpath(f, ROOT) for f in cfg.sources(cuda=True) if f.endswith(".cu")]
    # CUDA kernels only on request (LORAM_FAST_CUDA=1), where torch has CUDA and nvcc exists
    want_cuda = os.environ.get("LORAM_FAST_CUDA", "0") == "1"
    use_cuda = bool(cu) and want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    if use_cuda:
        ext = CUDAExtension("loram_fast._C", cpp + cu, define_macros=[("LORAM_FAST_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cfg.cxx_flags(), "nvcc": cfg.nvcc_flags()},
                            extra_link_args=cfg.ld_flags())
    else:
        ext = CppExtension("loram_fast._C", cpp, extra_compile_args={"cxx": cfg.cxx_flags()},
                           extra_link_args=cfg.ld_flags())
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
        TORCH_RANGE,
        "peft>=0.17,<0.23",
        "transformers>=4.40",
        "numpy",
        "tqdm",
        "safetensors",
        "ninja",  # the build of the C++ extension on first use, when it was not built at install
        "triton; platform_system == 'Linux'",
    ],
    # bitsandbytes: the reference that tests/test_loftq.py checks the NF4 / int8 quantisers against (its CPU
    # implementation); attrs: peft's corda.py imports it (tests/test_corda.py runs peft's CorDA); scipy: peft's
    # LoraConfig(init_lora_weights="loftq") requires it (tests/test_loftq.py, the hook); the library
    # itself imports none of them
    extras_require={"test": ["pytest", "bitsandbytes>=0.50,<0.51", "attrs", "scipy"], "bench": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
