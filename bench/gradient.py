"""Gradient estimation + init for the data-driven methods: time, peak memory and the sketch mode's error.

    python bench/gradient.py [--quick] [--device cpu|cuda]

Providers (each run in its own subprocess on CPU so that peak RSS is its own; on GPU peak allocated memory):
- ``loram_fast lora_ga (full)`` / ``(sketch)`` and ``loram_fast lora_one (full)`` / ``(sketch)``;
- ``peft lora_ga``: ``preprocess_loraga`` + ``get_peft_model(init_lora_weights="lora_ga")`` (peft's procedure);
- ``LoRA-One procedure``: every parameter trainable, per-parameter hooks copying each gradient to host memory,
  then ``svd_lowrank(-G, q=min(512, k), niter=16)`` per layer (the reference's code path, q clipped to fit).
``rel_err`` (sketch rows): mean over layers of ‖G − Ĝ_r‖_F / ‖G − G_r‖_F, where Ĝ_r is the rank-r truncation of the
sketched gradient and G_r the best rank-r approximation of the full one (1 = as good as the exact top-r).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, peak_rss, publish  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROVIDERS = ["loram_fast lora_ga (full)", "loram_fast lora_ga (sketch)", "peft lora_ga",
             "loram_fast lora_one (full)", "loram_fast lora_one (sketch)", "LoRA-One procedure"]


def setup(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=cfg["hidden"], intermediate_size=cfg["inter"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["hidden"] // 64, num_key_value_heads=cfg["hidden"] // 64)).to(cfg["device"])
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(cfg["batches"]):
        ids = torch.randint(0, 512, (cfg["bsz"], cfg["seq"]), generator=g).to(cfg["device"])
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches


def run_one(name, cfg):
    """Run one provider; returns seconds and, for sketch rows, the error vs the full gradient."""
    from peft import LoraConfig, get_peft_model

    import loram_fast

    model, batches = setup(cfg)
    r = cfg["rank"]
    lcfg = dict(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if name.startswith("loram_fast"):
        method = "lora_ga" if "lora_ga" in name else "lora_one"
        mode = "sketch" if "sketch" in name else "full"
        pm = get_peft_model(model, LoraConfig(**lcfg))
        loram_fast.init_model(pm, method, dataloader=batches, gradient_mode=mode, sketch_rank=cfg["sketch_rank"],
                              progress=False)
    elif name == "peft lora_ga":
        from peft import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        conf = LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **lcfg)

        def train_step():
            for b in batches:
                model(**b).loss.backward()

        preprocess_loraga(model, conf, train_step)
        get_peft_model(model, conf)
    else:  # the LoRA-One reference procedure
        model.train()
        grads = {}

        def record(_):
            for n, p in model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    grads[n] = grads[n] + p.grad.cpu() if n in grads else p.grad.cpu()
                    p.grad = None

        hooks = [p.register_hook(record) for p in model.parameters()]
        for b in batches:
            model(**b).loss.backward()
            record(None)
        for h in hooks:
            h.remove()
        pm = get_peft_model(model, LoraConfig(**lcfg))
        for n, m in pm.named_modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
                key = n.replace("base_model.model.", "", 1) + ".base_layer.weight"
                key = key.replace(".base_layer", "")
                G = grads[key] / len(batches)
                q = min(512, min(G.shape))
                U, S, V = torch.svd_lowrank(-G.float().to(cfg["device"]), q=q, niter=16)
                B = U[:, :r] @ torch.diag(S[:r].sqrt()) / S[0].sqrt() / 128 ** 0.5
                A = torch.diag(S[:r].sqrt()) @ V[:, :r].T / S[0].sqrt() / 128 ** 0.5
                m.lora_A["default"].weight.data = A.contiguous()
                m.lora_B["default"].weight.data = B.contiguous()
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"seconds": seconds}
    if cfg["device"] == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if "sketch" in name:
        out["rel_err"] = sketch_error(cfg, r)
    return out


def sketch_error(cfg, r):
    """Mean over layers of ‖G − Ĝ_r‖ / ‖G − G_r‖ with Ĝ the sketched gradient."""
    from peft import LoraConfig, get_peft_model

    from loram_fast.api import find_lora_layers
    from loram_fast.data import estimate_gradients

    model, batches = setup(cfg)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    ts = find_lora_layers(pm, "default")
    args = ([t.weight for t in ts], [False] * len(ts), [t.layer for t in ts])
    full = estimate_gradients(pm, *args, dataloader=batches)
    sk = estimate_gradients(pm, *args, dataloader=batches, mode="sketch", sketch_rank=cfg["sketch_rank"],
                            base_layers=[t.layer.get_base_layer() for t in ts])
    ratios = []
    for G, s in zip(full, sk):
        G = G.double()
        Ur, S, Vh = torch.linalg.svd(s.right.double(), full_matrices=False)
        approx = (s.left.double() @ Ur[:, :r]) * S[:r] @ Vh[:r]
        opt = torch.linalg.svdvals(G)[r:].square().sum().sqrt()
        ratios.append(float((G - approx).norm() / opt))
    return sum(ratios) / len(ratios)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        name, cfg = json.loads(args.child)
        res = run_one(name, cfg)
        res["maxrss_mib"] = peak_rss() / 2**20
        sys.stdout.write("RESULT " + json.dumps(res) + "\n")
        return
    if args.device == "cuda":
        cfg = dict(hidden=4096, inter=11008, layers=2, batches=8, bsz=1, seq=512, rank=16, sketch_rank=64)
    elif args.quick:
        cfg = dict(hidden=256, inter=688, layers=2, batches=4, bsz=2, seq=64, rank=8, sketch_rank=32)
    else:
        cfg = dict(hidden=512, inter=1376, layers=2, batches=4, bsz=2, seq=128, rank=16, sketch_rank=64)
    cfg["device"] = args.device
    info = machine_info(args.device)
    rows = []
    for name in PROVIDERS:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([name, cfg])], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.stderr.write(f"{name} failed:\n{proc.stderr[-2000:]}\n")
            continue
        res = json.loads(line[0][7:])
        peak = res.get("peak_mib", res["maxrss_mib"])
        rows.append({"bench": "gradient", "provider": name,
                     "shape": f"L{cfg['layers']} h{cfg['hidden']} mlp{cfg['inter']}, {cfg['batches']}x{cfg['bsz']}x{cfg['seq']} tokens",
                     "rank": cfg["rank"], "dtype": "float32", "device": args.device, "median_s": res["seconds"],
                     "rel_err": res.get("rel_err", ""), "extra": f"peak {'GPU' if 'peak_mib' in res else 'RSS'} "
                     f"{peak:.0f} MiB; sketch_rank {cfg['sketch_rank']}", **info})
    header = heading("Gradient estimation + init", info,
                     "One run per provider (own process); time includes the forward/backward passes; extra = peak "
                     "memory of the process (CPU: max RSS, includes the model and torch).", peft=True)
    publish(rows, f"gradient_{args.device}", ["provider", "shape", "rank", "median_s", "rel_err", "extra"], header)


if __name__ == "__main__":
    main()
