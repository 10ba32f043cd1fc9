"""Bytes written per checkpoint: full training vs LoRA-style fine-tuning of a frozen base.

    .venv/bin/python bench/ckpt_bytes.py [--scale 0.4] [--rank 4]

A UNet2DConditionModel shaped like Stable Diffusion 1.5's, channels scaled by
`--scale` (0.4 -> ~140M parameters), saved twice into a fresh store:
- full: weights + EMA + AdamW moments, all changed between the saves
  (what every full-training checkpoint costs);
- LoRA-style: the frozen base weights + rank-`--rank` adapters on every attention
  projection (to_q, to_k, to_v, to_out.0) with their AdamW moments; only the
  adapters change between the saves.
The second save's `bytes_new` is what a checkpoint costs in steady state.
Prints a table; writes bench/results/ckpt_bytes-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from diffusers import UNet2DConditionModel

from stablediff.checkpoint import CheckpointStore

from _common import REPO, write_result  # bench/ is on sys.path when a script runs

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sd15_like_unet(scale: float) -> UNet2DConditionModel:
    channels = tuple(int(c * scale) // 32 * 32 for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(block_out_channels=channels, cross_attention_dim=768, attention_head_dim=8,
                                sample_size=32)


def lora_tensors(unet: torch.nn.Module, rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            out[f"lora/{name}.down"] = torch.randn(rank, module.in_features, generator=gen)
            out[f"lora/{name}.up"] = torch.randn(module.out_features, rank, generator=gen)
    return out


def with_adam(tensors: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for name, t in tensors.items():
        out[f"optim/{name}/exp_avg"] = torch.randn(t.shape, generator=gen)
        out[f"optim/{name}/exp_avg_sq"] = torch.rand(t.shape, generator=gen)
    return out


def two_saves(store: CheckpointStore, first: dict, second: dict) -> tuple[int, int]:
    store.save(1, first)
    manifest = store.save(2, second)
    return manifest.bytes_new, manifest.bytes_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.4)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    unet = sd15_like_unet(args.scale)
    base = {f"unet/{k}": v for k, v in unet.state_dict().items()}
    n_params = sum(v.numel() for v in base.values())

    def full_state(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        changed = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        ema = {k.replace("unet/", "ema/"): v + 1e-4 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        return {**with_adam(changed, g), **ema}

    def lora_state(seed: int) -> dict:
        return {**base, **with_adam(lora_tensors(unet, args.rank, torch.Generator().manual_seed(seed)), gen)}

    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        t0 = time.perf_counter()
        full_new, full_total = two_saves(CheckpointStore(os.path.join(tmp, "full")), full_state(1), full_state(2))
        full_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lora_new, lora_total = two_saves(CheckpointStore(os.path.join(tmp, "lora")), lora_state(1), lora_state(2))
        lora_s = time.perf_counter() - t0
    result = {
        "unet_params": n_params, "lora_rank": args.rank,
        "full_bytes_new": full_new, "full_bytes_total": full_total,
        "lora_bytes_new": lora_new, "lora_bytes_total": lora_total,
        "lora_vs_full": round(lora_new / full_new, 5),
        "full_two_saves_s": round(full_s, 2), "lora_two_saves_s": round(lora_s, 2),
    }
    mib = 2**20
    print(f"UNet {n_params / 1e6:.0f}M parameters (SD 1.5 shape x{args.scale}), LoRA rank {args.rank}")
    print(f"{'':34}{'full':>12}{'LoRA-style':>12}")
    print(f"{'checkpoint size (MiB)':34}{full_total / mib:>12.1f}{lora_total / mib:>12.1f}")
    print(f"{'bytes new in 2nd checkpoint (MiB)':34}{full_new / mib:>12.1f}{lora_new / mib:>12.2f}")
    print(f"LoRA-style writes {result['lora_vs_full']:.3%} of a full checkpoint")
    write_result("ckpt_bytes", result)


if __name__ == "__main__":
    main()
