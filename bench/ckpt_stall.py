"""Training-loop stall per checkpoint: stablediff's async save vs a synchronous torch.save.

    .venv/bin/python bench/ckpt_stall.py [--params 100e6] [--seconds 180] [--every 60]

A ~100M-parameter model (a stack of Linear layers) with AdamW and an EMA copy:
the state a save must capture is weights + EMA + two Adam moments (~1.6 GB).

1. Stall: the time the training thread is blocked by one save.
   - baseline: `torch.save(state_dict, path)` + fsync, as diffusers' examples and
     accelerate's `save_state` do it (they do not even fsync);
   - stablediff: `AsyncCheckpointer.snapshot_and_save` (copy to host buffers; the
     hashing and writing happen in a background thread).
2. Overhead: training steps done in `--seconds` with a save every `--every` seconds
   vs the same loop with no saves (same process, same run), for both ways.
Prints a table; writes bench/results/ckpt_stall-<time>.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

from stablediff.checkpoint import AsyncCheckpointer, CheckpointStore, RetentionPolicy

from _common import REPO, write_result  # bench/ is on sys.path when a script runs



def build(params: float, width: int = 2048):
    layers = max(1, round(params / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = copy.deepcopy(model).requires_grad_(False)
    return model, optimizer, ema, width


def train_step(model, optimizer, ema, width: int) -> None:
    x = torch.randn(8, width)
    loss = model(x).pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.001)


def flat_state(model, optimizer, ema) -> dict[str, torch.Tensor]:
    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    state.update({f"ema/{k}": v for k, v in ema.state_dict().items()})
    for i, s in optimizer.state_dict()["state"].items():
        state.update({f"optim/{i}/{k}": v for k, v in s.items()})
    return state


def torch_save(model, optimizer, ema, path: str) -> None:
    """What accelerate's save_state / the diffusers examples do (plus an fsync, to be fair)."""
    with open(path, "wb") as fh:
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}, fh)
        fh.flush()
        os.fsync(fh.fileno())


def timed_loop(seconds: float, every: float, step_fn, save_fn) -> dict:
    steps, stalls = 0, []
    start = last = time.perf_counter()
    while time.perf_counter() - start < seconds:
        step_fn()
        steps += 1
        if save_fn and time.perf_counter() - last >= every:
            t0 = time.perf_counter()
            save_fn()
            stalls.append(time.perf_counter() - t0)
            last = time.perf_counter()
    return {"steps": steps, "stalls_s": [round(s, 3) for s in stalls]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--every", type=float, default=60)
    args = parser.parse_args()
    model, optimizer, ema, width = build(args.params)
    n_params = sum(p.numel() for p in model.parameters())
    step = lambda: train_step(model, optimizer, ema, width)  # noqa: E731
    for _ in range(3):
        step()
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        sync_path = os.path.join(tmp, "state.pt")
        t0 = time.perf_counter()
        torch_save(model, optimizer, ema, sync_path)
        sync_stall = time.perf_counter() - t0
        store = CheckpointStore(os.path.join(tmp, "store"))
        writer = AsyncCheckpointer(store, retention=RetentionPolicy(keep_last=2, best_metric=None), log=lambda m: None)
        counter = iter(range(1, 10**9))
        async_save = lambda: writer.snapshot_and_save(next(counter), flat_state(model, optimizer, ema))  # noqa: E731
        async_save()  # first save: buffers allocated, everything written
        writer.wait()
        t0 = time.perf_counter()
        async_save()
        async_stall = time.perf_counter() - t0
        writer.wait()
        write_s = writer.stats[-1].write_s
        plain = timed_loop(args.seconds, args.every, step, None)
        with_async = timed_loop(args.seconds, args.every, step, async_save)
        writer.close()
        with_sync = timed_loop(args.seconds, args.every, step, lambda: torch_save(model, optimizer, ema, sync_path))
    result = {
        "params": n_params, "state_bytes": sum(t.numel() * t.element_size() for t in flat_state(model, optimizer, ema).values()),
        "sync_stall_s": round(sync_stall, 3), "async_stall_s": round(async_stall, 3),
        "async_background_write_s": round(write_s or 0, 3),
        "stall_ratio": round(async_stall / sync_stall, 4),
        "loop_seconds": args.seconds, "save_every_s": args.every,
        "steps_no_saves": plain["steps"], "steps_async": with_async["steps"], "steps_sync": with_sync["steps"],
        "overhead_async": round(1 - with_async["steps"] / plain["steps"], 4),
        "overhead_sync": round(1 - with_sync["steps"] / plain["steps"], 4),
        "async_stalls_s": with_async["stalls_s"], "sync_stalls_s": with_sync["stalls_s"],
    }
    print(f"{n_params / 1e6:.0f}M parameters, state {result['state_bytes'] / 2**30:.2f} GiB")
    print(f"{'':28}{'torch.save':>12}{'stablediff':>12}{'ratio':>8}")
    print(f"{'stall per save (s)':28}{sync_stall:>12.2f}{async_stall:>12.2f}{result['stall_ratio']:>8.3f}")
    print(f"{'steps in loop (no save: ' + str(plain['steps']) + ')':28}{with_sync['steps']:>12}{with_async['steps']:>12}")
    print(f"{'overhead vs no saves':28}{result['overhead_sync']:>12.1%}{result['overhead_async']:>12.1%}")
    write_result("ckpt_stall", result)


if __name__ == "__main__":
    main()
