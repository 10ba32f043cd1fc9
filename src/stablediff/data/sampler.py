"""A deterministic, resumable, distributed-aware sampler.

The order of samples is a pure function of (seed, epoch, world_size, rank): the
same arguments always give the same indices, so a run resumed at position k of
an epoch sees exactly the batches an uninterrupted run would have seen. The
position is counted in *global* samples (all ranks together), which is what
lets a run saved with 2 ranks resume on 1 and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global order of one epoch: a permutation of range(num_samples)."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_samples)


def rank_indices(order: np.ndarray, start: int, world_size: int, rank: int) -> np.ndarray:
    """The indices rank `rank` reads from global position `start` on (strided shard)."""
    return order[start + rank :: world_size]


@dataclass
class ResumableSampler:
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
            raise ValueError("the sampler needs at least one sample; the dataset is empty")
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
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"cannot resume the data order: the checkpoint was made with "
                f"{state['num_samples']} samples and seed {state['seed']}, this run has "
                f"{self.num_samples} samples and seed {self.seed}. Use the same data and seed, "
                "or start a fresh run directory."
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        # Re-partitioning for another world size: round down to a whole global step.
        self.position -= self.position % self.world_size
