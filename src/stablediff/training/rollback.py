"""A divergence rollback for a real run, and its continuation after a crash.

The guard (guard.py) only decides that a rollback is due; `roll_back` does it:
  1. load the target: the newest live checkpoint before the first bad step;
  2. decide what the rolled-back trajectory runs with: the LR lowered by
     `guard.lr_factor`, the guard's state with its rollback count, and the batches
     to skip (PaLM, Chowdhery et al. 2022, sec. 5.1: restart before the spike and
     skip the batches seen before and during it);
  3. commit that decision as the store's rollback record, which abandons every
     newer checkpoint (checkpoint/lineage.py), before anything else is saved;
  4. put the target and the decision into the train state with `continue_rollback`,
     the same function a resume from the target uses when it finds the record,
     so a run killed right after a rollback continues exactly as if it had not been.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stablediff.checkpoint import lineage
from stablediff.checkpoint.lineage import RollbackRecord
from stablediff.config.schema import GuardConfig
from stablediff.training import state as train_state


def batches_to_skip(guard_cfg: GuardConfig, at_step: int, target_step: int) -> int:
    """`guard.skip_batches` (default `guard.within_steps`), and never fewer than the steps between
    the target and the rollback, so no batch or noise draw of the diverged stretch is replayed."""
    wanted = guard_cfg.within_steps if guard_cfg.skip_batches is None else guard_cfg.skip_batches
    return max(wanted, at_step - target_step)


def roll_back(state, checkpointer, first_bad_step: int, guard_cfg: GuardConfig, rank: int,
              is_main: bool) -> RollbackRecord:
    """Steps 1-4 above; every rank calls it, rank 0 (`is_main`) writes the record."""
    target = checkpointer.load_before(first_bad_step)
    abandoned = lineage.manifests_after(checkpointer.stores(), target.step) if is_main else {}
    record = RollbackRecord(number=state.guard.rollbacks, target_step=target.step, first_bad_step=first_bad_step,
                            at_step=state.step, abandoned=abandoned, lr_scale=state.lr_scale * guard_cfg.lr_factor,
                            skipped_batches=batches_to_skip(guard_cfg, state.step, target.step),
                            guard=state.guard.state_dict(), time=round(time.time(), 3))
    if is_main:
        checkpointer.commit_rollback(record)
    train_state.restore(state, target.tensors, target.meta, rank=rank)
    continue_rollback(state, record)
    return record


def continue_rollback(state, record: RollbackRecord) -> None:
    """On a train state restored from the rollback's target (or an older checkpoint): the lowered LR,
    the guard with its rollback count, and the skipped batches (data order and random draws)."""
    state.scale_lr(record.lr_scale / state.lr_scale)
    if state.guard is not None:
        state.guard.load_state_dict(record.guard)
    state.skipped_batches += record.skipped_batches
    state.pending_skip = record.skipped_batches


def rollback_event(record: RollbackRecord) -> dict:
    """The `metrics.jsonl` event of a rollback (its `step` is the target)."""
    return {"event": "rollback", "step": record.target_step, "lr_scale": record.lr_scale,
            "rollbacks": record.number, "first_bad_step": record.first_bad_step, "at_step": record.at_step,
            "skipped_batches": record.skipped_batches, "abandoned": list(record.abandoned), "reason": message(record)}


def logged_rollbacks(metrics_path: Path) -> set[int]:
    """Numbers of the rollbacks whose event `metrics.jsonl` holds: a kill between a rollback's commit and
    its event leaves one out, and the resume that continues the rollback writes it then."""
    if not metrics_path.is_file():
        return set()
    events = (json.loads(line) for line in metrics_path.read_text().splitlines() if '"rollback"' in line)
    return {int(e.get("rollbacks", 0)) for e in events if e.get("event") == "rollback"}


def message(record: RollbackRecord) -> str:
    return f"divergence: repeated bad steps since step {record.first_bad_step}; {describe(record)}"


def describe(record: RollbackRecord) -> str:
    abandoned = ", ".join(map(str, record.abandoned)) or "none"
    return (f"rolled back to step {record.target_step} and lowered the LR to x{record.lr_scale:g} "
            f"(rollback {record.number}); skipping {record.skipped_batches} batches; "
            f"abandoned checkpoints: {abandoned}")
