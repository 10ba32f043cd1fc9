"""FD, KID, adherence (per-digit precision/recall/F1) and bits per latent dimension of trained digits models.

    PYTHONPATH=src .venv/bin/python bench/eval_metrics.py RUN_DIR [RUN_DIR ...] [--per-digit 50]

For each run's final model (its newest checkpoint, the weights `generate` uses):
- `--per-digit` images of "a handwritten digit <word>" per digit (DPM-Solver++ 20 steps, CFG 3, seeds
  1000..: what the demo generates), their Fréchet distance and KID (with the standard deviation over
  100 seeded subsets) to the real held-out digits in the built-in digits feature space, and the digit
  classifier's accuracy and per-digit/macro precision, recall and F1 on them;
- bits per latent dimension from the variational bound on the held-out digits' VAE latents
  (evaluation/likelihood: importance-sampled timesteps, with the standard error of that sampling). The
  model is a latent model: this is a density bound on its 8x8x4 latents, not pixel bits/dim.
Next to them the real-data reference: FD/KID of the real training digits (all of them, and a class-balanced
subset as large as the generated set) against the held-out ones, and the classifier on the real held-out
digits. Each metric's seconds are recorded. Writes bench/results/eval_metrics-<time>.json;
`render(result)` is its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import write_result  # bench/ is on sys.path when a script runs

SEED = 1000  # the demo's adherence seeds
STEPS, SAMPLER = 20, "dpmpp_2m"
KID_SUBSETS = 100
BPD_TIMESTEPS, BPD_SEED = 32, 1234


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def generate(pipe, per_digit: int, guidance: float):
    from stablediff.data.digits import NUMBER_WORDS
    from stablediff.inference.pipeline import images_to_array, txt2img
    from stablediff.inference.schedulers import make_scheduler

    original = pipe.scheduler
    pipe.scheduler = make_scheduler(SAMPLER, dict(original.config), STEPS)
    try:
        images, requested = [], []
        for digit, word in enumerate(NUMBER_WORDS):
            batch = txt2img(pipe, f"a handwritten digit {word}", steps=STEPS, guidance_scale=guidance, seed=SEED,
                            num=per_digit)
            images += batch
            requested += [digit] * len(batch)
    finally:
        pipe.scheduler = original
    return images_to_array(images), np.array(requested)


def distances(generated: np.ndarray, reference: np.ndarray) -> dict:
    """FD and KID of (N, 64) features against the reference, each with its seconds."""
    import warnings

    from stablediff.evaluation.frechet import SampleCountWarning, frechet_distance, kernel_inception_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleCountWarning)  # the counts are recorded next to each score
        fd, fd_seconds = timed(frechet_distance, generated, reference)
    kid, kid_seconds = timed(kernel_inception_distance, generated, reference, num_subsets=KID_SUBSETS)
    return {"fd": {**fd.to_json(), "seconds": fd_seconds}, "kid": {**kid.to_json(), "seconds": kid_seconds}}


def bits_per_latent_dim(pipe) -> dict:
    """The variational bound of the held-out digits' scaled VAE latent means under the UNet, captioned as in
    training ("a handwritten digit <word>", the first caption template)."""
    import torch
    from diffusers import DDPMScheduler

    from stablediff.data.digits import load_digits
    from stablediff.evaluation.likelihood import bits_per_dim
    from stablediff.models.text_encoder import encode_captions

    _, held = load_digits(32)
    with torch.no_grad():
        pixels = torch.from_numpy(held.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        captions = [held.captions_for(i)[0] for i in range(len(held))]
        embeddings = encode_captions(pipe.tokenizer, pipe.text_encoder, captions)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    result = bits_per_dim(pipe.unet, scheduler, latents, embeddings, scheduler.config.prediction_type,
                          num_timesteps=BPD_TIMESTEPS, seed=BPD_SEED, space="latent")
    return result.to_json()


def evaluate_run(run_dir: Path, per_digit: int, guidance: float, reference: np.ndarray) -> dict:
    import stablediff
    from stablediff.checkpoint import CheckpointStore
    from stablediff.evaluation.adherence import adherence
    from stablediff.evaluation.digit_features import features

    pipe = stablediff.load_pipeline(run_dir).pipe
    (images, requested), generation_seconds = timed(generate, pipe, per_digit, guidance)
    feats, feature_seconds = timed(features, images)
    metrics = distances(feats, reference)
    report, adherence_seconds = timed(adherence, images, requested)
    metrics["adherence"] = {**report.scores.to_json(), "seconds": adherence_seconds}
    bpd, bpd_seconds = timed(bits_per_latent_dim, pipe)
    metrics["bpd"] = {**bpd, "seconds": bpd_seconds}
    steps = CheckpointStore(run_dir / "checkpoints").steps()
    return {"run_dir": str(run_dir), "step": steps[-1] if steps else None, "count": len(images),
            "generation_seconds": generation_seconds, "feature_seconds": feature_seconds, "metrics": metrics,
            "curve": checkpoint_curve(run_dir)}


CURVE_METRICS = ("fd", "kid", "adherence", "bpd")


def checkpoint_curve(run_dir: Path) -> dict:
    """{step: {metric: eval.json's entry}}: what the run's evaluations (train-time, and `stablediff eval` added
    later) recorded for each checkpoint, so the table shows how each metric moved with training."""
    from stablediff.io.run_files import read_eval

    checkpoints = read_eval(run_dir).get("checkpoints", {})
    return {step: {name: entry["metrics"][name] for name in CURVE_METRICS if name in entry["metrics"]}
            for step, entry in sorted(checkpoints.items(), key=lambda item: int(item[0]))}


def real_reference(count: int, reference: np.ndarray) -> dict:
    """FD/KID of real training digits vs held-out (all 1,438, and `count` class-balanced ones: the floor at the
    generated set's size), and the classifier's scores on the held-out digits."""
    from stablediff.data.digits import load_digits
    from stablediff.evaluation.adherence import reference_scores
    from stablediff.evaluation.digit_features import real_features

    train_feats = real_features("train")
    train, _ = load_digits(32)
    rng = np.random.default_rng(SEED)
    per_digit = count // 10
    index = np.concatenate([rng.choice(np.flatnonzero(train.labels == d), per_digit, replace=False)
                            for d in range(10)])
    reference_scores.cache_clear()  # time the classification itself, not a cached answer
    scores, seconds = timed(reference_scores)
    return {"train_all": distances(train_feats, reference), "train_subset": distances(train_feats[index], reference),
            "classifier_on_held_out": {**scores.to_json(), "seconds": seconds}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--per-digit", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0, help="the digits config's sample.guidance_scale")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; on a shared 2-core machine 2 "
                        "threads ran 6-20x slower than 1 (spinning OpenMP workers)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from stablediff.evaluation.digit_features import real_features

    started = time.perf_counter()
    reference = real_features("held_out")
    runs = []
    for run_dir in args.run_dirs:
        runs.append(evaluate_run(run_dir, args.per_digit, args.guidance, reference))
        print(f"{run_dir}: FD {runs[-1]['metrics']['fd']['value']:.2f}", flush=True)
    result = {"per_digit": args.per_digit, "guidance": args.guidance, "sampler": SAMPLER, "steps": STEPS,
              "seed": SEED, "kid_subsets": KID_SUBSETS, "bpd_timesteps": BPD_TIMESTEPS, "bpd_seed": BPD_SEED,
              "runs": runs, "reference": real_reference(args.per_digit * 10, reference),
              "seconds": time.perf_counter() - started, "threads": args.threads, "note": "shared 2-core machine: seconds under contention"}
    import json

    print(render(json.loads(write_result("eval_metrics", result).read_text())))


def _kid(entry: dict) -> str:
    return f"{entry['value']:.4f} ± {entry['spread']:.4f}"


def _summary_row(label: str, fd: dict, kid: dict, adh: dict | None, bpd: dict | None, seconds: str) -> str:
    adherence = (f"{adh['value']:.3f} | {adh['macro']['precision']:.3f} | {adh['macro']['recall']:.3f} | "
                 f"{adh['macro']['f1']:.3f}") if adh else "— | — | — | —"
    bits = f"{bpd['value']:.4f} ± {bpd['standard_error']:.4f}" if bpd else "—"
    return (f"| {label} | {fd['value']:.2f} ({fd['count']} vs {fd['reference_count']}) | {_kid(kid)} | "
            f"{adherence} | {bits} | {seconds} |")


def _seconds(run: dict) -> str:
    m = run["metrics"]
    return (f"generate {run['generation_seconds']:.0f}, features {run['feature_seconds']:.1f}, FD "
            f"{m['fd']['seconds']:.2f}, KID {m['kid']['seconds']:.2f}, adherence {m['adherence']['seconds']:.2f}, "
            f"bits {m['bpd']['seconds']:.0f}")


def _per_digit_table(result: dict) -> list[str]:
    """Precision / recall / F1 per digit for each run, the real held-out digits' in the last column."""
    real = result["reference"]["classifier_on_held_out"]["per_class"]
    names = [Path(run["run_dir"]).name for run in result["runs"]]
    lines = ["| digit | " + " | ".join(f"{n}: P / R / F1" for n in names) + " | real held-out: P / R / F1 |",
             "|---:|" + "---|" * (len(names) + 1)]
    for digit in sorted(real, key=int):
        cells = [run["metrics"]["adherence"]["per_class"][digit] for run in result["runs"]] + [real[digit]]
        lines.append(f"| {digit} | " + " | ".join(f"{c['precision']:.3f} / {c['recall']:.3f} / {c['f1']:.3f}"
                                                  for c in cells) + " |")
    return lines


def render(result: dict) -> str:
    """The RESULTS.md section: one summary row per run and the real references, then the per-digit scores."""
    ref, run0 = result["reference"], result["runs"][0]
    bpd = run0["metrics"]["bpd"]
    lines = [f"Machine: {result['machine']}; {result['date']}. {result['per_digit'] * 10} generated digits per model "
             f"({result['per_digit']} per digit, {result['sampler']} {result['steps']} steps, CFG "
             f"{result['guidance']}, seeds {result['seed']}..); FD (sample counts in brackets) and KID (± std over "
             f"{result['kid_subsets']} subsets) against the real held-out digits in the built-in digits feature "
             f"space; {bpd['unit']}: {bpd['estimator']} with {bpd['num_timesteps']} "
             f"timesteps per image ({bpd['model_calls_per_image']} UNet calls) on the {bpd['num_images']} held-out "
             "digits' VAE latents, ± the standard error of the timestep sampling — a density bound on the VAE's "
             "latents, not comparable with pixel bits/dim. Seconds in the last column; whole bench "
             f"{result['seconds'] / 60:.1f} min.", "",
             "| model (final step) | FD ↓ | KID ↓ | accuracy ↑ | macro P | macro R | macro F1 | bits per latent "
             "dim ↓ | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for run in result["runs"]:
        m = run["metrics"]
        lines.append(_summary_row(f"{Path(run['run_dir']).name} (step {run['step']})", m["fd"], m["kid"],
                                  m["adherence"], m["bpd"], _seconds(run)))
    sub, full, clf = ref["train_subset"], ref["train_all"], ref["classifier_on_held_out"]
    lines.append(_summary_row("real training digits, class-balanced subset", sub["fd"], sub["kid"], None, None,
                              f"FD {sub['fd']['seconds']:.2f}, KID {sub['kid']['seconds']:.2f}"))
    lines.append(_summary_row("real training digits, all", full["fd"], full["kid"], None, None,
                              f"FD {full['fd']['seconds']:.2f}, KID {full['kid']['seconds']:.2f}"))
    lines.append(f"| classifier on the real held-out digits | | | {clf['value']:.3f} | {clf['macro']['precision']:.3f} "
                 f"| {clf['macro']['recall']:.3f} | {clf['macro']['f1']:.3f} | | {clf['seconds']:.2f} |")
    return "\n".join(lines + ["", *_per_digit_table(result), *_curve_tables(result)])


def _curve_cell(entry: dict | None, name: str) -> str:
    if entry is None:
        return "—"
    spread = entry.get("spread")
    if name == "adherence":
        return f"{entry['value']:.0%}"
    digits = 4 if name in ("kid", "bpd") else 2
    return f"{entry['value']:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _curve_tables(result: dict) -> list[str]:
    """For each run with evaluations in its eval.json: each metric at each evaluated checkpoint, with seconds."""
    lines = []
    for run in result["runs"]:
        curve = run.get("curve") or {}
        if not curve:
            continue
        counts = sorted({entry["count"] for metrics in curve.values() for entry in metrics.values()})
        lines += ["", f"Across the checkpoints of {Path(run['run_dir']).name} (its eval.json: {'/'.join(map(str, counts))} "
                  "images per metric; KID ± std over subsets, bits ± standard error):", "",
                  "| step | FD ↓ | KID ↓ | adherence ↑ | bits per latent dim ↓ | seconds (FD incl. generating, KID, "
                  "adherence, bits) |", "|---:|---:|---:|---:|---:|---|"]
        for step, metrics in curve.items():
            cells = [_curve_cell(metrics.get(name), name) for name in CURVE_METRICS]
            seconds = ", ".join(f"{metrics[name]['seconds']:.0f}" if name in metrics else "—" for name in CURVE_METRICS)
            lines.append(f"| {step} | " + " | ".join(cells) + f" | {seconds} |")
    return lines


if __name__ == "__main__":
    main()
