"""Intruder-dimension reduction: loram_fast vs peft's ``reduce_intruder_dimension``, same adapters, one run.

    python bench/intruders.py [--quick]

Model: 2 Llama-shaped decoder layers (hidden 1024, MLP 2752; --quick: 512 / 1376), LoRA r = 16 on all 7 projections,
adapters set to random values large enough to plant intruder dimensions. peft runs three full SVDs per layer (W,
W + ΔW, ΔW'); ours one full SVD (W), the top-k triplets of W + ΔW (``top_svd``) and a rank ≤ r + k SVD from thin
QRs. ``ratio`` = peft time / ours; ``rel_err`` = max over layers of ‖ΔW'_ours − ΔW'_peft‖ / ‖ΔW'_peft‖ (fp32).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, measure_interleaved, publish  # noqa: E402

import loram_fast  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension as peft_reduce
    from transformers import LlamaConfig, LlamaForCausalLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    hidden, inter = (512, 1376) if args.quick else (1024, 2752)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter,
                                        num_hidden_layers=2, num_attention_heads=hidden // 128,
                                        num_key_value_heads=hidden // 128)).eval()
    trained = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in trained.modules():
            if isinstance(m, LoraLayer):
                for mod in (m.lora_A["default"], m.lora_B["default"]):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.05)
    holder = {}

    def fresh():
        holder["m"] = copy.deepcopy(trained)

    fns = {"peft reduce_intruder_dimension": lambda: peft_reduce(holder["m"], logging_sink=None),
           "loram_fast reduce_intruder_dimension": lambda: loram_fast.reduce_intruder_dimension(holder["m"])}
    timed = measure_interleaved(fns, warmup=1, reps=3, setup=fresh)
    results = {}
    for name, fn in fns.items():
        fresh()
        fn()
        results[name] = {n: m.get_delta_weight("intruder_reduced") for n, m in holder["m"].named_modules()
                         if isinstance(m, LoraLayer)}
    ref = results["peft reduce_intruder_dimension"]
    err = max(float((results["loram_fast reduce_intruder_dimension"][n] - d).norm() / d.norm()) for n, d in ref.items())
    info = machine_info("cpu")
    rows = [{"bench": "intruders", "provider": name, "shape": f"L2 h{hidden} mlp{inter}", "rank": 16,
             "dtype": "float32", "device": "cpu", **t,
             "ratio": timed["peft reduce_intruder_dimension"]["median_s"] / t["median_s"],
             "rel_err": 0.0 if name.startswith("peft") else err, **info} for name, t in timed.items()]
    header = heading("Intruder-dimension reduction", info,
                     "ratio = peft time / provider time (higher is faster); rel_err: max over layers of the mitigated"
                     " delta's relative difference from peft's.", peft=True)
    publish(rows, "intruders_cpu", ["provider", "shape", "median_s", "ratio", "rel_err"], header)


if __name__ == "__main__":
    main()
