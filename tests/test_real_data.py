"""Real data in one process: image folders, Python datasets, the recipes, the stream path and
the decoded cache (the multi-process runs are in test_real_data_runs.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.errors import UserError
from tests.workers import DEFAULT_CONFIG
from tools.make_images import write_image_folder
from train.config import load_config
from train.data import ensure_available, open_datasets
from train.data.augment import Augment, rrc_box, rrc_boxes
from train.data.build import build_data
from train.data.cache import DecodedFile
from train.data.decode import pil_to_tensor, render_file, render_pil
from train.data.keys import batch_keys, batch_uniforms, sample_key, uniforms
from train.dist import DistContext

CPU = DistContext(0, 0, 1, 1, torch.device("cpu"), "none", 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """40 train / 12 val JPEGs in 4 classes, 64 to 96 pixels a side."""
    return write_image_folder(tmp_path_factory.mktemp("images"), 40, 12, classes=4,
                              min_size=64, max_size=96)


def data_cfg(*overrides: str):
    return load_config(DEFAULT_CONFIG, list(overrides)).data


def folder_cfg(folder: Path, tmp_path: Path, *overrides: str):
    return data_cfg("data.name=imagefolder", f"data.root={folder}", "data.image_size=32",
                    f"data.cache_dir={tmp_path / 'cache'}", *overrides)


def batches(parts, split: str = "train", epoch: int = 1, start: int = 0) -> list[tuple]:
    data = getattr(parts, split)
    if split == "train":
        data.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in data.iterate(start)]


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


# --- keys and recipes --------------------------------------------------------------------------


def test_sample_keys_are_the_same_in_python_and_in_tensor_ops():
    indices = torch.tensor([0, 1, 7, 123_456_789, 2**40])
    for seed, epoch in [(0, 0), (7, 3), (-5, 100)]:
        keys = batch_keys(seed, epoch, indices)
        drawn = batch_uniforms(keys, 5)
        for row, index in enumerate(indices.tolist()):
            key = sample_key(seed, epoch, index)
            assert (key - 2**64 if key >= 2**63 else key) == keys[row].item()
            assert uniforms(key, 5) == drawn[row].tolist()
    assert len({sample_key(0, e, i) for e in range(3) for i in range(100)}) == 300
    assert 0.45 < batch_uniforms(batch_keys(0, 0, torch.arange(4000)), 1).mean() < 0.55


@pytest.mark.parametrize("width, height", [(73, 73), (160, 90), (64, 150)])
def test_random_resized_crop_boxes_are_the_same_per_sample_and_batched(width, height):
    u = batch_uniforms(batch_keys(3, 1, torch.arange(500)), 41)
    batched = rrc_boxes(width, height, u, [0.08, 1.0], [3 / 4, 4 / 3])
    areas = []
    for i in range(500):
        top, left, h, w = rrc_box(width, height, u[i].tolist(), [0.08, 1.0], [3 / 4, 4 / 3])
        assert (top, left, h, w) == tuple(int(t[i]) for t in batched)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        areas.append(h * w / (width * height))
    assert min(areas) < 0.2 and max(areas) > 0.5  # the scale range is used (a 16:9 image
    # holds no 4:3 box above 75% of its area)
    # no attempt fits a ratio of 3..4 in a square: torchvision's fallback, a centered box
    assert rrc_box(10, 10, u[0].tolist(), [0.99, 1.0], [3.0, 4.0]) == (3, 0, 3, 10)


def test_cifar_shift_is_the_same_per_sample_and_batched():
    augment = Augment(data_cfg("data.augment=cifar"), 8, seed=5)
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros of their own
    indices = torch.arange(100, 164)
    batched = augment.device_train(images.float(), indices, epoch=2)
    for i in range(64):
        one = augment.sample_shift(images[i], epoch=2, index=100 + i)
        assert torch.equal(one.float(), batched[i])
    shifted = (batched == 0).flatten(1).any(1)  # zero padding shows where a shift moved in
    assert 0 < shifted.sum() < 64
    assert not torch.equal(batched, augment.device_train(images.float(), indices, epoch=3))


def test_imagenet_eval_view_is_the_center_at_0_875():
    augment = Augment(data_cfg("data.augment=imagenet"), 224, seed=0)
    view = augment.eval_view(512, 256)  # shorter side to 256, the center 224
    assert view.width == view.height == pytest.approx(224)
    assert (view.left, view.top) == pytest.approx(((512 - 224) / 2, 16))
    assert augment.stored_size == 256


def test_draft_decoding_keeps_the_views_resolution(tmp_path):
    image = Image.effect_mandelbrot((480, 360), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    image.save(tmp_path / "big.jpg", quality=95)
    augment = Augment(data_cfg("data.augment=imagenet"), 48, seed=0)
    with Image.open(tmp_path / "big.jpg") as opened:
        drafted = render_file(opened, augment.eval_view)
    with Image.open(tmp_path / "big.jpg") as opened:
        full = render_pil(opened.convert("RGB"), augment.eval_view(480, 360))
    assert drafted.shape == full.shape == (3, 48, 48)
    assert (drafted.float() - full.float()).abs().mean() < 4  # of 255: the same picture


# --- sources and their checks -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_pil_images_become_the_tensors_torchvision_makes(mode):
    """Our pil_to_tensor (no torchvision import in every process) against torchvision's."""
    import torchvision.transforms.v2.functional as TF

    pixels = torch.randint(0, 256, (5, 7, 3), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels).convert(mode)
    ours, theirs = pil_to_tensor(image), TF.pil_to_tensor(image)
    assert ours.dtype == theirs.dtype == torch.uint8 and torch.equal(ours, theirs)


