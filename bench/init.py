"""Whole-model init time per method: loram_fast vs peft's own inits and the LoRAM reference code path.

    python bench/init.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]

Shape set (2 decoder layers, 14 LoRA layers each): on GPU Llama-2-7B's linear shapes (hidden 4096, MLP 11008),
every provider; on CPU hidden 1024 / MLP 2752 with every provider, then the LoRAM family alone at hidden 2048 /
MLP 5632 (TinyLlama-1.1B's shapes) and at Llama-2-7B's shapes; --quick: hidden 512, MLP 1376. Each provider starts from
the same freshly wrapped peft model (wrapping is not timed). ``ratio`` = baseline time / provider time for the
same method family (higher is faster): LoRAM vs its reference code path, PiSSA / OLoRA vs peft's own.
``rel_err`` for pissa_niter_N: mean over layers of ‖W − s·B A‖_F / ‖W − W_r‖_F (1 = the exact PiSSA residual).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, RESULTS, machine_info, measure_interleaved, plot, publish  # noqa: E402

import loram_fast  # noqa: E402
from loram_fast.baselines import peft_init_model, reference_loram_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(hidden, inter, layers, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def pissa_tail_ratio(model, base, r):
    """Mean over layers of ‖W_res‖ / ‖W − W_r‖ (W_res = what the init left in the base weight)."""
    from peft.tuners.lora import LoraLayer

    ratios = []
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            W = base.get_submodule(name.replace("base_model.model.", "", 1)).weight.float()
            opt = torch.linalg.svdvals(W)[r:].square().sum().sqrt()
            ratios.append(float(layer.base_layer.weight.detach().float().norm() / opt))
    return sum(ratios) / len(ratios)


def run(hidden, inter, layers, rank, dtype, device, reps, with_exact, loram_only=False):
    from peft import LoraConfig, get_peft_model

    base = build(hidden, inter, layers, dtype, device)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    holder = {}

    def fresh():
        holder["m"] = get_peft_model(copy.deepcopy(base), cfg)

    providers = [
        ("loram", "loram_fast loram", lambda: loram_fast.init_model(holder["m"], "loram", progress=False)),
        ("loram", "LoRAM reference code path", lambda: reference_loram_model(holder["m"])),
        ("loram_dct", "loram_fast loram_dct", lambda: loram_fast.init_model(holder["m"], "loram_dct", progress=False)),
        ("pissa_niter_4", "loram_fast pissa_niter_4",
         lambda: loram_fast.init_model(holder["m"], "pissa_niter_4", progress=False)),
        ("pissa_niter_4", "peft pissa_niter_4", lambda: peft_init_model(holder["m"], "pissa_niter_4")),
        ("olora", "loram_fast olora", lambda: loram_fast.init_model(holder["m"], "olora", progress=False)),
        ("olora", "peft olora", lambda: peft_init_model(holder["m"], "olora")),
    ]
    if loram_only:
        providers = [p for p in providers if p[0].startswith("loram")]
    elif with_exact:
        providers += [
            ("pissa", "loram_fast pissa", lambda: loram_fast.init_model(holder["m"], "pissa", progress=False)),
            ("pissa", "peft pissa", lambda: peft_init_model(holder["m"], "pissa")),
        ]
    info = machine_info(device)
    rows, baseline = [], {}
    shape = f"L{layers} h{hidden} mlp{inter}"
    # the providers of one method family are timed interleaved (see measure_interleaved): their ratio is the point
    timed = {}
    for family in dict.fromkeys(f for f, _, _ in providers):
        fns = {name: fn for f, name, fn in providers if f == family}
        timed.update(measure_interleaved(fns, device=device, warmup=1, reps=reps, setup=fresh))
    for family, name, fn in providers:
        t = timed[name]
        row = {"bench": "init", "provider": name, "shape": shape, "rank": rank,
               "dtype": str(dtype).replace("torch.", ""), "device": device, **t, "extra": family, **info}
        if family.startswith("pissa") and with_exact or family == "pissa_niter_4":
            fresh()
            fn()
            row["rel_err"] = pissa_tail_ratio(holder["m"], base, rank)
        rows.append(row)
        if name.startswith("peft") or "reference" in name:
            baseline[family] = t["median_s"]
    for row in rows:
        if row["extra"] in baseline:
            row["ratio"] = baseline[row["extra"]] / row["median_s"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--exact", action="store_true", help="also time exact pissa (full SVD per layer; slow on CPU)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    exact = args.exact or args.device == "cuda"
    if args.device == "cuda":
        sizes = [(4096, 11008, 5, False)]
    elif args.quick:
        sizes = [(512, 1376, 3, False)]
    else:
        sizes = [(1024, 2752, 3, False), (2048, 5632, 3, True), (4096, 11008, 3, True)]
    rows = []
    for hidden, inter, reps, loram_only in sizes:
        rows += run(hidden, inter, 2, args.rank, dtype, args.device, reps, exact, loram_only)
    info = machine_info(args.device)
    header = heading("Whole-model init", info,
                     "ratio = baseline time / provider time within a method family (baseline: peft's own init, or the"
                     " LoRAM reference code path); higher is faster.", peft=True)
    publish(rows, f"init_{args.device}_{args.dtype}",
            ["provider", "shape", "rank", "dtype", "median_s", "ratio", "rel_err"], header)
    plot(rows, RESULTS / f"init_{args.device}_{args.dtype}.png", x="provider", group="shape",
         title=f"whole-model init, {args.dtype}, {info['device_name']}")


if __name__ == "__main__":
    main()
