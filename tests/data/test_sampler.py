"""The sampler: a pure function of (seed, epoch, world size, rank), resumable at any position."""

import numpy as np
import pytest

from stablediff.data.sampler import ResumableSampler


def draw(sampler, batches, batch_size):
    return [sampler.next_batch(batch_size).tolist() for _ in range(batches)]


def test_same_seed_same_order_different_seed_different_order():
    a = draw(ResumableSampler(50, seed=1), 5, 8)
    b = draw(ResumableSampler(50, seed=1), 5, 8)
    c = draw(ResumableSampler(50, seed=2), 5, 8)
    assert a == b and a != c


def test_an_epoch_visits_every_sample_once():
    sampler = ResumableSampler(40, seed=3)
    seen = np.concatenate([sampler.next_batch(8) for _ in range(5)])
    assert sorted(seen.tolist()) == list(range(40))
    assert sampler.epoch == 0 and sampler.position == 40


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("stop_at", [0, 3, 7, 11])
def test_resume_at_any_batch_continues_the_same_sequence(world_size, stop_at):
    def run(resume_at):
        out = []
        for rank in range(world_size):
            sampler = ResumableSampler(37, seed=5, world_size=world_size, rank=rank)
            seq = draw(sampler, resume_at, 4)
            if resume_at:
                state = sampler.state_dict()
                sampler = ResumableSampler(37, seed=5, world_size=world_size, rank=rank)
                sampler.load_state_dict(state)
            seq += draw(sampler, 15 - resume_at, 4)
            out.append(seq)
        return out

    assert run(stop_at) == run(0)


def test_two_ranks_read_disjoint_shards():
    r0 = ResumableSampler(20, seed=0, world_size=2, rank=0).next_batch(10)
    r1 = ResumableSampler(20, seed=0, world_size=2, rank=1).next_batch(10)
    assert not set(r0) & set(r1) and len(set(r0) | set(r1)) == 20


def test_state_from_two_ranks_resumes_on_one():
    ranks = [ResumableSampler(40, seed=9, world_size=2, rank=r) for r in range(2)]
    consumed = set()
    for sampler in ranks:
        consumed |= set(sampler.next_batch(6).tolist())
    single = ResumableSampler(40, seed=9, world_size=1, rank=0)
    single.load_state_dict(ranks[0].state_dict())
    rest = single.next_batch(28).tolist()
    assert set(rest) == set(range(40)) - consumed
    assert single.epoch == 0 and single.position == 40


def test_resuming_with_other_data_is_refused():
    sampler = ResumableSampler(10, seed=0)
    with pytest.raises(ValueError, match="same data and seed"):
        sampler.load_state_dict(ResumableSampler(11, seed=0).state_dict())
