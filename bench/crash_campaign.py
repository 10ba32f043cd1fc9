"""Crash campaign: SIGKILL the real checkpoint writer N times at random instants.

    .venv/bin/python bench/crash_campaign.py --kills 1000                 # the store's writer
    .venv/bin/python bench/crash_campaign.py --mode retention --kills 300 # aimed into retention
    .venv/bin/python bench/crash_campaign.py --mode vae --kills 20        # `stablediff train`, stage 1
    .venv/bin/python bench/crash_campaign.py --mode rollback --kills 20   # right after a rollback

After every kill it checks that each committed checkpoint (primary and replica)
verifies deeply, loads, and holds exactly the data that was saved for its step,
that `load()` picks the newest without skipping anything, and that a new save,
gc and verify work. Prints kills / torn checkpoints selected / failures and
writes the numbers to bench/results/crash_campaign-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the writer and the checks live with the tests: one copy of each

from tests.checkpoint.crash_check import check_after_kill, run_and_kill  # noqa: E402

MODES = ("store", "retention", "vae", "rollback")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="store", help="what is killed (default: store)")
    parser.add_argument("--kills", type=int, default=1000, help="number of SIGKILLs (default 1000)")
    parser.add_argument("--max-delay", type=float, default=0.5, help="kill within this many seconds of start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the stores live (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    return parser.parse_args()


def campaign(args: argparse.Namespace, workdir: str) -> dict:
    primary, replica = os.path.join(workdir, "primary"), os.path.join(workdir, "replica")
    rand = random.Random(args.seed)
    totals = {"kills": 0, "torn_selected": 0, "failed_kills": 0, "kills_leaving_temp_files": 0}
    examples: list[str] = []
    steps_present = 0
    started = time.perf_counter()
    for kill in range(1, args.kills + 1):
        run_and_kill(primary, replica, rand, args.max_delay)
        outcome = check_after_kill(primary, replica)
        totals["kills"] += 1
        totals["torn_selected"] += outcome.torn_selected
        totals["failed_kills"] += bool(outcome.failures)
        totals["kills_leaving_temp_files"] += outcome.temp_files > 0
        steps_present += sum(len(s) for s in outcome.steps_present.values())
        examples.extend(f"kill {kill}: {f}" for f in outcome.failures[: max(0, 20 - len(examples))])
        if kill % 50 == 0 or kill == args.kills:
            print(f"{kill}/{args.kills} kills, {totals['failed_kills']} failed, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    return {
        **totals,
        "mean_checkpoints_present_after_kill": steps_present / max(1, totals["kills"]),
        "failure_examples": examples,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def retention_campaign(args: argparse.Namespace, workdir: str) -> dict:
    """SIGKILL the retention writer a few microseconds to milliseconds after it starts a retention pass."""
    from stablediff.checkpoint import CheckpointStore
    from tests.checkpoint import _writer_proc as writer
    from tests.checkpoint.crash_check import _matches

    primary = os.path.join(workdir, "retention")
    script = os.path.join(REPO, "bench", "_retention_proc.py")
    rand = random.Random(args.seed)
    totals = {"kills": 0, "torn_selected": 0, "kills_leaving_no_checkpoint": 0, "failed_kills": 0}
    examples: list[str] = []
    started = time.perf_counter()
    for kill in range(1, args.kills + 1):
        proc = subprocess.Popen([sys.executable, script, primary], stdout=subprocess.PIPE, text=True)
        passes = rand.randint(1, 4)
        for line in proc.stdout:
            passes -= line.strip() == "R"
            if passes == 0:
                break
        time.sleep(rand.uniform(0.0, 0.005))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        totals["kills"] += 1
        store = CheckpointStore(primary, chunk_bytes=writer.CHUNK_BYTES)
        problems = [] if store.steps() else ["no checkpoint left"]
        totals["kills_leaving_no_checkpoint"] += not store.steps()
        report = store.verify(deep=True)  # leftovers of a killed gc are not damage: `ckpt gc` removes them
        problems += [] if report.ok else [f"verify: {line}" for line in report.lines()]
        for step in store.steps():
            if not _matches(store.load(step), step):
                totals["torn_selected"] += 1
                problems.append(f"step {step} holds other data")
        totals["failed_kills"] += bool(problems)
        examples.extend(f"kill {kill}: {p}" for p in problems[: max(0, 20 - len(examples))])
        if kill % 50 == 0 or kill == args.kills:
            print(f"{kill}/{args.kills} kills, {totals['failed_kills']} failed, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    return {**totals, "failure_examples": examples, "wall_s": round(time.perf_counter() - started, 1)}


def training_campaign(args: argparse.Namespace, workdir: str) -> dict:
    from pathlib import Path

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import _crash_training

    run = _crash_training.vae_campaign if args.mode == "vae" else _crash_training.rollback_campaign
    result = run(args.kills, Path(workdir), random.Random(args.seed))
    result["failed_kills"] = len(result["failure_examples"])
    return result


def main() -> int:
    args = parse_args()
    run = {"store": campaign, "retention": retention_campaign}.get(args.mode, training_campaign)
    with tempfile.TemporaryDirectory(prefix="ckpt-crash-") as tmp:
        result = run(args, args.workdir or tmp)
    result.update(
        mode=args.mode,
        seed=args.seed,
        max_delay_s=args.max_delay,
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        python=sys.version.split()[0],
        platform=platform.platform(),
        cpus=os.cpu_count(),
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"crash_campaign-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{args.mode}: kills: {result['kills']}  torn checkpoints selected: {result['torn_selected']}  "
          f"abandoned selected: {result.get('abandoned_selected', 0)}  failures: {result['failed_kills']}")
    print(f"results: {path}")
    return 0 if result["failed_kills"] == 0 and result["torn_selected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
