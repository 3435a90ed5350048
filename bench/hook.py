"""LoRAM through the peft hook: ``get_peft_model(model, LoraConfig(init_lora_weights="loram"))`` against peft's own
default init and against ``init_model`` after it, one run.

    python bench/hook.py [--quick] [--device cpu|cuda]

Model: all 22 layers of TinyLlama-1.1B's shapes (154 LoRA layers, bf16; --quick: 2 layers), r = 16 and 256.
Providers, each on a fresh copy of the base model (the copy is not timed), interleaved:
- ``peft default``: ``get_peft_model`` with peft's default init (the time peft itself takes to build the layers);
- ``hook loram``: ``get_peft_model`` with ``init_lora_weights="loram"``: within the injection the hook checks each
  layer and initialises them all at the end, in one transaction (``peft_hook.BATCHED_IN_INJECTION``);
- ``hook loram, layer by layer``: the same with that batching off (each layer from its own ``update_layer``);
- ``peft default + init_model``: peft's default init, then ``loram_fast.init_model(model, "loram")``.
``loram's share`` = provider time − peft default's (the LoRAM work, what the hook adds to ``get_peft_model``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, measure_interleaved, publish  # noqa: E402
from floor import TARGETS, build  # noqa: E402

import loram_fast  # noqa: E402
from loram_fast import peft_hook  # noqa: E402


def run(rank: int, layers: int, device: str, reps: int) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    base = build(2048, 5632, torch.bfloat16, device, layers, 4 if layers == 22 else None)
    holder = {}

    def fresh():
        holder.clear()
        gc.collect()
        holder["base"] = copy.deepcopy(base)

    def wrap(init):
        return get_peft_model(holder["base"], LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                         init_lora_weights=init))

    def layer_by_layer():
        batched, peft_hook.BATCHED_IN_INJECTION = peft_hook.BATCHED_IN_INJECTION, ()
        try:
            return wrap("loram")
        finally:
            peft_hook.BATCHED_IN_INJECTION = batched

    fns = {"peft default": lambda: wrap(True),
           "hook loram": lambda: wrap("loram"),
           "hook loram, layer by layer": layer_by_layer,
           "peft default + init_model": lambda: loram_fast.init_model(wrap(True), "loram", progress=False)}
    timed = measure_interleaved(fns, device=device, warmup=1, reps=reps, setup=fresh)
    peft_s = timed["peft default"]["median_s"]
    info = machine_info(device)
    shape = f"L{layers} h2048 mlp5632" + (" kv4" if layers == 22 else "")
    return [{"bench": "hook", "provider": name, "shape": shape, "rank": rank, "dtype": "bfloat16", "device": device,
             **t, "loram's share": t["median_s"] - peft_s if name != "peft default" else "", **info}
            for name, t in timed.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    layers = 2 if args.quick else 22
    rows = [row for rank in (16, 256) for row in run(rank, layers, args.device, 3 if args.quick else 5)]
    info = machine_info(args.device)
    header = heading("LoRAM through the peft hook vs peft's default init", info,
                     "median_s = get_peft_model (and init_model) time, interleaved; loram's share = that minus peft "
                     "default's.", peft=True)
    publish(rows, f"hook_{args.device}", ["provider", "shape", "rank", "median_s", "loram's share"], header)


if __name__ == "__main__":
    main()
