"""Shared benchmark harness: timing, machine description, one results CSV, markdown tables, plots.

Every row appended to ``bench/results/results.csv`` carries the machine, the device, library versions and a
UTC timestamp. Ratios are only meaningful between rows of one run on one machine.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "results.csv"
COLUMNS = ["bench", "provider", "shape", "rank", "dtype", "device", "median_s", "p20_s", "p80_s", "ratio",
           "rel_err", "extra", "machine", "device_name", "torch", "peft", "loram_fast", "timestamp"]


def spectrum_matrix(m: int, n: int, decay: float, generator: torch.Generator,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U diag(k^-decay) Vᵀ (m×n), U and V the Q factors of Gaussian m×k and n×k draws from ``generator`` (in that
    order): decay 0.5 is a realistic LLM-weight spectrum."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=dtype))
    return (U * torch.arange(1, k + 1, dtype=dtype) ** -decay) @ V.T


def llama_projection_shapes(hidden: int, mlp: int) -> list[tuple[int, int]]:
    """(out, in) of the seven projections of one Llama decoder layer (q, k, v, o, gate, up, down; k and v full size)."""
    return [(hidden, hidden)] * 4 + [(mlp, hidden)] * 2 + [(hidden, mlp)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 1, reps: int = 5,
            setup: Callable[[], object] | None = None) -> dict:
    """Median, p20 and p80 wall time of ``fn()`` in seconds (``setup()``, untimed, runs before each call)."""
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench

            if setup is None:
                ms = do_bench(fn, warmup=25 * warmup, rep=100 * reps, quantiles=[0.5, 0.2, 0.8])
                return {"median_s": ms[0] / 1e3, "p20_s": ms[1] / 1e3, "p80_s": ms[2] / 1e3}
        except ImportError:
            pass
    return measure_interleaved({"fn": fn}, device=device, warmup=warmup, reps=reps, setup=setup)["fn"]


def _stats(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3]}


def _timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure_interleaved(fns: dict[str, Callable[[], object]], *, device: str = "cpu", warmup: int = 1,
                        reps: int = 10, setup: Callable[[], object] | None = None,
                        baseline: Callable[[], object] | None = None) -> dict[str, dict]:
    """:func:`measure` for several providers of the same op at once: each round calls every provider once, in an
    order that rotates from round to round, so the slow drifts of a shared machine hit them all alike and their
    ratios stay meaningful. ``setup()``, untimed, runs before each call. ``baseline()``: timed right after each
    call, on the state that call left (the same memory: e.g. one pass over the same weights); each provider then
    also gets ``baseline_s`` (the median baseline time) and ``ratio`` (the median of its time / baseline time,
    call by call)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    bases: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + reps):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if setup is not None:
                setup()
            t = _timed(fns[name], device)
            b = _timed(baseline, device) if baseline is not None else None
            if i >= warmup:
                times[name].append(t)
                if b is not None:
                    bases[name].append(b)
                    ratios[name].append(t / b)
    out = {name: _stats(t) for name, t in times.items()}
    if baseline is not None:
        for name in names:
            out[name].update(baseline_s=statistics.median(bases[name]), ratio=statistics.median(ratios[name]))
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on (no host names)."""
    import peft

    import loram_fast

    cpu = f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    return {"machine": cpu, "device_name": name, "torch": torch.__version__, "peft": peft.__version__,
            "loram_fast": loram_fast.__version__}


def append_rows(rows: Iterable[dict], csv_path: Path = CSV_PATH) -> None:
    """Append rows (missing columns left empty) to the one results CSV; the header is written once."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"timestamp": stamp, **row})


def fmt(value, digits=3) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str], header: str = "") -> str:
    lines = [header, ""] if header else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png_path: Path, *, x: str, y: str = "median_s", group: str = "provider",
         title: str = "", logy: bool = True) -> None:
    """One line per ``group`` value: ``y`` against ``x`` (categorical, in order of appearance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(dict.fromkeys(str(r[x]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(xs)), 4))
    for g in dict.fromkeys(r[group] for r in rows):
        pts = {str(r[x]): r[y] for r in rows if r[group] == g and r.get(y) not in ("", None)}
        ax.plot([i for i, v in enumerate(xs) if v in pts], [pts[v] for v in xs if v in pts], marker="o", label=g)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that, in bytes. (``ru_maxrss`` is no
    use here: Linux carries it over from the parent through fork and exec.) Freed heap memory is returned to the
    system first (glibc ``malloc_trim``), so that later allocations show up in the peak instead of reusing it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS of this process since start or the last :func:`reset_peak_rss`, in bytes."""
    return _status_kib("VmHWM") * 1024


def write_report(name: str, table: str) -> Path:
    path = RESULTS / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    return path


def heading(title: str, info: dict, explanation: str, *, peft: bool = False) -> str:
    """A report's header: ``### title (device; machine; torch X[, peft Y])``, a blank line, ``explanation``."""
    versions = f"torch {info['torch']}" + (f", peft {info['peft']}" if peft else "")
    return f"### {title} ({info['device_name']}; {info['machine']}; {versions})\n\n{explanation}"


def publish(rows: list[dict], name: str, columns: list[str], header: str) -> str:
    """The end of every bench: append ``rows`` to the CSV, write ``bench/results/<name>.md``, echo the table."""
    append_rows(rows)
    table = markdown_table(rows, columns, header)
    write_report(name, table)
    sys.stdout.write(table)
    return table
