"""The data order: which samples each step reads; deterministic, resumable, distributed-aware.

The order of samples is a pure function of (seed, epoch, world_size, rank): the
same arguments always give the same indices, so a run resumed at position k of
an epoch sees exactly the batches an uninterrupted run would have seen. The
position is counted in *global* samples (all ranks together), which is what
lets a run saved with 2 ranks resume on 1 and the other way round.

`BucketBatchOrder` does the same for aspect-ratio buckets, one bucket per batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stablediff.data.buckets import bucket_batches
from stablediff.errors import ConfigError, DataError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global order of one epoch: a permutation of range(num_samples)."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_samples)


def rank_indices(order: np.ndarray, start: int, world_size: int, rank: int) -> np.ndarray:
    """The indices rank `rank` reads from global position `start` on (strided shard)."""
    return order[start + rank :: world_size]


@dataclass
class BatchOrder:
    """Yields dataset indices for one rank, epoch after epoch, and remembers where it is.

    `position` counts global samples consumed in the current epoch; each rank
    advances it by world_size per sample it reads, so every rank holds the same
    value at a step boundary and any rank's state_dict is the run's.
    """

    num_samples: int
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise DataError("the data order needs at least one sample; the dataset is empty")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")

    def next_batch(self, batch_size: int) -> np.ndarray:
        """The next `batch_size` indices for this rank, crossing epochs as needed."""
        out: list[np.ndarray] = []
        needed = batch_size
        while needed > 0:
            order = epoch_permutation(self.num_samples, self.seed, self.epoch)
            # Drop the ragged tail so every rank reads the same number of samples.
            usable = (self.num_samples // self.world_size) * self.world_size
            if self.position >= usable:
                self.epoch, self.position = self.epoch + 1, 0
                continue
            mine = rank_indices(order[:usable], self.position, self.world_size, self.rank)
            take = mine[:needed]
            out.append(take)
            needed -= len(take)
            self.position += len(take) * self.world_size
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") == "buckets":
            raise ConfigError("cannot resume the data order: the checkpoint was made with data.buckets and this "
                              "run does not bucket its data. Resume with the same data.buckets, or start a "
                              "fresh run directory.")
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ConfigError(
                f"cannot resume the data order: the checkpoint was made with "
                f"{state['num_samples']} samples and seed {state['seed']}, this run has "
                f"{self.num_samples} samples and seed {self.seed}. Use the same data and seed, "
                "or start a fresh run directory."
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        # Re-partitioning for another world size: round down to a whole global step.
        self.position -= self.position % self.world_size


@dataclass
class BucketBatchOrder:
    """Batches of one aspect-ratio bucket each, for one rank, resumable and re-partitionable.

    Each epoch's global list of batches is `buckets.bucket_batches(bucket_ids,
    batch_size, seed, epoch)`: a pure function, so every rank computes the same
    list and takes its share: rank r reads batches position + r, position +
    world_size + r, ... `position` counts global *batches* consumed in the epoch
    (a bucket's last batch may be short, so samples would not say where a batch
    starts). A state saved with one world size resumes with another at the same
    batch: 2 ranks -> 1 rank covers the rest of the epoch exactly once. Per epoch,
    fewer than world_size leftover batches are skipped so that ranks stay in step.
    """

    bucket_ids: Sequence[int]
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    epoch: int = 0
    position: int = 0
    batch_size: int | None = None  # fixed by the first next_batch (or by a restored state)
    _plan: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not len(self.bucket_ids):
            raise DataError("the data order needs at least one sample; the dataset is empty")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.bucket_ids = [int(b) for b in self.bucket_ids]

    @property
    def num_samples(self) -> int:
        return len(self.bucket_ids)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch`, in order (memoised: one epoch at a time)."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, bucket_batches(self.bucket_ids, self.batch_size, self.seed, epoch))
        return self._plan[1]

    def next_batch(self, batch_size: int) -> np.ndarray:
        """This rank's next batch: at most `batch_size` indices, all from one bucket."""
        if self.batch_size is None:
            self.batch_size = batch_size
        elif batch_size != self.batch_size:
            raise ConfigError(f"the bucketed data order was made for batches of {self.batch_size}, not "
                              f"{batch_size}: resume with the same train.batch_size (and gradient accumulation), "
                              "or start a fresh run directory")
        while True:
            batches = self.epoch_batches(self.epoch)
            usable = len(batches) // self.world_size * self.world_size
            if usable == 0:
                raise ConfigError(f"{len(batches)} bucketed batches per epoch cannot feed {self.world_size} ranks; "
                                  "lower train.batch_size or use fewer buckets")
            if self.position < usable:
                break
            self.epoch, self.position = self.epoch + 1, 0
        batch = batches[self.position + self.rank]
        self.position += self.world_size
        return np.asarray(batch, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"kind": "buckets", "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size,
                "buckets_hash": buckets_hash(self.bucket_ids)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "buckets":
            raise ConfigError("cannot resume the data order: the checkpoint was made without data.buckets and "
                              "this run buckets its data. Resume with the same data.buckets, or start a fresh "
                              "run directory.")
        if (state["num_samples"], state["seed"], state["buckets_hash"]) != (
                self.num_samples, self.seed, buckets_hash(self.bucket_ids)):
            raise ConfigError(
                f"cannot resume the data order: the checkpoint was made with {state['num_samples']} samples, "
                f"seed {state['seed']} and other bucket assignments than this run ({self.num_samples} samples, "
                f"seed {self.seed}). Use the same data, seed and data.buckets, or start a fresh run directory.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.batch_size = state["batch_size"]
        self._plan = None
        # Re-partitioning for another world size: round down to a whole global step.
        self.position -= self.position % self.world_size


def buckets_hash(bucket_ids: Sequence[int]) -> str:
    """A short fingerprint of the bucket assignment, so a resume notices that it changed."""
    return hashlib.blake2b(np.asarray(bucket_ids, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


def make_batch_order(num_samples: int, seed: int, world_size: int = 1, rank: int = 0,
                 bucket_ids: Sequence[int] | None = None) -> BatchOrder | BucketBatchOrder:
    """Batches of one bucket when the data is bucketed (`bucket_ids` given), else plain shuffled samples."""
    if bucket_ids is None:
        return BatchOrder(num_samples, seed=seed, world_size=world_size, rank=rank)
    if len(bucket_ids) != num_samples:
        raise ValueError(f"{len(bucket_ids)} bucket ids for {num_samples} samples")
    return BucketBatchOrder(bucket_ids, seed=seed, world_size=world_size, rank=rank)
