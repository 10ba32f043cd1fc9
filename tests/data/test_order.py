"""The data orders: pure functions of (seed, epoch, world size, rank), resumable at any position.

`BucketBatchOrder` adds: every batch holds one aspect-ratio bucket.
"""

import numpy as np
import pytest

from stablediff.data.order import BatchOrder, BucketBatchOrder, make_batch_order


def draw(order, batches, batch_size):
    return [order.next_batch(batch_size).tolist() for _ in range(batches)]


def sequences_resumed_at(make, world_size: int, resume_at: int, total: int) -> list:
    """Each rank's `total` batches of 4, its order saved and restored into a fresh one after `resume_at`."""
    out = []
    for rank in range(world_size):
        order = make(world_size, rank)
        seq = draw(order, resume_at, 4)
        if resume_at:
            state = order.state_dict()
            order = make(world_size, rank)
            order.load_state_dict(state)
        out.append(seq + draw(order, total - resume_at, 4))
    return out


def test_same_seed_same_order_different_seed_different_order():
    a = draw(BatchOrder(50, seed=1), 5, 8)
    b = draw(BatchOrder(50, seed=1), 5, 8)
    c = draw(BatchOrder(50, seed=2), 5, 8)
    assert a == b and a != c


def test_an_epoch_visits_every_sample_once():
    order = BatchOrder(40, seed=3)
    seen = np.concatenate([order.next_batch(8) for _ in range(5)])
    assert sorted(seen.tolist()) == list(range(40))
    assert order.epoch == 0 and order.position == 40


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("stop_at", [0, 3, 7, 11])
def test_resume_at_any_batch_continues_the_same_sequence(world_size, stop_at):
    def make(world_size, rank):
        return BatchOrder(37, seed=5, world_size=world_size, rank=rank)

    assert sequences_resumed_at(make, world_size, stop_at, 15) == sequences_resumed_at(make, world_size, 0, 15)


def test_two_ranks_read_disjoint_shards():
    r0 = BatchOrder(20, seed=0, world_size=2, rank=0).next_batch(10)
    r1 = BatchOrder(20, seed=0, world_size=2, rank=1).next_batch(10)
    assert not set(r0) & set(r1) and len(set(r0) | set(r1)) == 20


def test_state_from_two_ranks_resumes_on_one():
    ranks = [BatchOrder(40, seed=9, world_size=2, rank=r) for r in range(2)]
    consumed = set()
    for order in ranks:
        consumed |= set(order.next_batch(6).tolist())
    single = BatchOrder(40, seed=9, world_size=1, rank=0)
    single.load_state_dict(ranks[0].state_dict())
    rest = single.next_batch(28).tolist()
    assert set(rest) == set(range(40)) - consumed
    assert single.epoch == 0 and single.position == 40


def test_resuming_with_other_data_is_refused():
    order = BatchOrder(10, seed=0)
    with pytest.raises(ValueError, match="same data and seed"):
        order.load_state_dict(BatchOrder(11, seed=0).state_dict())


# 45 samples in three buckets of uneven sizes: each bucket ends in a short batch.
BUCKET_IDS = [0] * 20 + [1] * 14 + [2] * 11


def bucketed(world_size=1, rank=0, seed=4):
    return BucketBatchOrder(BUCKET_IDS, seed=seed, world_size=world_size, rank=rank)


def test_every_bucketed_batch_holds_one_bucket():
    batches = draw(bucketed(), 40, 4)
    assert all(len({BUCKET_IDS[i] for i in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= 4 for batch in batches)


def test_a_bucketed_epoch_visits_every_sample_once():
    order = bucketed()
    seen = []
    while order.epoch == 0:
        seen += order.next_batch(4).tolist()
    assert sorted(seen[: len(BUCKET_IDS)]) == list(range(len(BUCKET_IDS)))


def test_bucketed_order_depends_on_seed_and_epoch():
    assert draw(bucketed(seed=1), 14, 4) == draw(bucketed(seed=1), 14, 4)
    assert draw(bucketed(seed=1), 14, 4) != draw(bucketed(seed=2), 14, 4)
    first, second = draw(bucketed(seed=1), 12, 4), draw(bucketed(seed=1), 24, 4)[12:]  # 5 + 4 + 3 batches an epoch
    assert sorted(map(sorted, first)) != sorted(map(sorted, second))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("stop_at", [1, 4, 9])
def test_bucketed_resume_mid_epoch_continues_the_same_sequence(world_size, stop_at):
    assert sequences_resumed_at(bucketed, world_size, stop_at, 20) == sequences_resumed_at(bucketed, world_size, 0, 20)


def test_bucketed_ranks_read_different_batches():
    r0, r1 = draw(bucketed(2, 0), 6, 4), draw(bucketed(2, 1), 6, 4)
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}


def test_bucketed_state_from_two_ranks_resumes_on_one_covering_each_sample_once():
    ranks = [bucketed(2, rank) for rank in range(2)]
    consumed = [i for order in ranks for batch in draw(order, 3, 4) for i in batch]  # 3 global steps
    single = bucketed(1, 0)
    single.load_state_dict(ranks[1].state_dict())
    rest = []
    while single.epoch == 0:
        rest += single.next_batch(4).tolist()
    rest = rest[: len(BUCKET_IDS) - len(consumed)]  # the last draw started epoch 1
    assert sorted(consumed + rest) == list(range(len(BUCKET_IDS)))


def test_bucketed_resume_refuses_another_batch_size_or_bucketing():
    order = bucketed()
    order.next_batch(4)
    state = order.state_dict()
    resumed = bucketed()
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="train.batch_size"):
        resumed.next_batch(8)
    other = BucketBatchOrder([0] * 45, seed=4)
    with pytest.raises(ValueError, match="data.buckets"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="data.buckets"):
        BatchOrder(45, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="data.buckets"):
        bucketed().load_state_dict(BatchOrder(45, seed=4).state_dict())


def test_make_batch_order_buckets_only_when_given_bucket_ids():
    assert isinstance(make_batch_order(45, 0), BatchOrder)
    assert isinstance(make_batch_order(45, 0, bucket_ids=BUCKET_IDS), BucketBatchOrder)
