"""A divergence rollback on a real tiny UNet and store: lineage, lowered LR, skipped batches, resume."""

from __future__ import annotations

import shutil

import pytest
import torch

from stablediff.checkpoint import CheckpointStore, lineage
from stablediff.config.schema import CheckpointConfig, GuardConfig, RunConfig, TrainConfig
from stablediff.data.order import BatchOrder
from stablediff.models.diffusion import make_noise_scheduler
from stablediff.training import state as train_state
from stablediff.training.checkpointing import RunCheckpointer, find_resume
from stablediff.training.context import RunContext
from stablediff.training.encoded_dataset import EncodedDataset
from stablediff.training.rollback import batches_to_skip, roll_back
from stablediff.training.unet_stage import LoopHooks, make_train_state, train_unet
from tests.tiny_models import tiny_unet

CFG = TrainConfig(warmup_steps=0, max_steps=6, batch_size=4, lr_schedule="constant", learning_rate=1e-3, log_every=1)
GUARD = GuardConfig(min_history=2, max_events=2, within_steps=10)
SAMPLES = 16


def dataset() -> EncodedDataset:
    g = torch.Generator().manual_seed(0)
    return EncodedDataset.single(torch.randn(SAMPLES, 4, 8, 8, generator=g), torch.full((SAMPLES, 4, 8, 8), 0.1),
                                 torch.randn(3, 6, 32, generator=g), [[1], [2]] * (SAMPLES // 2))


class Run:
    """A train state, its store and checkpointer (every third step saved), and the losses per step."""

    def __init__(self, store_dir):
        self.state = make_train_state(tiny_unet(), CFG, SAMPLES, seed=0, guard_cfg=GUARD)
        self.store = CheckpointStore(store_dir)
        self.checkpointer = RunCheckpointer(self.store, [], CheckpointConfig(every_steps=3, keep_last=10), print,
                                            rollback_window=GUARD.within_steps)
        self.data, self.losses = dataset(), {}

    def capture(self):
        return train_state.capture(self.state, None, {}, {})

    def after_step(self, state) -> None:
        self.losses[state.step] = state.last_loss
        self.checkpointer.after_step(state.step, self.capture, {})

    def train_to(self, max_steps: int) -> None:
        cfg = CFG.model_copy(update={"max_steps": max_steps})
        train_unet(self.state, self.data, make_noise_scheduler(), 1.0, RunContext(RunConfig(train=cfg, seed=0)),
                   LoopHooks(after_step=self.after_step))
        self.checkpointer.wait()

    def resume(self, say=lambda _: None):
        loaded = find_resume(self.store, [], say)
        train_state.restore(self.state, loaded.tensors, loaded.meta)
        return loaded

    def diverge_and_roll_back(self, first_bad_step: int):
        """Three NaN losses from `first_bad_step` on make the real guard ask for a rollback."""
        verdicts = [self.state.guard.check(float("nan"), 1.0, step=first_bad_step + i) for i in range(3)]
        assert verdicts[-1].action == "rollback"
        return roll_back(self.state, self.checkpointer, verdicts[-1].first_event, GUARD, rank=0, is_main=True)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A store with checkpoints 0, 3 and 6 of a short healthy run, and that run's losses."""
    run = Run(tmp_path_factory.mktemp("six") / "checkpoints")
    run.checkpointer.save(0, run.capture)
    run.train_to(6)
    run.checkpointer.close()
    return run.store.location, run.losses


def trained(tmp_path, six_steps) -> Run:
    """The six-step run, resumed at step 6 from a copy of its store."""
    shutil.copytree(six_steps[0], tmp_path / "checkpoints")
    run = Run(tmp_path / "checkpoints")
    assert run.resume().step == 6
    return run


def test_the_skip_is_the_configured_count_and_never_less_than_the_steps_back_to_the_target():
    assert batches_to_skip(GuardConfig(within_steps=50), at_step=120, target_step=100) == 50
    assert batches_to_skip(GuardConfig(within_steps=50), at_step=1100, target_step=1000) == 100
    assert batches_to_skip(GuardConfig(skip_batches=300), at_step=120, target_step=100) == 300


def test_a_rollback_goes_back_lowers_the_lr_counts_itself_and_abandons_the_newer_checkpoints(tmp_path, six_steps):
    run = trained(tmp_path, six_steps)
    record = run.diverge_and_roll_back(first_bad_step=3)
    assert (record.target_step, sorted(record.abandoned), record.skipped_batches) == (3, [6], 10)
    assert run.state.step == 3 and run.state.lr_scale == 0.5
    assert run.state.optimizer.param_groups[0]["lr"] == 5e-4
    assert run.state.guard.rollbacks == 1
    assert run.store.load().step == 3
    assert [r.number for r in lineage.read_records(run.store)] == [1]


def test_the_rolled_back_run_draws_other_batches_and_noise_than_the_diverged_one(tmp_path, six_steps):
    run = trained(tmp_path, six_steps)
    run.diverge_and_roll_back(first_bad_step=3)
    run.train_to(4)
    assert run.losses[4] != six_steps[1][4]  # step 4 on the rolled-back trajectory, and before the rollback
    fresh = BatchOrder(SAMPLES, seed=0)
    for _ in range(3 + 10 + 1):  # three steps to the target, ten skipped, then the step just trained
        fresh.next_batch(CFG.batch_size)
    assert run.state.order.state_dict() == fresh.state_dict()
    assert run.state.skipped_batches == 10


def test_resuming_from_the_target_after_a_crash_continues_the_rolled_back_trajectory_exactly(tmp_path, six_steps):
    run = trained(tmp_path, six_steps)
    run.diverge_and_roll_back(first_bad_step=3)  # then the process dies before anything else is saved
    resumed, notes = Run(tmp_path / "checkpoints"), []
    assert resumed.resume(notes.append).step == 3
    assert any("continuing after the divergence rollback" in n for n in notes)
    assert resumed.capture()[1] == run.capture()[1]  # LR, guard with its count, data order, skipped batches
    run.train_to(4)
    resumed.train_to(4)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state.unet.parameters(), run.state.unet.parameters()))


def test_a_checkpoint_saved_after_the_rollback_resumes_without_applying_it_twice(tmp_path, six_steps):
    run = trained(tmp_path, six_steps)
    run.diverge_and_roll_back(first_bad_step=3)
    run.train_to(4)
    run.checkpointer.save(4, run.capture)
    run.checkpointer.wait()
    resumed = Run(tmp_path / "checkpoints")
    loaded = resumed.resume()
    assert loaded.step == 4 and train_state.CONTINUE_ROLLBACK not in loaded.meta
    assert resumed.state.lr_scale == 0.5 and resumed.state.skipped_batches == 10
    assert resumed.state.guard.rollbacks == 1


def test_a_rollback_whose_event_a_kill_cut_off_is_known_missing_from_the_metrics_log(tmp_path):
    from stablediff.training.metrics import MetricsLog
    from stablediff.training.rollback import logged_rollbacks, rollback_event

    log = MetricsLog(tmp_path / "metrics.jsonl")
    first, second = (lineage.RollbackRecord(n, 3, 3, 6, {6: ["ab"]}, 0.5 ** n, 10, {"rollbacks": n}) for n in (1, 2))
    log.write(**rollback_event(first))
    log.write(stage="unet", step=4, loss=1.0)
    assert logged_rollbacks(log.path) == {1}  # the resume that continues rollback 2 writes its event
    log.write(**rollback_event(second))
    assert logged_rollbacks(log.path) == {1, 2}
    assert rollback_event(second)["reason"].startswith("divergence: repeated bad steps since step 3; rolled back")
