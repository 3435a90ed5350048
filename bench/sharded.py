"""Sharded init: bytes communicated and peak memory per rank, loram_fast's sharded forms vs gathering each weight.

    python bench/sharded.py [--quick] [--worlds 1,2,4]

Each world size runs as that many gloo processes on this machine (CPU). Model: 2 Llama-shaped decoder layers
(hidden 1024, MLP 2816, 8 heads of 128, 4 KV heads; --quick: hidden 512, MLP 1408), LoRA r = 16 on all 7
projections, every weight given a decaying spectrum (singular values k^-0.5, as trained LLM weights have; exact PiSSA
needs a gap to iterate to) and split by FSDP2 (``fully_shard``, Shard(0)). Per method and approach:

- ``bytes/rank``: payload of every collective loram_fast made on a rank (all-reduce: the tensor; all-gather: the
  whole gathered tensor), summed over the call; ``calls``: their number. FSDP's own gradient reduce-scatter in
  LoRA-GA's full mode (what a training step also does) is not counted.
- ``predicted``: the same from the communication pattern (:func:`comm_per_layer`, also the README's table);
  ``-`` where it depends on the data (exact PiSSA's passes).
- ``peak MiB/rank``: the largest increase of resident memory during ``init_model`` over the ranks (VmHWM), with
  ``exact_rollback=False`` (the default rollback snapshots add a copy of each rank's changed shards, 1/p of the
  weights, to every method alike).
- ``approach``: ``sharded`` (the default) or ``gather`` (``gather_full_weights=True``: one whole weight at a time
  on every rank, the all-gather approach).

Then the paper estimate for Llama-3-70B on 8 and 64 GPUs from :func:`comm_per_layer`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, peak_rss, publish, reset_peak_rss, write_report  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
METHODS = [("loram", {}), ("olora", {}), ("nlora", {"residual": True}), ("pissa_niter_4", {}), ("pissa", {}),
           ("lora_one", {"gradient_mode": "sketch"}), ("lora_ga", {})]


# ----------------------------------------------------------------------------------------------------------------
# the communication pattern (payload bytes, calls) per layer, for an out×in weight split by rows over p ranks
# ----------------------------------------------------------------------------------------------------------------
def _qr(length: int, q: int, p: int) -> tuple[int, int]:
    """A QR on the sharded side: CholeskyQR2 (two q×q fp64 Grams) and the Householder signs (one q×q fp64), or
    the gathered panel when it is short (length <= 2q)."""
    if length <= 2 * q:
        return 4 * math.ceil(length / p) * p * q, 1
    return 3 * 8 * q * q, 3


def comm_per_layer(method: str, m: int, n: int, r: int, p: int, weight_bytes: int, approach: str = "sharded",
                   niter: int = 4) -> tuple[int, int] | None:
    """(bytes, calls) of loram_fast's collectives for one out×in (m×n) weight split by rows over ``p`` ranks.
    None where it depends on the data (exact PiSSA: its number of passes)."""
    c = math.ceil(m / p)
    agree = (96 if method in ("nlora", "inttune") else 64, 1)  # the ranks check they computed the same adapters
    total = [agree[0], agree[1]]

    def add(b, k=1):
        total[0] += b
        total[1] += k

    if approach == "gather":
        add(c * p * n * weight_bytes)  # the whole weight
        if method == "lora_ga":
            add(c * p * n * 4)  # the whole fp32 gradient
        if method == "lora_one":
            add(*_sketch(m, n))
        return tuple(total)
    if method in ("loram", "loram_dct"):
        add(24)
    elif method == "olora":
        add(4 * m * r)
        add(4 * r * n)
    elif method == "nlora":
        add(4 * r * n)
        add(4 * m * r)
    elif method.startswith("pissa_niter_"):
        N = int(method.rsplit("_", 1)[1])
        q = min(r + 8, m, n)
        add(4)  # NaN/Inf flag of the sketch
        for _ in range(N + 1):
            add(*_qr(m, q, p))
            add(4 * q * n)
        add(4 * c * p * r)  # B gathered
    elif method == "lora_one":
        add(*_sketch(m, n))
    elif method == "lora_ga":  # torch.svd_lowrank(G, q = 4r, niter = 4) on the sharded gradient, top 2r
        q, k = min(4 * r, m, n), 2 * r
        add(4)
        if m >= n:
            for _ in range(niter + 1):
                add(*_qr(m, q, p))
                add(4 * q * n)
        else:  # torch works on Gᵀ: the sharded side is its columns
            add(4 * n * q)
            for _ in range(niter):
                add(*_qr(m, q, p))
                add(4 * n * q)
            add(4 * c * p * q)
        add(4 * c * p * k)  # U gathered
    else:
        return None
    return tuple(total)


def _sketch(m: int, n: int, sketch_rank: int = 64, oversample: int = 8) -> tuple[int, int]:
    k = min(sketch_rank + oversample, m, n)
    return 4 * (m * k + min(2 * k + 1, m) * n + 1), 1


# ----------------------------------------------------------------------------------------------------------------
# the measurement
# ----------------------------------------------------------------------------------------------------------------
def _model(hidden: int, inter: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 256, head_dim=128)
    base = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in base.model.layers:
            for lin in layer.modules():
                if isinstance(lin, torch.nn.Linear):
                    m, n = lin.weight.shape
                    k = min(m, n)
                    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
                    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
                    S = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
                    lin.weight.copy_((U * S) @ V.T)
    return get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS))


def _batches():
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": (ids := torch.randint(0, 256, (2, 32), generator=g)), "labels": ids} for _ in range(2)]


def _worker(rank: int, world: int, store: str, hidden: int, inter: int, out: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for warmup in (True, False):  # a first round loads libraries and fills pools: not measured
        rows = _round(mesh, world, 256 if warmup else hidden, 704 if warmup else inter)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        torch.save(gathered, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)  # as tests/test_sharded.py: gloo's teardown by C++ static destructors at exit can abort the process


def _round(mesh, world: int, hidden: int, inter: int) -> list[dict]:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import loram_fast
    from loram_fast.ops.sharded import COUNTER

    rows = []
    for method, options in METHODS:
        for approach in ("sharded", "gather"):
            model = _model(hidden, inter)
            for layer in model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            # no rollback snapshots: they hold a copy of every changed local shard (1/p of the weights) and would
            # hide the methods' own memory
            kwargs = dict(options, progress=False, gather_full_weights=approach == "gather", exact_rollback=False)
            if method.startswith("lora_"):
                kwargs["dataloader"] = _batches()
            COUNTER.update(bytes=0, calls=0, gathered=0)
            dist.barrier()
            base = reset_peak_rss()
            error = ""
            try:
                loram_fast.init_model(model, method, **kwargs)
            except (ValueError, NotImplementedError) as exc:
                error = type(exc).__name__
            peak = peak_rss() - base
            rows.append({"method": method, "approach": approach, "error": error, "peak": peak, **COUNTER})
            del model
    return rows


def _traffic(run: dict, p: int) -> float:
    """Bytes a rank sends in ring collectives: 2(p−1)/p of an all-reduce's payload, (p−1)/p of an all-gather's."""
    return (p - 1) / p * (2 * (run["bytes"] - run["gathered"]) + run["gathered"])


def _shapes(hidden: int, inter: int) -> list[tuple[int, int]]:
    kv = (hidden // 256) * 128
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
            (hidden, inter)]


def _predicted(method, approach, shapes, layers, p, weight_bytes):
    per = [comm_per_layer(method, m, n, RANK, p, weight_bytes, approach) for m, n in shapes]
    if any(x is None for x in per):
        return None
    return layers * sum(b for b, _ in per) + 4, layers * sum(k for _, k in per) + 1  # + the commit vote


def _estimate_70b() -> str:
    """Llama-3-70B (80 layers, hidden 8192, MLP 28672, 8 KV heads of 128), bf16, r = 16, FSDP2 over p GPUs."""
    shapes = [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192),
                            (8192, 28672)]
    links = {"NVLink (450 GB/s, 10 µs)": (450e9, 10e-6), "InfiniBand NDR (50 GB/s, 20 µs)": (50e9, 20e-6)}
    lines = ["| method | ranks | bytes/rank | calls | " + " | ".join(f"time at {k}" for k in links) + " |",
             "|---" * (4 + len(links)) + "|"]
    for method in ("loram", "olora", "nlora", "pissa_niter_4", "lora_one", "lora_ga", "gather (any method)"):
        for p in (8, 64):
            approach = "gather" if method.startswith("gather") else "sharded"
            name = "loram" if approach == "gather" else method
            b, k = _predicted(name, approach, shapes, 80, p, 2)
            # ring collectives: an all-reduce moves 2(p−1)/p of its payload per rank, an all-gather (p−1)/p of it
            factor = (p - 1) / p * (1 if approach == "gather" else 2)
            times = [b * factor / bw + k * lat for bw, lat in links.values()]
            lines.append(f"| {method} | {p} | {_size(b)} | {k} | " + " | ".join(_secs(t) for t in times) + " |")
    return "\n".join(lines) + "\n"


def _size(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return ""


def _secs(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.1f} s"


def main(argv=None):
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worlds", default="1,2,4")
    args = ap.parse_args(argv)
    hidden, inter = (512, 1408) if args.quick else (1024, 2816)
    os.environ.setdefault("LORAM_FAST_FAIR_SHARE", "0")
    # glibc: every allocation of 64 KiB or more gets its own mapping, returned when freed, so the resident-memory
    # peak follows the live tensors instead of a heap that keeps what was freed (set before the ranks start)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    rows = []
    info = machine_info("cpu")
    for world in [int(w) for w in args.worlds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), hidden, inter, out), nprocs=world, join=True)
            per_rank = torch.load(out, weights_only=False)
        for i, first in enumerate(per_rank[0]):
            runs = [ranks[i] for ranks in per_rank]
            pred = _predicted(first["method"], first["approach"], _shapes(hidden, inter), 2, world, 4)
            rows.append({"bench": "sharded", "provider": f"{first['method']} {first['approach']}",
                         "shape": f"L2 h{hidden} mlp{inter}", "rank": RANK, "dtype": "float32", "device": "cpu",
                         "world": world, "bytes/rank": max(r["bytes"] for r in runs) if not first["error"] else "-",
                         "predicted": "-" if pred is None or first["error"] else pred[0],
                         "traffic MiB/rank": round(max(_traffic(r, world) for r in runs) / 2 ** 20, 3),
                         "calls": max(r["calls"] for r in runs),
                         "peak MiB/rank": round(max(r["peak"] for r in runs) / 2 ** 20, 1),
                         "error": first["error"], "extra": f"world={world}", **info})
    header = heading("Sharded init: communication and memory per rank", info,
                     "FSDP2 (Shard(0)) over gloo processes on this machine; bytes/rank: payload of loram_fast's "
                     "collectives per rank (max over ranks); predicted: from the communication pattern "
                     "(bench/sharded.py comm_per_layer); traffic: what a rank sends in ring collectives (2(p−1)/p of an "
                     "all-reduce's payload, (p−1)/p of an all-gather's; nothing for one rank); peak MiB/rank: the "
                     "largest resident-memory increase during init_model (glibc returns freed blocks of 64 KiB or "
                     "more); approach gather = gather_full_weights=True (the all-gather approach).")
    publish(rows, "sharded_cpu", ["provider", "world", "bytes/rank", "predicted", "calls", "traffic MiB/rank",
                                   "peak MiB/rank", "error"], header)
    estimate = ("### Paper estimate: Llama-3-70B, bf16, r = 16, FSDP2 (from comm_per_layer)\n\n"
                "Bytes/rank: payload of loram_fast's collectives per rank for all 560 projections; time: ring "
                "traffic (an all-reduce moves 2(p−1)/p of its payload per rank, an all-gather (p−1)/p) over the link's "
                "bandwidth plus one latency per call. Exact PiSSA: about (passes + 1)/(niter + 1) × pissa_niter_4 "
                "(passes depend on the spectrum).\n\n" + _estimate_70b())
    write_report("sharded_70b", estimate)
    sys.stdout.write("\n" + estimate)


if __name__ == "__main__":
    main()
