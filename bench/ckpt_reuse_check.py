"""What the reuse check costs a save: healing dedup vs trusting a present chunk's size.

    .venv/bin/python bench/ckpt_reuse_check.py [--repeats 5] [--base-mb 256] [--model-mb 128]

Since the store heals, the first time a process reuses a chunk it reads it back
and compares it with the bytes in memory (`CheckpointStore(check_reused=True)`,
the default); before, a chunk of the right size was trusted
(`check_reused=False`, the baseline here). Two states:

  lora  a frozen base of --base-mb (never changes) + adapters and their Adam
        moments (--adapter-mb, change every save)
  full  weights, EMA and two Adam moments (--model-mb in all, change every save)
        + a frozen VAE and text encoder (--frozen-mb)

The store already holds a checkpoint written by another instance (another
process, as far as the known-good set goes). Each measurement opens a fresh
instance with the check on or off — the sides alternate, and which goes first
alternates per repeat — and times three synchronous saves:

  cold     first save of a process that has not read the store: every reused
           chunk is compared once (the worst case)
  resumed  first save after a `load()` (what `train` does on resume): the load
           verified every chunk, so nothing is compared
  steady   a later save: known good, nothing compared

Prints medians with min–max spread per side, for the ratio on/off, and for the
check alone (timed inside the "on" saves, which is steadier than the A/B
difference on a loaded machine); writes bench/results/ckpt_reuse_check-<time>.json.
`--dir /dev/shm` takes the disk's fsync noise out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from stablediff.checkpoint import CheckpointStore, gc

from _common import write_result  # bench/ is on sys.path when a script runs

TENSOR_MB = 8
PHASES = ("cold", "resumed", "steady")


def tensors(prefix: str, total_mb: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    count = max(1, round(total_mb / TENSOR_MB))
    numel = int(total_mb * 2**20 / 4 / count)
    return {f"{prefix}/{i:03d}": torch.randn(numel, generator=gen) for i in range(count)}


def build(kind: str, args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], list[str]]:
    gen = torch.Generator().manual_seed(0)
    if kind == "lora":
        frozen = tensors("base", args.base_mb, gen)
        trainable = tensors("lora", args.adapter_mb, gen)
    else:
        frozen = tensors("vae_text", args.frozen_mb, gen)
        trainable = {**tensors("unet", args.model_mb / 4, gen), **tensors("ema", args.model_mb / 4, gen),
                     **tensors("adam_m", args.model_mb / 4, gen), **tensors("adam_v", args.model_mb / 4, gen)}
    return {**frozen, **trainable}, list(trainable)


def timed_save(store: CheckpointStore, step: int, state: dict, trainable: list[str]) -> dict:
    for name in trainable:
        state[name].add_(1e-3)  # the optimizer step: these chunks are new in every save
    started = time.perf_counter()
    store.save(step, state)
    seconds = time.perf_counter() - started
    counts = store.last_save
    return {"s": seconds, "checked": counts.checked, "mb_checked": counts.bytes_checked / 2**20,
            "check_s": counts.check_s}


def measure(location: str, check: bool, state: dict, trainable: list[str], step: int) -> dict:
    cold = CheckpointStore(location, check_reused=check)
    out = {"cold": timed_save(cold, step, state, trainable)}
    resumed = CheckpointStore(location, check_reused=check)
    resumed.load(step=1)
    out["resumed"] = timed_save(resumed, step + 1, state, trainable)
    out["steady"] = timed_save(resumed, step + 2, state, trainable)
    admin = CheckpointStore(location)  # untimed: drop the three saves again
    for s in (step, step + 1, step + 2):
        admin.delete_manifest(s)
    gc(admin, grace_s=0)
    return out


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_state(kind: str, args: argparse.Namespace, tmp: str) -> dict:
    state, trainable = build(kind, args)
    location = os.path.join(tmp, kind)
    CheckpointStore(location).save(1, state)  # "another process" wrote the existing checkpoint
    samples: dict[str, list[dict]] = {"on": [], "off": []}
    step = 10
    for repeat in range(args.repeats):
        for side in (("on", "off") if repeat % 2 == 0 else ("off", "on")):
            samples[side].append(measure(location, side == "on", state, trainable, step))
            step += 10
    result = {"state_mb": sum(t.numel() * 4 for t in state.values()) / 2**20,
              "trainable_mb": sum(state[n].numel() * 4 for n in trainable) / 2**20, "samples": samples}
    for phase in PHASES:
        on = [m[phase]["s"] for m in samples["on"]]
        off = [m[phase]["s"] for m in samples["off"]]
        inside = [m[phase]["check_s"] for m in samples["on"]]
        result[phase] = {"on_s": summary(on), "off_s": summary(off),
                         "ratio": summary([a / b for a, b in zip(on, off)]),
                         "check_s": summary(inside),  # measured inside the "on" saves
                         "check_fraction": summary([c / a for c, a in zip(inside, on)]),
                         "mb_checked": samples["on"][0][phase]["mb_checked"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base-mb", type=float, default=256)
    parser.add_argument("--adapter-mb", type=float, default=8)
    parser.add_argument("--model-mb", type=float, default=128)
    parser.add_argument("--frozen-mb", type=float, default=64)
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="reuse-check-", dir=args.dir) as tmp:
        for kind in ("lora", "full"):
            results[kind] = run_state(kind, args, tmp)
            r = results[kind]
            print(f"{kind}: {r['state_mb']:.0f} MiB state, {r['trainable_mb']:.0f} MiB change per save")
            for phase in PHASES:
                p = r[phase]
                print(f"  {phase:8s} check on {_fmt(p['on_s'])}  off {_fmt(p['off_s'])}  "
                      f"ratio {_fmt(p['ratio'])}  check alone {_fmt(p['check_s'])} = "
                      f"{_fmt(p['check_fraction'])} of the save  ({p['mb_checked']:.0f} MiB compared)")
    write_result("ckpt_reuse_check", {"args": vars(args), "states": results})


def _fmt(s: dict) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


if __name__ == "__main__":
    main()