def test_an_image_folder_gives_classes_from_its_folders(folder, tmp_path):
    cfg = folder_cfg(folder, tmp_path)
    train, val = open_datasets(cfg, 0)
    assert train.classes == val.classes == [f"class_{i:02d}" for i in range(4)]
    assert (len(train), len(val)) == (40, 12)
    assert "40 train / 12 val images in 4 classes" in ensure_available(cfg)
    image, label = train.load(0, lambda w, h: Augment(cfg, 32, 0).eval_view(w, h))
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 0


def _layout(tmp_path: Path, case: str) -> Path:
    root = tmp_path / "root"
    if case == "missing":
        return root
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "cat" / "a.png")
    if case == "no classes":
        for p in (root / "val").rglob("*"):
            p.unlink() if p.is_file() else None
        (root / "val" / "cat").rmdir()
    elif case == "empty class":
        (root / "train" / "dog").mkdir()
    elif case == "different classes":
        (root / "val" / "dog").mkdir()
        Image.new("RGB", (8, 8)).save(root / "val" / "dog" / "b.png")
    return root


@pytest.mark.parametrize("case, message", [
    ("missing", "data.root {root} is not a folder"),
    ("no classes", "image folder {root}/val has no class folders"),
    ("empty class", "class folder {root}/train/dog holds no images"),
    ("different classes", "hold different classes (only in train: none; only in val: dog)"),
    ("one class", "image folder {root}/train has one class folder (cat): a classifier of one "
                  "class is always right"),  # _layout's base: train/cat and val/cat
])
def test_a_bad_image_folder_is_one_line(tmp_path, case, message):
    root = _layout(tmp_path, case)
    with pytest.raises(UserError) as info:
        ensure_available(data_cfg("data.name=imagefolder", f"data.root={root}"))
    assert message.format(root=root) in str(info.value) and "\n" not in str(info.value)


FACTORIES = '''
import torch
from torch.utils.data import Dataset

class Pairs(Dataset):
    classes = ["a", "b", "c"]
    def __init__(self, n, bad=None):
        self.n, self.bad = n, bad
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        image = torch.full((3, 20, 24), (i * 37 + 5) % 256, dtype=torch.uint8)
        if self.bad == "triple":
            return image, i % 3, "extra"
        if self.bad == "label":
            return image, "cat"
        if self.bad == "float":
            return image.float(), i % 3
        if self.bad == "nan" or (self.bad == "nan5" and i == 5):
            image = image.float() / 255
            image[1, 2, 3] = float("nan")
            return image, i % 3
        return image, i % 3

def good():
    return Pairs(30), Pairs(7)

def raises():
    raise RuntimeError("no data here")

def unpicklable():
    train = Pairs(30)
    train.transform = lambda image: image  # fine in one process; no loader process gets it
    return train, Pairs(7)

def one():
    return Pairs(3)

def triple():
    return Pairs(4, "triple"), Pairs(2)

def label():
    return Pairs(4, "label"), Pairs(2)

def floats():
    return Pairs(4, "float"), Pairs(2)

def nans():
    return Pairs(4, "nan"), Pairs(2)

def nan_later():
    return Pairs(30, "nan5"), Pairs(7)

class OneClass(Pairs):
    classes = ["only"]
    def __getitem__(self, i):
        return super().__getitem__(i)[0], 0

def single():
    return OneClass(4), OneClass(2)

not_callable = 3
'''


