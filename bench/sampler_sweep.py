"""Quality against sampling steps for dpmpp_2m, euler_a, ddim and unipc on the trained digits model (issue 13).

    PYTHONPATH=src .venv/bin/stablediff train digits --run-dir /work/bench-runs/demo   # once, ~12 min
    PYTHONPATH=src .venv/bin/python bench/sampler_sweep.py RUN_DIR [--per-digit 8] [--repeats 5]

Adherence of a demo-length model is at its ceiling at 10 steps already (bench/RESULTS.md,
sampler_quality), so the sweep also measures what is not: the Fréchet distance and KID of
the generated digits to the real held-out digits in the built-in digits feature space
(evaluation/digit_features), next to adherence accuracy and macro F1 (evaluation/adherence).

Each repeat makes `--per-digit` images of "a handwritten digit <word>" per digit in every
cell, all cells from the same seeds; each repeat has its own seed block, so the min-max over
repeats is the seed-to-seed spread. The cells are interleaved (steps outer, the sampler
order rotated each repeat: evaluation/sweep.repeated_sweep), and each cell's images are one batch
(inference/pipeline.txt2img_many: on a shared CPU a call's cost barely depends on its batch). The real-data floor is the
same metrics of real training digits (a seeded, class-balanced subset of the same size per
repeat) against the held-out ones. DDPM at 1000 steps (the sampler the model was trained
for, run exactly) is measured once, on the first repeat's seeds, when `--ddpm-per-digit` > 0.
Writes bench/results/sampler_sweep-<time>.json; `render(result)` is its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import write_result  # bench/ is on sys.path when a script runs

SAMPLERS = ("dpmpp_2m", "euler_a", "ddim", "unipc")
STEPS = (4, 6, 8, 12, 20)
SEED = 5000  # not the demo's adherence seeds (1000..): a fresh draw
METRICS = (("fd", "FD ↓", 2), ("kid", "KID ↓", 4), ("adherence", "adherence ↑", 3), ("macro_f1", "macro F1 ↑", 3))


def digit_prompts() -> dict[int, str]:
    from stablediff.data.digits import NUMBER_WORDS

    return {digit: f"a handwritten digit {word}" for digit, word in enumerate(NUMBER_WORDS)}


def real_floor(per_digit: int, repeats: int, reference: np.ndarray, seed: int) -> list[dict]:
    """The sweep's metrics of real training digits (per_digit of each digit, a new draw per repeat) vs the
    held-out features: what a generator that drew real digits would score at this sample count."""
    from PIL import Image

    from stablediff.data.digits import load_digits
    from stablediff.evaluation.sweep import digit_distribution_metric

    train, _ = load_digits(32)
    prompts = digit_prompts()
    metric = digit_distribution_metric(prompts, reference)
    out = []
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        picked = [rng.choice(np.flatnonzero(train.labels == d), per_digit, replace=False) for d in prompts]
        index = np.concatenate(picked)
        images = [Image.fromarray(a) for a in train.images[index]]
        out.append(metric(images, [prompts[int(d)] for d in train.labels[index]]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--per-digit", type=int, default=8, help="images per digit per cell per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ddpm-per-digit", type=int, default=8, help="0 skips the DDPM 1000-step reference")
    parser.add_argument("--guidance", type=float, default=3.0, help="the digits config's sample.guidance_scale")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; on a shared 2-core machine 2 "
                        "threads ran 6-20x slower than 1 (spinning OpenMP workers)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = {**sweep(args.run_dir, args.per_digit, args.repeats, args.ddpm_per_digit, args.guidance),
              "threads": args.threads}
    print(render(json_of(write_result("sampler_sweep", result))))


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def sweep(run_dir: Path, per_digit: int, repeats: int, ddpm_per_digit: int, guidance: float) -> dict:
    import stablediff
    from stablediff.evaluation.digit_features import real_features
    from stablediff.evaluation.sweep import digit_distribution_metric, repeated_sweep, sampler_sweep, summarize

    started = time.perf_counter()
    pipe = stablediff.load_pipeline(run_dir).pipe
    reference = real_features("held_out")
    prompts = digit_prompts()
    metric = digit_distribution_metric(prompts, reference)
    cells = repeated_sweep(pipe, list(prompts.values()), metric, repeats=repeats, seed=SEED, samplers=SAMPLERS,
                           steps=STEPS, per_prompt=per_digit, guidance_scale=guidance, batched=True,
                           stop=lambda: print(f"  {time.perf_counter() - started:6.0f} s", flush=True))
    ddpm = []
    if ddpm_per_digit > 0:
        ddpm = sampler_sweep(pipe, list(prompts.values()), metric, samplers=["ddpm"], steps=[1000],
                             per_prompt=ddpm_per_digit, seed=SEED, guidance_scale=guidance, batched=True)
    floor = real_floor(per_digit, repeats, reference, SEED)
    return {"run_dir": str(run_dir), "per_digit": per_digit, "repeats": repeats, "guidance": guidance,
            "seed": SEED, "seed_blocks": [SEED + r * per_digit for r in range(repeats)],
            "reference_count": int(len(reference)), "samplers": list(SAMPLERS), "steps": list(STEPS),
            "rows": summarize(cells), "ddpm": summarize(ddpm), "real_floor": _floor_row(floor, per_digit),
            "cells": [c.to_json() for c in cells + ddpm], "seconds": time.perf_counter() - started,
            "note": "shared 2-core machine: seconds per image are under contention, interleaved so all samplers "
                    "see it alike"}


def _floor_row(values: list[dict], per_digit: int) -> dict:
    from stablediff.evaluation.sweep import spread

    return {"count": per_digit * 10, "repeats": len(values),
            "metrics": {name: spread([v[name] for v in values]) for name in values[0]}}


def _cell(stats: dict, digits: int) -> str:
    if stats["n"] == 1:
        return f"{stats['median']:.{digits}f}"
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def _row(label: str, steps: str, row: dict) -> str:
    cells = [_cell(row["metrics"][name], digits) for name, _, digits in METRICS]
    seconds = _cell(row["seconds_per_image"], 3) if "seconds_per_image" in row else "—"
    return f"| {label} | {steps} | " + " | ".join(cells) + f" | {seconds} |"


def render(result: dict) -> str:
    """The RESULTS.md section: one row per (sampler, steps), median (min–max) over the repeats."""
    count, repeats = result["per_digit"] * 10, result["repeats"]
    lines = [f"Machine: {result['machine']}; {result['date']}; run `{result['run_dir']}`. {count} images per "
             f"cell ({result['per_digit']} per digit) per repeat, {repeats} repeats with their own seed blocks "
             f"(first seeds {', '.join(map(str, result['seed_blocks']))}), CFG {result['guidance']}; FD and KID "
             f"against the {result['reference_count']} real held-out digits in the built-in digits feature space "
             f"(64 dimensions). Median (min–max) over the repeats; whole bench {result['seconds'] / 60:.1f} min.",
             "",
             "| sampler | steps | " + " | ".join(title for _, title, _ in METRICS) + " | s/image |",
             "|---|---:|" + "---:|" * (len(METRICS) + 1)]
    lines += [_row(row["sampler"], str(row["steps"]), row) for row in sorted(
        result["rows"], key=lambda r: (result["samplers"].index(r["sampler"]), r["steps"]))]
    for row in result["ddpm"]:
        lines.append(_row(f"{row['sampler']} (reference, first seed block only, {row['count']} images)",
                          str(row["steps"]), row))
    floor = result["real_floor"]
    lines.append(_row(f"real training digits ({floor['count']} per repeat)", "—", floor))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
