"""Ingestion throughput with decode/validate/frame in worker processes vs in the main process.

    .venv/bin/python bench/ingest_workers.py [--images 400] [--repeats 3] [--workers 0 1 2]

`--images` generated JPEGs of mixed sizes (512x384, 384x512, 448x448, 640x320, with
captions) are loaded by `data.loading.load_captioned_images` as training does:
decode, full validation, EXIF/RGB, aspect-ratio bucket (auto, resolution 256),
resize and crop, plus the 256x256 centre crop for the VAE stage. Each worker
count is timed `--repeats` times, interleaved so that load drift on a shared
machine hits every setting alike; the best time counts. Results (images/s,
speed-up over 0 workers, and the main process's CPU time per image, which does not
depend on machine load) are printed and written to bench/results/ingest_workers-<time>.json.
The wall-clock speed-up is bounded by the idle cores: note `machine` (and the load) in the result.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import REPO, write_result  # bench/ is on sys.path when a script runs
from stablediff.data.buckets import resolve_buckets
from stablediff.data.crop_policy import CropPolicy
from stablediff.data.ingest import CHUNK_SIZE, PREFETCH_CHUNKS
from stablediff.data.training_set import load_captioned_images

SIZES = ((512, 384), (384, 512), (448, 448), (640, 320))
RESOLUTION = 256


def write_jpegs(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        ramp = np.linspace(0, 1, max(width, height))
        base = rng.uniform(0, 255, 3) * ramp[:height, None, None] + rng.uniform(0, 255, 3) * ramp[None, :width, None]
        pixels = np.clip(base / 2 + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"a generated picture number {i}")


def load_seconds(folder: Path, workers: int, crop_policy: CropPolicy) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the main process) of one load."""
    with tempfile.TemporaryDirectory() as run_dir:
        t0, cpu0 = time.perf_counter(), time.process_time()
        data = load_captioned_images(str(folder), RESOLUTION, Path(run_dir), 0.0, crop_policy=crop_policy,
                                     num_workers=workers)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert len(data.captions) + len(data.held_out) > 0
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    crop_policy = CropPolicy(tuple(resolve_buckets("auto", RESOLUTION, 64)))
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        folder = Path(tmp)
        write_jpegs(folder, args.images)
        load_seconds(folder, 0, crop_policy)  # warm the page cache and imports
        times: dict[int, list[float]] = {w: [] for w in args.workers}
        main_cpu: dict[int, list[float]] = {w: [] for w in args.workers}
        for _ in range(args.repeats):
            for workers in args.workers:
                seconds, cpu = load_seconds(folder, workers, crop_policy)
                times[workers].append(seconds)
                main_cpu[workers].append(cpu)
    best = {w: min(t) for w, t in times.items()}
    cpu_per_image = {w: min(c) / args.images * 1e3 for w, c in main_cpu.items()}
    rates = {w: args.images / s for w, s in best.items()}
    base = rates.get(0, next(iter(rates.values())))
    print(f"ingestion: {args.images} JPEGs ({', '.join(f'{w}x{h}' for w, h in SIZES)}), auto buckets at "
          f"{RESOLUTION}, best of {args.repeats}")
    print(f"{'workers':>8}{'images/s':>10}{'vs 0':>8}{'main CPU ms/img':>17}")
    for workers, rate in rates.items():
        print(f"{workers:>8}{rate:>10.1f}{rate / base:>8.2f}{cpu_per_image[workers]:>17.2f}")
    # Independent of machine load: the main process's share bounds the speed-up on idle cores (Amdahl).
    if 0 in cpu_per_image:
        for workers in (w for w in args.workers if w > 0):
            print(f"with {workers} workers the main process does {cpu_per_image[workers] / cpu_per_image[0]:.0%} "
                  f"of the CPU work it does alone: at most {cpu_per_image[0] / cpu_per_image[workers]:.1f}x "
                  "with enough idle cores")
    write_result("ingest_workers", {
        "images": args.images, "repeats": args.repeats, "resolution": RESOLUTION, "sizes": SIZES,
        "chunk_size": CHUNK_SIZE, "prefetch_chunks": PREFETCH_CHUNKS,
        "seconds": {str(w): [round(s, 3) for s in t] for w, t in times.items()},
        "images_per_second": {str(w): round(r, 1) for w, r in rates.items()},
        "speedup_vs_0": {str(w): round(r / base, 2) for w, r in rates.items()},
        "main_cpu_ms_per_image": {str(w): round(c, 3) for w, c in cpu_per_image.items()},
    })


if __name__ == "__main__":
    main()
