"""Prompt adherence of the trained digits model by sampler: dpmpp_2m at 10 and 20 steps vs ddpm at 1000.

    .venv/bin/stablediff demo --run-dir /work/digits-run    # once, ~15-25 min
    .venv/bin/python bench/sampler_quality.py [RUN_DIR] [--per-digit 5]

For each digit, `--per-digit` images of "a handwritten digit N" (seeds 1000..),
judged by stablediff.evaluation.adherence's classifier (what `stablediff demo`
reports). DDPM at 1000 steps is the sampler the model was trained for, run
exactly; the question is how much a fast solver gives up at 10 and 20 steps.
The same seeds are used for every sampler. Also reports wall time per image.
Prints a table; writes bench/results/sampler_quality-<time>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import write_result  # bench/ is on sys.path when a script runs

SEED = 1000  # the demo's adherence seeds
SETTINGS = [("dpmpp_2m", 10), ("dpmpp_2m", 20), ("ddpm", 1000)]


def adherence_for(model, sampler: str, steps: int, per_digit: int, guidance: float):
    from stablediff.data.digits import NUMBER_WORDS
    from stablediff.evaluation.adherence import adherence
    from stablediff.inference.pipeline import images_to_array

    images, requested = [], []
    for digit, word in enumerate(NUMBER_WORDS):
        batch = model.txt2img(f"a handwritten digit {word}", steps=steps, sampler=sampler, seed=SEED,
                              num=per_digit, guidance_scale=guidance)
        images += batch
        requested += [digit] * len(batch)
    return adherence(images_to_array(images), np.array(requested), images[0].width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", type=Path, default=Path("/work/digits-run"))
    parser.add_argument("--per-digit", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=3.0, help="the digits config's sample.guidance_scale")
    args = parser.parse_args()
    import stablediff

    model = stablediff.load_pipeline(args.run_dir)
    rows = []
    for sampler, steps in SETTINGS:
        start = time.perf_counter()
        report = adherence_for(model, sampler, steps, args.per_digit, args.guidance)
        seconds = time.perf_counter() - start
        rows.append({"sampler": sampler, "steps": steps, "adherence": report.adherence, "count": report.count,
                     "reference": report.reference, "seconds_per_image": seconds / report.count})
        print(f"{sampler:<9} {steps:>5} steps: adherence {report.adherence:.1%} ({report.count} images, "
              f"{seconds / report.count:.2f} s/image)", flush=True)
    print(f"\n{args.per_digit} images per digit, seeds {SEED}.., CFG {args.guidance}; timings on a shared "
          "2-core machine, under contention")
    print(f"{'sampler':<9} {'steps':>5} {'adherence':>10} {'s/image':>8}")
    for row in rows:
        print(f"{row['sampler']:<9} {row['steps']:>5} {row['adherence']:>10.1%} {row['seconds_per_image']:>8.2f}")
    print(f"classifier accuracy on real held-out digits: {rows[0]['reference']:.1%}")
    write_result("sampler_quality", {"run_dir": str(args.run_dir), "per_digit": args.per_digit,
                                     "guidance": args.guidance, "rows": rows,
                                     "note": "shared machine, timings under contention"})


def render(result: dict) -> str:
    """The RESULTS.md table (bench/render_results.py)."""
    lines = [f"Machine: {result['machine']}; {result['date']}; {result['per_digit']} images per digit, CFG "
             f"{result['guidance']}, same seeds for every sampler; {result.get('note', '')}.", "",
             "| sampler | steps | adherence | s/image |", "|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['adherence']:.1%} | {r['seconds_per_image']:.2f} |"
              for r in result["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
