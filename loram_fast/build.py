"""Building the C++ extension ``loram_fast._C`` (``csrc/``), once per machine.

    python -m loram_fast.build                      # build now, ahead of first use (a failure is remembered)
    python -m loram_fast.build --force              # retry a build that failed before
    python -m loram_fast.build --cuda --arch 8.0,9.0  # also compile csrc/cuda/ (needs nvcc and a CUDA torch, no GPU)

- **Flags**: the ones torch itself chooses (its C++ standard, ABI and include paths) plus :func:`cxx_flags` /
  :func:`nvcc_flags`; ``setup.py`` (build at install) and the JIT build on first use read them from here.
- **Cache**: every build lives in its own folder under ``$LORAM_FAST_CACHE_DIR`` (default
  ``~/.cache/loram_fast``), named by a key of the torch version, its CUDA version, the Python version, the
  compiler, the flags and the source files' contents. A new torch, compiler or source gives a new build.
- **Failures are remembered**: a failed build leaves ``failed`` (a one-line reason) and ``build.log`` (the full
  compiler output) in its folder, so later processes fall back to the torch backend at once instead of compiling
  again; ``--force`` retries.

Only the standard library is imported at module level: ``setup.py`` loads this file by path.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

NAME = "loram_fast_C"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
RETRY = "python -m loram_fast.build --force"
# Seen on a 2-core machine: 76-115 s for the CPU kernels; the CUDA kernels for two architectures take longer.
EXPECTED = {False: "about 1-2 minutes on 2 cores", True: "several minutes"}


class BuildError(RuntimeError):
    """The extension could not be built; ``str(exc)`` is one line naming the log file and the retry command."""


def cxx_flags() -> list[str]:
    """Host compiler flags beyond torch's own (no ``-std=``: torch picks the standard its headers need)."""
    # at::parallel_for is OpenMP code in torch's headers: without -fopenmp the extension's loops run on one thread
    return ["-O3", *_openmp()]


def nvcc_flags() -> list[str]:
    """nvcc flags beyond torch's own; no ``--use_fast_math`` (the basis sines must stay exact)."""
    return ["-O3"]


def ld_flags() -> list[str]:
    return _openmp()


