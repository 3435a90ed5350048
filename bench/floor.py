"""Whole-model LoRAM against the memory floor: how close the init gets to one pass over the weights, at any rank.

    python bench/floor.py [--quick | --tinyllama] [--device cpu|cuda]

For a 2-layer Llama-shaped model (TinyLlama-1.1B's linear shapes: hidden 2048, MLP 5632; --quick: hidden 1024,
MLP 2752; --tinyllama: all 22 layers of TinyLlama-1.1B, with its 4 KV heads, 154 LoRA layers), all 14 LoRA layers: ``floor`` is one in-place read+write pass over the same weights (``Tensor.neg_``),
the least any residual init can do; LoRAM's ideal is that plus one read (the variance). Each provider runs on a
freshly wrapped model (wrapping not timed), and the floor right after it on the same weights (the same memory);
``÷ floor`` = the median over rounds of provider time / floor time, providers interleaved. Providers: ``init_model(..., "loram" | "loram_dct")`` at r = 16 and r = 256 (the compiled
closed form: O(1) work per entry for any r, one row of K per two entries and per weight shape; the residual writes
held back to the end of the transaction, so no weight copy is kept), ``loram`` with the torch backend forced (the
rank-r product, written weight by weight after a copy of each for the rollback), and the LoRAM reference code path
at r = 16.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, measure_interleaved, publish  # noqa: E402

import loram_fast  # noqa: E402
from loram_fast.baselines import reference_loram_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(hidden, inter, dtype, device, layers=2, kv_heads=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128 if kv_heads is None else hidden // 64,
                      num_key_value_heads=hidden // 128 if kv_heads is None else kv_heads)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def run(hidden, inter, rank, dtype, device, reps, with_torch, layers=2, kv_heads=None):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    base = build(hidden, inter, dtype, device, layers, kv_heads)
    holder = {}

    def fresh():
        holder["m"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                       target_modules=TARGETS))

    def floor():
        with torch.no_grad():
            for module in holder["m"].modules():
                if isinstance(module, LoraLayer):
                    module.get_base_layer().weight.neg_()

    fns = {"loram_fast loram": lambda: loram_fast.init_model(holder["m"], "loram", progress=False),
           "loram_fast loram_dct": lambda: loram_fast.init_model(holder["m"], "loram_dct", progress=False)}
    if with_torch:
        fns["loram_fast loram, torch backend"] = lambda: loram_fast.init_model(holder["m"], "loram", backend="torch",
                                                                               progress=False)
    if rank == 16:
        fns["LoRAM reference code path"] = lambda: reference_loram_model(holder["m"])
    # the floor is timed right after each provider, on the weights that provider just wrote: the same memory (a
    # pass over weights in huge pages is ~1.6× faster than over 4 KiB pages, and which ones a fresh copy gets
    # depends on what the process freed before)
    timed = measure_interleaved(fns, device=device, warmup=1, reps=reps, setup=fresh, baseline=floor)
    floors = sorted(t["baseline_s"] for t in timed.values())
    timed = {"floor (one read+write pass)": {"median_s": floors[len(floors) // 2], "ratio": 1.0}, **timed}
    info = machine_info(device)
    shape = f"L{layers} h{hidden} mlp{inter}" + ("" if kv_heads is None else f" kv{kv_heads}")
    return [{"bench": "floor", "provider": name, "shape": shape, "rank": rank, "dtype": str(dtype).replace("torch.", ""),
             "device": device, **t, **info} for name, t in timed.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tinyllama", action="store_true",
                   help="all of TinyLlama-1.1B's 154 projections (22 layers, 32 heads, 4 KV heads) instead of 2 layers")
    p.add_argument("--one", nargs=3, metavar=("DTYPE", "RANK", "JSON"), help=argparse.SUPPRESS)  # one configuration
    args = p.parse_args(argv)
    hidden, inter = (1024, 2752) if args.quick else (2048, 5632)

    def one(dtype, rank):
        if args.tinyllama:
            return run(2048, 5632, rank, dtype, args.device, 5, with_torch=False, layers=22, kv_heads=4)
        return run(hidden, inter, rank, dtype, args.device, 3 if args.quick else 5, with_torch=rank == 16)

    if args.one:
        Path(args.one[2]).write_text(json.dumps(one(getattr(torch, args.one[0]), int(args.one[1]))))
        return
    # each configuration in a fresh process: the speed of a pass over the weights depends on what the process
    # allocated and freed before (the floor of TinyLlama's bf16 weights: 37 ms after the fp32 rows, 62 ms fresh)
    rows = []
    flags = [f for f, on in (("--quick", args.quick), ("--tinyllama", args.tinyllama)) if on]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            for rank in (16, 256):
                path = Path(tmp) / f"{dtype}_{rank}.json"
                subprocess.run([sys.executable, __file__, *flags, "--device", args.device, "--one", dtype, str(rank),
                                str(path)], check=True)
                rows += json.loads(path.read_text())
    info = machine_info(args.device)
    header = heading("Whole-model LoRAM vs the memory floor", info,
                     "ratio = provider time / floor time in the same interleaved run (lower is better; the floor is "
                     "one in-place read+write pass over the same weights).")
    publish(rows, f"floor_{args.device}" + ("_tinyllama" if args.tinyllama else ""), ["provider", "shape", "rank", "dtype", "median_s", "ratio"], header)


if __name__ == "__main__":
    main()
