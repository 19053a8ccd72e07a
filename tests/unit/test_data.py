import pytest
import torch

from common.errors import UserError
from common.schema import SyntheticConfig
from tests.workers import DEFAULT_CONFIG
from train.config import load_config
from train.data import load_datasets, make_synthetic
from train.data.batches import EvalSampler, eval_batches, train_batches
from train.data.tensors import channel_stats


def test_synthetic_data_is_deterministic_from_the_seed():
    cfg = SyntheticConfig(train_samples=300, test_samples=101)
    a_train, a_test = make_synthetic(cfg, seed=1)
    b_train, _ = make_synthetic(cfg, seed=1)
    c_train, _ = make_synthetic(cfg, seed=2)
    assert torch.equal(a_train.images, b_train.images)
    assert torch.equal(a_train.labels, b_train.labels)
    assert not torch.equal(a_train.images, c_train.images)
    assert a_train.images.shape == (300, 1, 28, 28) and a_train.images.dtype == torch.uint8
    assert a_test.images.shape == (101, 1, 28, 28)
    assert set(a_train.labels.tolist()) == set(range(10))


def test_synthetic_data_comes_in_cifar_shape():
    train, _ = make_synthetic(SyntheticConfig(train_samples=50, test_samples=5, channels=3,
                                              image_size=32), seed=0)
    assert train.images.shape == (50, 3, 32, 32)


def test_synthetic_classes_differ_but_samples_vary_within_a_class():
    train, _ = make_synthetic(SyntheticConfig(train_samples=2000, test_samples=10), seed=0)
    x = train.images.float()
    class_means = torch.stack([x[train.labels == k].mean(0) for k in range(10)])
    between = (class_means[:, None] - class_means[None]).pow(2).mean().sqrt()
    within = torch.stack([(x[train.labels == k] - class_means[k]).pow(2).mean().sqrt()
                          for k in range(10)]).mean()
    assert between > 10  # class structure: a learnable signal...
    assert within > between  # ...buried in per-sample variation and noise


def test_normalized_batches_have_zero_mean_and_unit_std():
    cfg = load_config(DEFAULT_CONFIG, ["data.synthetic.train_samples=2048"])
    train, test = load_datasets(cfg.data, cfg.seed, download=False)
    assert torch.equal(test.mean, train.mean)  # the test set uses the train set's statistics
    batches = train_batches(train, 0, 1, 2048, seed=0, device=torch.device("cpu"))
    images, labels = next(iter(batches))
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert abs(images.mean().item()) < 1e-3 and abs(images.std().item() - 1) < 1e-3


def test_channel_stats_match_a_direct_computation():
    images = torch.randint(0, 256, (37, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=8)
    x = images.double()
    torch.testing.assert_close(mean.flatten().double(), x.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(std.flatten().double(), x.std(dim=(0, 2, 3), unbiased=False),
                               rtol=1e-5, atol=1e-4)


def _shards(n: int, world: int, global_batch: int, epoch: int) -> list[list[int]]:
    data, _ = make_synthetic(SyntheticConfig(train_samples=n, test_samples=1), seed=0)
    data.labels = torch.arange(n)  # labels carry the sample index, so batches reveal it
    out = []
    for rank in range(world):
        batches = train_batches(data, rank, world, global_batch, seed=3, device=torch.device("cpu"))
        batches.set_epoch(epoch)
        out.append([i for _, labels in batches for i in labels.tolist()])
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_train_shards_are_disjoint_cover_the_data_and_reshuffle(world):
    n, global_batch = 1000, 60
    shards = _shards(n, world, global_batch, epoch=0)
    seen = [i for shard in shards for i in shard]
    assert len(seen) == len(set(seen))  # disjoint
    steps = n // global_batch
    assert len(seen) == steps * global_batch  # every full global batch, the remainder dropped
    assert all(len(s) == steps * global_batch // world for s in shards)  # equal step counts
    assert shards != _shards(n, world, global_batch, epoch=1)  # set_epoch changes the order
    assert shards == _shards(n, world, global_batch, epoch=0)


def test_global_batches_match_a_single_process():
    """Step k of W workers trains on exactly the samples of step k of one process."""
    n, global_batch = 500, 48
    single = _shards(n, 1, global_batch, epoch=2)[0]
    for world in (2, 3):
        shards = _shards(n, world, global_batch, epoch=2)
        local = global_batch // world
        for step in range(n // global_batch):
            together = sorted(i for s in shards for i in s[step * local:(step + 1) * local])
            assert together == sorted(single[step * global_batch:(step + 1) * global_batch])


@pytest.mark.parametrize("n, world", [(501, 2), (501, 3), (10, 4), (3, 4)])
def test_eval_shards_count_every_sample_exactly_once(n, world):
    seen = [i for rank in range(world) for i in EvalSampler(n, rank, world)]
    assert sorted(seen) == list(range(n))


def test_a_training_set_smaller_than_one_global_batch_is_refused_on_every_rank():
    data, _ = make_synthetic(SyntheticConfig(train_samples=200, test_samples=1), seed=0)
    for rank in (0, 1):
        with pytest.raises(UserError) as err:
            train_batches(data, rank, 2, 256, seed=0, device=torch.device("cpu"))
        assert str(err.value) == ("the training set (200 samples) is smaller than one global "
                                  "batch (256); lower train.batch_size")
        assert err.value.agreed  # every rank finds it: one of them says it
    assert len(train_batches(data, 0, 2, 200, seed=0, device=torch.device("cpu"))) == 1


def test_eval_batches_keep_the_last_partial_batch():
    data, _ = make_synthetic(SyntheticConfig(train_samples=101, test_samples=1), seed=0)
    batches = eval_batches(data, 1, 2, batch_size=20, device=torch.device("cpu"))
    assert [len(labels) for _, labels in batches] == [20, 20, 10]


@pytest.mark.parametrize("channels_last", [False, True])
def test_copying_ahead_gives_the_same_batches_in_the_same_order(channels_last):
    """The path a dataset in host memory takes to a GPU (pinned staging buffers, the next
    batch's copy in flight), run on the CPU: batch for batch what the in-memory path gives,
    the last partial batch, a resume inside the epoch and a reshuffled epoch included."""
    cfg = load_config(DEFAULT_CONFIG, ["data.synthetic.train_samples=700",
                                       "data.synthetic.test_samples=53"])
    train, test = load_datasets(cfg.data, cfg.seed, download=False)
    cpu = torch.device("cpu")
    for make in (lambda ahead: train_batches(train, 1, 2, 64, 0, cpu, channels_last,
                                             copy_ahead=ahead),
                 lambda ahead: eval_batches(test, 0, 2, 10, cpu, channels_last=channels_last,
                                            copy_ahead=ahead)):
        plain, ahead = make(False), make(True)
        assert plain.copy_ahead is None and ahead.copy_ahead is not None
        for epoch, start in ((0, 0), (0, 1), (1, 0)):
            plain.set_epoch(epoch)
            ahead.set_epoch(epoch)
            expected, got = list(plain.iterate(start)), list(ahead.iterate(start))
            assert len(got) == len(expected) == len(plain) - start > 1
            for (x, y), (gx, gy) in zip(expected, got, strict=True):
                assert torch.equal(gx, x) and torch.equal(gy, y)
                assert gx.is_contiguous(memory_format=plain.memory_format)
        # Batches handed out earlier are not overwritten when the staging buffers are reused.
        kept = list(ahead.iterate())
        assert all(torch.equal(a[1], b[1]) for a, b in zip(kept, list(plain.iterate()),
                                                           strict=True))