def _openmp() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def sources(cuda: bool = False) -> list[str]:
    """Absolute paths of the C++ sources (``csrc/*.cpp``, ``csrc/cpu/*.cpp``), plus ``csrc/cuda/*.cu`` with
    ``cuda`` (setup.py makes them relative to the repository root, as setuptools wants)."""
    files = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    if cuda:
        files += sorted((CSRC / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def cache_dir() -> Path:
    root = os.environ.get("LORAM_FAST_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loram_fast"


@functools.lru_cache(maxsize=None)
def _tool_version(tool: str) -> str:
    """First line of ``tool --version`` ('' when the tool is missing)."""
    path = shutil.which(tool)
    if path is None:
        return ""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1] if tool.endswith("nvcc") and lines else (lines[0] if lines else "")


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def build_key(cuda: bool = False, arch: str | None = None) -> str:
    """16 hex digits naming one build: torch and CUDA versions, Python, compiler, flags and source contents."""
    import torch

    h = hashlib.sha256()
    parts = [torch.__version__, str(torch.version.cuda), sys.version, compiler(), _tool_version(compiler()),
             " ".join(cxx_flags()), " ".join(ld_flags())]
    if cuda:
        parts += [_tool_version("nvcc"), " ".join(nvcc_flags()), arch or os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
    for part in parts:
        h.update(part.encode() + b"\0")
    for f in sorted(CSRC.rglob("*")):
        if f.is_file() and f.suffix in (".cpp", ".cu", ".h", ".cuh"):
            h.update(f.relative_to(CSRC).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_dir(cuda: bool = False, arch: str | None = None) -> Path:
    return cache_dir() / f"ext-{'cuda' if cuda else 'cpu'}-{build_key(cuda, arch)}"


def one_line(text: str, limit: int = 200) -> str:
    """``text`` squeezed onto one line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _first_error(log: str) -> str:
    """The most telling error line of a compiler log: the compiler's first ``error: ...`` message (without the
    file location), else the linker's complaint, else the first line naming an error, else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        low = line.lower()
        if "error:" in low and not low.startswith("collect2"):
            at = low.index("error:")
            return line[at + len("error:"):].strip() or line
    for line in lines:
        if "ld:" in line or "undefined reference" in line:
            return line
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[-1] if lines else "no output"


def _failure_reason(error: str, log_path: Path) -> str:
    """One line of at most 200 characters: the first error, the log file (home as ~) and the retry command."""
    home = str(Path.home())
    log = "~" + str(log_path)[len(home):] if str(log_path).startswith(home + os.sep) else str(log_path)
    tail = f"; log: {log}; retry: {RETRY}"
    head = "build failed: "
    return one_line(head + one_line(error, max(60, 200 - len(head) - len(tail))) + tail)


def remembered_failure(cuda: bool = False, arch: str | None = None) -> str | None:
    """The one-line reason of an earlier failed build with the same key, or None."""
    marker = build_dir(cuda, arch) / "failed"
    return marker.read_text().strip() if marker.exists() else None


def _import_built(path: Path):
    if NAME in sys.modules:  # loaded by this process already (a second import would register the ops twice)
        return sys.modules[NAME]
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[NAME] = module
    return module


def _clear_stale_lock(folder: Path, max_age_s: float = 900.0) -> None:
    """torch's JIT build waits forever on the lock of a build that was killed midway: drop one older than any
    real build."""
    lock = folder / "lock"
    try:
        if lock.exists() and time.time() - lock.stat().st_mtime > max_age_s:
            logger.warning("loram_fast: removing a stale build lock left by an interrupted build (%s)", lock)
            lock.unlink()
    except OSError:  # pragma: no cover - best effort
        pass


def _compile(folder: Path, cuda: bool, arch: str | None):
    """torch's JIT build into ``folder`` (raises with the compiler output in the message on failure)."""
    load = _import_cpp_extension(cuda).load
    kwargs = {}
    if cuda:
        if arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch.replace(",", ";")
        kwargs = {"extra_cuda_cflags": [*nvcc_flags(), "-DLORAM_FAST_WITH_CUDA"], "with_cuda": True}
    return load(name=NAME, sources=sources(cuda), extra_cflags=[*cxx_flags(), *(["-DLORAM_FAST_WITH_CUDA"] if cuda else [])],
                extra_ldflags=ld_flags(), build_directory=str(folder), verbose=False, **kwargs)


def _import_cpp_extension(cuda: bool):
    """torch.utils.cpp_extension; on a CUDA build of torch without a GPU its import warns about a missing CUDA
    runtime, which concerns a CPU build not at all: quiet for those."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    if not cuda:
        quiet.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


def _preflight(cuda: bool) -> str | None:
    """Why a build cannot even start (missing sources, ninja, compiler, nvcc), or None."""
    is_ninja_available = _import_cpp_extension(cuda).is_ninja_available

    if not (CSRC / "ops.cpp").exists():
        return f"no C++ sources next to the package ({CSRC.name}/ is not part of this install)"
    if not is_ninja_available():
        return "ninja is missing (pip install ninja)"
    if shutil.which(compiler()) is None:
        return f"no C++ compiler ({compiler()!r} not found; set CXX)"
    if cuda:
        import torch

        if torch.version.cuda is None:
            return "this torch has no CUDA (a CPU build)"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "nvcc not found (set CUDA_HOME)"
    return None


def build(cuda: bool = False, arch: str | None = None, force: bool = False):
    """The compiled module for this torch, compiler and source: from the cache, or built now (announced at
    WARNING level with its expected duration). Raises :class:`BuildError` with a one-line reason; a failed build
    is remembered, and later calls raise at once unless ``force``."""
    import torch  # noqa: F401  (torch's libraries must be loaded before the extension)

    folder = build_dir(cuda, arch)
    marker, log = folder / "failed", folder / "build.log"
    if marker.exists() and not force:
        raise BuildError(marker.read_text().strip())
    built = folder / f"{NAME}.so"
    if built.exists() and (folder / "ok").exists() and not force:
        return _import_built(built)
    why_not = _preflight(cuda)
    if why_not is not None:
        raise BuildError(one_line(f"cannot build: {why_not}"))
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(folder)
    for stale in (marker, folder / "ok"):
        stale.unlink(missing_ok=True)
    logger.warning("loram_fast: compiling the C++ %s kernels for torch %s (once per machine and torch version, %s; "
                   "`python -m loram_fast.build` does it ahead of time)", "CPU+CUDA" if cuda else "CPU",
                   torch.__version__, EXPECTED[cuda])
    start = time.perf_counter()
    try:
        module = _compile(folder, cuda, arch)
    except Exception as exc:  # a broken toolchain must not break the package: remember it, fall back to torch
        text = str(exc)
        log.write_text(text)
        reason = _failure_reason(_first_error(text), log)
        marker.write_text(reason + "\n")
        logger.warning("loram_fast: %s", reason)
        error = BuildError(reason)
        error.logged = True
        raise error from None
    (folder / "ok").write_text(f"built in {time.perf_counter() - start:.0f} s\n")
    logger.warning("loram_fast: C++ kernels built in %.0f s (cached in %s)", time.perf_counter() - start, folder)
    return module


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build loram_fast's C++ extension now (it is otherwise built on first use).")
    p.add_argument("--force", action="store_true", help="rebuild, also after a remembered failure")
    p.add_argument("--cuda", action="store_true", help="also compile csrc/cuda/ (nvcc and a CUDA build of torch)")
    p.add_argument("--arch", default=None, help="CUDA architectures, e.g. 8.0,9.0 (default: torch's choice)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        module = build(cuda=args.cuda, arch=args.arch, force=args.force)
    except BuildError as exc:
        if not getattr(exc, "logged", False):
            sys.stderr.write(f"loram_fast: {exc}\n")
        return 1
    sys.stdout.write(f"loram_fast: C++ extension ready ({build_dir(args.cuda, args.arch)}; "
                     f"CUDA kernels: {'yes' if getattr(module, 'with_cuda', False) else 'no'})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
