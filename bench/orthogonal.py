"""Orthogonal init: peft's own ``orthogonal_init`` vs loram_fast's (the take-over), one run.

    python bench/orthogonal.py

Model: 2 Llama-shaped decoder layers (hidden 1024, MLP 2816), r = 16 on all 7 projections. Both providers run
``get_peft_model(base, LoraConfig(init_lora_weights="orthogonal"))`` after ``torch.manual_seed(0)``; ours with
``peft_hook.install(take_over_peft_inits=True)``. The init is a few small random draws and one r×r QR per layer, so
the time is mostly peft's model wrapping; ``same`` says whether both gave the same adapters (they draw from the
global generator in the same order).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, measure_interleaved, publish  # noqa: E402

from loram_fast import peft_hook  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(base, take_over: bool):
    from peft import LoraConfig, get_peft_model

    if take_over:
        peft_hook.install(take_over_peft_inits=True)
    try:
        torch.manual_seed(0)
        return get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                              init_lora_weights="orthogonal"))
    finally:
        if take_over:
            peft_hook.uninstall()
            peft_hook.install()


def main():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2816,
                                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8)).eval()
    providers = {"peft": lambda: build(base, False), "ours": lambda: build(base, True)}
    times = measure_interleaved(providers, warmup=1, reps=5)
    a, b = build(base, False).state_dict(), build(base, True).state_dict()
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = machine_info("cpu")
    rows = [{"bench": "orthogonal", "provider": name, "median_s": times[name]["median_s"],
             "ratio": times["peft"]["median_s"] / times[name]["median_s"], "same": same, **info}
            for name in providers]
    header = heading("Orthogonal init through get_peft_model", info, "See bench/orthogonal.py.\n\n", peft=True)
    publish(rows, "orthogonal_cpu", ["provider", "median_s", "ratio", "same"], header)


if __name__ == "__main__":
    main()
