"""What a checkpoint costs the training loop: snapshot and wait vs. background write.

    .venv/bin/python bench/ckpt_async_overhead.py --mb 256 --saves 5 --frozen-fraction 0.5

Builds a state of `--mb` MiB of float32 tensors (a `--frozen-fraction` of it never
changes, like a frozen VAE/text encoder), saves it `--saves` times through
AsyncCheckpointer with a "training step" of `--step-s` seconds in between, and
prints per-save timings. Results go to bench/results/ckpt_async_overhead-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from stablediff.checkpoint import AsyncCheckpointer, CheckpointStore, RetentionPolicy

from _common import write_result  # bench/ is on sys.path when a script runs

TENSOR_MB = 16  # size of each tensor in the synthetic state


def build_state(total_mb: int, frozen_fraction: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    gen = torch.Generator().manual_seed(0)
    count = max(1, total_mb // TENSOR_MB)
    numel = TENSOR_MB * 1024 * 1024 // 4
    state = {f"t{i:03d}": torch.randn(numel, generator=gen) for i in range(count)}
    trainable = list(state)[int(count * frozen_fraction) :]
    return state, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--frozen-fraction", type=float, default=0.5)
    parser.add_argument("--step-s", type=float, default=0.5, help="simulated training time between saves")
    parser.add_argument("--store", default=None, help="store location (default: a temp dir)")
    args = parser.parse_args()

    state, trainable = build_state(args.mb, args.frozen_fraction)
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        store = CheckpointStore(args.store or os.path.join(tmp, "store"))
        with AsyncCheckpointer(store, retention=RetentionPolicy(keep_last=2), log=print) as ckpt:
            for step in range(1, args.saves + 1):
                for name in trainable:
                    state[name].add_(1e-3)  # the "optimizer step"
                ckpt.snapshot_and_save(step, state, meta={"step": step})
                time.sleep(args.step_s)
    rows = [vars(s) for s in ckpt.stats]
    for r in rows:
        print(f"step {r['step']}: snapshot {r['snapshot_s']:.3f}s  wait {r['wait_s']:.3f}s  "
              f"background {r['write_s']:.3f}s  new {r['bytes_new'] / 2**20:.0f} MiB")
    write_result("ckpt_async_overhead", {"args": vars(args), "saves": rows})


if __name__ == "__main__":
    main()