@pytest.fixture()
def factories(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_factories"


@pytest.mark.parametrize("spec, message", [
    ("nowhere.data:build", "cannot import nowhere.data (ModuleNotFoundError"),
    ("my_factories:missing", "my_factories has no missing"),
    ("my_factories:not_callable", "is not callable (a int)"),
    ("my_factories:raises", "failed (RuntimeError: no data here)"),
    ("my_factories:one", "must return (train, test): two map-style Datasets"),
    ("my_factories:triple", "train sample 0 is a tuple of 3"),
    ("my_factories:label", "train sample 0: the label must be an integer class index"),
    ("my_factories:floats", "float images must be in [0, 1]"),
    ("my_factories:nans", "train sample 0: float images must be finite; this one holds 1 NaN"),
    ("my_factories:single", "data.factory my_factories:single: the train set has one class"),
    ("my_factories", "needs data.factory=module:callable"),
])
def test_a_bad_data_factory_is_one_line(factories, spec, message):
    with pytest.raises(UserError) as info:
        ensure_available(data_cfg("data.name=python", f"data.factory={spec}"))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_nan_past_the_first_sample_is_one_line_before_training(factories, tmp_path, loader):
    """Every float image is checked as it is read: the memory path reads them all at the
    start, the stream path's normalization statistics read this one (30 < stats_samples)."""
    cfg = data_cfg("data.name=python", "data.factory=my_factories:nan_later",
                   "data.image_size=16", f"data.cache_dir={tmp_path}", "data.num_workers=0",
                   f"data.loader={loader}")
    with pytest.raises(UserError) as info:
        build_data(cfg, 0, CPU, 10, 4, False)
    assert "train sample 5: float images must be finite" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.compat
def test_a_python_dataset_streams_and_holds_in_memory_alike(factories, tmp_path):
    cfg = ["data.name=python", "data.factory=my_factories:good", "data.image_size=16",
           f"data.cache_dir={tmp_path}", "data.num_workers=0"]
    stream = build_data(data_cfg(*cfg, "data.loader=stream"), 0, CPU, 10, 4, False)
    memory = build_data(data_cfg(*cfg, "data.loader=memory"), 0, CPU, 10, 4, False)
    assert stream.facts.classes == memory.facts.classes == ["a", "b", "c"]
    assert (stream.facts.train_samples, stream.facts.image_size) == (30, 16)
    assert "auto" not in stream.facts.note and stream.facts.loader == "stream"
    assert len(stream.train) == 3 and [len(y) for _, y in stream.test.iterate()] == [4, 3]
    # uniform images: the center square at 16 pixels holds each sample's value everywhere
    for parts in (stream, memory):
        x, y = next(parts.train.iterate())
        assert x.shape == (10, 3, 16, 16) and (x.amax((1, 2, 3)) == x.amin((1, 2, 3))).all()


# --- the stream path and the decoded cache ------------------------------------------------------


def test_decoded_file_trusts_slots_filled_before_the_epoch_and_on_disk(tmp_path):
    path = tmp_path / "f.u8"
    file = DecodedFile(path, 5, (1, 2, 2))
    image = torch.full((1, 2, 2), 7, dtype=torch.uint8)
    file.write(0, image, 3, epoch=-1)  # before training
    file.write(1, image, 4, epoch=0)
    file.write(2, None, -1, epoch=0)  # a bad file
    assert [file.state(i, 0) for i in range(3)] == [1, 0, 0]  # epoch 0's own fills: not yet
    assert [file.state(i, 1) for i in range(3)] == [1, 1, -1]
    assert file.untrusted(torch.arange(5), 1) == 2
    read, label = file.read(1)
    assert torch.equal(read, image) and label == 4
    file.make_durable(0)  # epoch 0 starts: what came before it is on disk
    again = DecodedFile(path, 5, (1, 2, 2))  # a restart: epoch 0's fills never reached the disk
    assert [again.state(i, 5) for i in range(3)] == [1, 0, 0]
    file.write(1, image, 4, epoch=0)
    file.make_durable(1)
    assert DecodedFile(path, 5, (1, 2, 2)).state(1, 5) == 1
    assert DecodedFile(path, 6, (1, 2, 2)).state(0, 5) == 0  # another shape: a new file


@pytest.mark.compat
@pytest.mark.parametrize("recipe,decoder", [("imagenet", "pil"), ("imagenet", "simplejpeg"),
                                            ("cifar", "auto")])
def test_stream_batches_depend_on_neither_loader_processes_nor_the_resume_point(
        folder, tmp_path, recipe, decoder):
    if decoder == "simplejpeg":
        pytest.importorskip("simplejpeg")
    cfg = [f"data.augment={recipe}", "data.loader=stream", f"data.decoder={decoder}"]
    one = build_data(folder_cfg(folder, tmp_path, *cfg, "data.num_workers=0"), 0, CPU, 8, 5,
                     False)
    two = build_data(folder_cfg(folder, tmp_path, *cfg, "data.num_workers=2"), 0, CPU, 8, 5,
                     False)
    full = batches(one)
    assert_same(full, batches(two))
    assert_same(full[2:], batches(two, start=2))  # resuming at batch 2
    assert not torch.equal(full[0][0], batches(one, epoch=2)[0][0])  # set_epoch reshuffles
    assert_same(batches(one, "test"), batches(two, "test"))


@pytest.mark.compat
def test_memory_and_stream_paths_give_the_same_cifar_batches(tmp_path):
    cfg = ["data.synthetic.train_samples=64", "data.synthetic.test_samples=10",
           "data.synthetic.channels=3", "data.synthetic.image_size=16", "data.augment=cifar",
           "data.num_workers=1"]
    memory = build_data(data_cfg(*cfg, "data.loader=memory"), 0, CPU, 16, 4, False)
    stream = build_data(data_cfg(*cfg, "data.loader=stream"), 0, CPU, 16, 4, False)
    assert_same(batches(memory), batches(stream))
    assert_same(batches(memory, "test"), batches(stream, "test"))


def test_the_decoded_cache_gives_the_memory_paths_batches(folder, tmp_path):
    cfg = folder_cfg(folder, tmp_path, "data.augment=imagenet", "data.num_workers=1")
    memory = build_data(folder_cfg(folder, tmp_path / "m", "data.augment=imagenet",
                                   "data.loader=memory"), 0, CPU, 8, 5, False)
    cached = build_data(folder_cfg(folder, tmp_path / "c", "data.augment=imagenet",
                                   "data.loader=stream", "data.cache=decoded",
                                   "data.num_workers=1"), 0, CPU, 8, 5, False)
    del cfg
    for epoch in (0, 1):  # epoch 0 fills the cache through the loader, epoch 1 gathers from it
        assert_same(batches(memory, epoch=epoch), batches(cached, epoch=epoch))
    assert list((tmp_path / "c" / "cache").glob("*.u8"))


def test_auto_streams_what_does_not_fit_in_memory_gb(folder, tmp_path):
    small = build_data(folder_cfg(folder, tmp_path), 0, CPU, 8, 5, False)
    assert small.facts.loader == "memory" and "auto: 0.00 GiB decoded <=" in small.facts.note
    big = build_data(folder_cfg(folder, tmp_path, "data.memory_gb=0.0001",
                                "data.num_workers=0"), 0, CPU, 8, 5, False)
    assert big.facts.loader == "stream" and "> data.memory_gb=0.0001" in big.facts.note
    assert "0 loader process(es) per worker" in big.facts.note


def _with_a_corrupt_file(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    copy = tmp_path / "images"
    shutil.copytree(folder, copy)
    bad = sorted((copy / "train" / "class_01").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    return copy, bad


@pytest.mark.parametrize("loader", ["stream", "memory"])
def test_a_corrupt_file_stops_with_its_path_or_is_skipped_and_counted(folder, tmp_path, loader):
    copy, bad = _with_a_corrupt_file(folder, tmp_path)
    cfg = [f"data.loader={loader}", "data.num_workers=1"]
    if loader == "memory":
        with pytest.raises(UserError, match=f"cannot decode {bad} "):
            build_data(folder_cfg(copy, tmp_path, *cfg), 0, CPU, 40, 5, False)
    else:
        parts = build_data(folder_cfg(copy, tmp_path, *cfg), 0, CPU, 40, 5, False)
        with pytest.raises(UserError, match=f"cannot decode {bad} .*data.skip_bad_files=true"):
            batches(parts)
    skipping = build_data(folder_cfg(copy, tmp_path, *cfg, "data.skip_bad_files=true"), 0, CPU,
                          8, 5, False)
    seen = sum(len(y) for _, y in batches(skipping, epoch=0))
    assert seen == 39 if loader == "stream" else seen == 32  # memory: 39 samples, 4 batches
    assert skipping.counters.values() == {"skipped_files": 1.0}


def test_nvjpeg_decoding_code_renders_like_pil(folder, tmp_path):
    """The CPU twin of the GPU test: the same class, with torchvision.io decoding on the CPU."""
    from train.data.build import DeviceFinish
    from train.data.counters import DataCounters
    from train.data.nvjpeg import BytesReader, NvjpegDecode, collate_bytes
    from train.data.stream import SampleReader, collate

    cfg = folder_cfg(folder, tmp_path, "data.augment=imagenet")
    train, _ = open_datasets(cfg, 0)
    augment = Augment(cfg, 32, 0)
    finish = DeviceFinish(None, torch.device("cpu"), False, DataCounters(False))
    reader = BytesReader(train, augment, "train")
    x, y = NvjpegDecode(reader, torch.device("cpu"), finish)(
        collate_bytes([reader[(1, i)] for i in range(8)]), 1)
    pil = SampleReader(train, augment, "train")
    x_pil, y_pil = finish(collate([pil[(1, i)] for i in range(8)]), 1)
    assert torch.equal(y, y_pil) and x.shape == x_pil.shape == (8, 3, 32, 32)
    assert (x - x_pil).abs().mean() * 255 < 12  # the same crops, resampled by another library
    assert math.isfinite(float(x.sum()))
