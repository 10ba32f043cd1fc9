"""The digits fine-tuning case end to end with the CLI: pretrain on 0-8, teach the nine from 20 images.

    python bench/finetune_digits.py --work /tmp/ftbench [--methods lora full] [--per-digit 40]

1. `stablediff train digits-0to8` (reused when WORK/base is complete);
2. for each method, `stablediff finetune digits-lora-nine` on WORK/base (lora as the recipe says; full:
   every UNet weight with a lower LR), timed;
3. prompt adherence of the base and of each fine-tune's best checkpoint: N images per digit of
   "a handwritten digit <word>", read by the digits classifier (evaluation/adherence.py); the goal is
   >= 80% nines after fine-tuning, with 0-8 within 10 points of the base;
4. checkpoint bytes: new bytes per save (after the first) as a share of the base run's full checkpoint.
A measurement, not an A/B timing: each method runs once (the runs are deterministic on a CPU).
Writes bench/results/finetune_digits-<time>.json; `--markdown FILE.json` prints its RESULTS.md table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, write_result  # noqa: E402

TOKEN = "<nine>"
METHODS = {
    "lora": [],
    "lora_rank8": ["--set", "finetune.lora.rank=8", "--set", "finetune.lora.alpha=8"],
    "full": ["--set", "finetune.method=full", "--set", "train.learning_rate=2e-4"],
    "textual_inversion": ["--set", "finetune.method=textual_inversion", "--set", f"finetune.token={TOKEN}",
                          "--set", "finetune.init_token=eight", "--set",
                          f"finetune.instance_prompt=a handwritten digit {TOKEN}", "--set", "train.learning_rate=5e-3"],
}
PROMPTS = {"textual_inversion": {9: f"a handwritten digit {TOKEN}"}}  # the nine is asked for by the new word


def cli(*args: str) -> float:
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run([sys.executable, "-m", "stablediff", *args], cwd=REPO, check=True, env=env)
    return time.perf_counter() - started


def adherence_of(run_dir: Path, per_digit: int, prompts: dict | None = None) -> dict:
    from stablediff.evaluation.adherence import generated_adherence
    from stablediff.models.run_export import pipeline_from_run

    report = generated_adherence(pipeline_from_run(run_dir), range(10), per_digit, prompts=prompts)
    nines = report.per_digit[9]
    others = sum(report.per_digit[d] for d in range(9)) / 9
    return {"nine": nines, "zero_to_eight": others, "per_digit": report.per_digit, "count": report.count,
            "reference": report.reference}


def checkpoint_bytes(run_dir: Path) -> dict:
    from stablediff.checkpoint import CheckpointStore

    summaries = sorted(CheckpointStore(run_dir / "checkpoints").list(), key=lambda s: s.step)
    later = [s.bytes_new for s in summaries[1:]]
    return {"first": summaries[0].bytes_new, "new_per_save": sum(later) / max(len(later), 1),
            "saves": len(summaries)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftbench"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--per-digit", type=int, default=40)
    parser.add_argument("--markdown", type=Path, default=None, help="print the table of a results JSON")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    base = args.work / "base"
    result = {"base": {"seconds": cli("train", "digits-0to8", "--run-dir", str(base))}}
    result["base"].update(adherence_of(base, args.per_digit), checkpoint=checkpoint_bytes(base))
    full_bytes = result["base"]["checkpoint"]["first"]
    for method in args.methods:
        run_dir = args.work / method
        seconds = cli("finetune", "digits-lora-nine", "--run-dir", str(run_dir), "--set", f"finetune.base={base}",
                      *METHODS[method])
        ckpt = checkpoint_bytes(run_dir)
        result[method] = {"seconds": seconds, **adherence_of(run_dir, args.per_digit, PROMPTS.get(method)),
                          "checkpoint": ckpt,
                          "share_of_full_checkpoint": ckpt["new_per_save"] / full_bytes}
    print(markdown(json.loads(write_result("finetune_digits", result).read_text())))


def markdown(result: dict) -> str:
    base = result["base"]
    lines = [f"Machine: {result['machine']}; {result['date']}; {base['count']} generated digits per model "
             "(DPM-Solver++ 20 steps, CFG 3).", "",
             "| model | nines read as 9 | 0-8 adherence | time | new bytes per save (share of a full checkpoint) |",
             "|---|---|---|---|---|",
             f"| base (digits-0to8) | {base['nine']:.1%} | {base['zero_to_eight']:.1%} | {base['seconds'] / 60:.1f} min "
             "| (full checkpoint: {:.1f} MiB) |".format(base["checkpoint"]["first"] / 2**20)]
    for method in (m for m, r in result.items() if m != "base" and isinstance(r, dict) and "nine" in r):
        r = result[method]
        lines.append(f"| {method} on 20 nines | {r['nine']:.1%} | {r['zero_to_eight']:.1%} | "
                     f"{r['seconds'] / 60:.1f} min | {r['checkpoint']['new_per_save'] / 2**10:.0f} KiB "
                     f"({r['share_of_full_checkpoint']:.2%}) |")
    return "\n".join(lines)


render = markdown  # what bench/render_results.py calls for this benchmark's RESULTS.md section


if __name__ == "__main__":
    main()
