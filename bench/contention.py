"""Init under contention: the same inits on a quiet machine and beside busy neighbour processes that this bench
starts and stops itself (each a single-threaded matmul loop, one per core by default).

    python bench/contention.py [--quick] [--neighbours N]

Model: 2 Llama-shaped decoder layers (hidden 1024, MLP 2752; --quick: 512 / 1376), all 14 LoRA layers, fp32, r = 16.
Pairs timed interleaved, quiet and busy: loram_fast ``pissa_niter_4`` vs peft's, loram_fast ``loram`` vs the LoRAM
reference code path. ``ratio`` = baseline time / ours in the same condition (> 1: ours faster); ``slowdown`` = busy
time / quiet time of the same provider.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, measure_interleaved, publish  # noqa: E402

import loram_fast  # noqa: E402
from loram_fast.baselines import peft_init_model, reference_loram_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUSY = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\nwhile True:\n    a = torch.tanh(a @ a)\n")


def build(hidden, inter):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128)
    return LlamaForCausalLM(cfg).eval()


def measure_pairs(base, reps):
    from peft import LoraConfig, get_peft_model

    holder = {}

    def fresh():
        holder["m"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))

    pairs = {
        "pissa_niter_4": {"loram_fast pissa_niter_4": lambda: loram_fast.init_model(holder["m"], "pissa_niter_4",
                                                                                      progress=False),
                          "peft pissa_niter_4": lambda: peft_init_model(holder["m"], "pissa_niter_4")},
        "loram": {"loram_fast loram": lambda: loram_fast.init_model(holder["m"], "loram", progress=False),
                  "LoRAM reference code path": lambda: reference_loram_model(holder["m"])},
    }
    return {family: measure_interleaved(fns, warmup=1, reps=reps, setup=fresh) for family, fns in pairs.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--neighbours", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)
    hidden, inter = (512, 1376) if args.quick else (1024, 2752)
    base = build(hidden, inter)
    reps = 3 if args.quick else 5
    results = {"quiet": measure_pairs(base, reps)}
    procs = [subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(args.neighbours)]
    try:
        time.sleep(1.0)  # let the neighbours start spinning
        results["busy"] = measure_pairs(base, reps)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
    info = machine_info("cpu")
    rows = []
    for condition, families in results.items():
        for family, timed in families.items():
            ours = next(k for k in timed if k.startswith("loram_fast"))
            base_name = next(k for k in timed if not k.startswith("loram_fast"))
            for name, t in timed.items():
                rows.append({"bench": "contention", "provider": f"{name} ({condition})",
                             "shape": f"L2 h{hidden} mlp{inter}", "rank": 16, "dtype": "float32", "device": "cpu", **t,
                             "ratio": timed[base_name]["median_s"] / t["median_s"] if name == ours else 1.0,
                             "extra": f"slowdown {t['median_s'] / results['quiet'][family][name]['median_s']:.2f}x; "
                                      f"{args.neighbours} busy neighbours" if condition == "busy" else "",
                             **info})
    header = heading("Init beside busy processes", info,
                     "ratio = baseline / ours in the same condition (> 1: ours faster); slowdown = busy / quiet time "
                     "of the same provider.", peft=True)
    publish(rows, "contention_cpu", ["provider", "shape", "median_s", "ratio", "extra"], header)


if __name__ == "__main__":
    main()
