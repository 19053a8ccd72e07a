"""The data paths' GPU parts: the memory path's copy-ahead with augmentation (indices staged
pinned, recorded on the stream that reads them) and the nvjpeg path (indices on the host,
crops rendered as one batch, a refused file decoded alone on the CPU).

Each `gpu` test has a CPU twin here: the same code on the CPU, where the bug has a CPU form
(a staging buffer reused under a batch still in use, a batch sent whole to the CPU decoder,
a batched crop that is not the per-image crop).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu_data_workers import nvjpeg_batch, odd_folder
from tests.helpers import gpu_count, gpu_env, run_single
from tests.test_gpu_path import assert_bitwise, launch, params, records
from tests.workers import DEFAULT_CONFIG
from train.config import load_config
from train.data import load_datasets
from train.data.augment import Augment, View
from train.data.batches import train_batches
from train.data.crops import render_batch
from train.data.decode import render_tensor

AUGMENTED = ["data.synthetic.channels=3", "data.synthetic.image_size=32"]


# --- memory path: copy-ahead with augmentation ----------------------------------------------


@pytest.mark.parametrize("recipe", ["cifar", "imagenet"])
def test_copying_ahead_with_augmentation_keys_each_crop_on_its_own_indices(recipe):
    """The CPU twin of the GPU test below: the batches CopyAhead hands to the augmentation are
    those of the plain path, and the indices each batch was augmented with are still its own
    after the staging buffers were reused twice."""
    cfg = load_config(DEFAULT_CONFIG, [*AUGMENTED, "data.synthetic.train_samples=700",
                                       f"data.augment={recipe}"])
    train, _ = load_datasets(cfg.data, cfg.seed, download=False)
    augment = Augment(cfg.data, 32, cfg.seed)
    cpu = torch.device("cpu")
    plain, ahead = (train_batches(train, 0, 1, 64, 0, cpu, augment=augment.device_train,
                                  copy_ahead=flag)
                    for flag in (False, True))
    seen: list[torch.Tensor] = []
    prepare = ahead.copy_ahead.prepare

    def keep_indices(images, labels, idx):
        seen.append(idx)
        return prepare(images, labels, idx)

    ahead.copy_ahead.prepare = keep_indices
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        ahead.set_epoch(epoch)
        got, expected = list(ahead.iterate(1)), list(plain.iterate(1))
        assert len(got) == len(expected) == len(plain) - 1 > 2
        for (x, y), (gx, gy) in zip(expected, got, strict=True):
            assert torch.equal(gx, x) and torch.equal(gy, y)
    for epoch in (0, 1):  # the indices of epoch 0 as they were, after epoch 1 reused the slots
        plain.set_epoch(epoch)
        order = [plain.indices()[i * 64:(i + 1) * 64] for i in range(1, len(plain))]
        mine = seen[epoch * len(order):(epoch + 1) * len(order)]
        assert all(torch.equal(a, b) for a, b in zip(mine, order, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twin: test_copying_ahead_with_"
                                            "augmentation_keys_each_crop_on_its_own_indices)")
def test_host_memory_with_augmentation_resumes_bitwise_like_the_dataset_on_the_gpu(tmp_path):
    knobs = [*AUGMENTED, "data.augment=cifar", "perf.deterministic=true",
             "checkpoint.every_steps=4"]
    whole = launch("nccl", 1, tmp_path / "on", *knobs)
    assert whole.returncode == 0, whole.stderr
    off = tmp_path / "off"
    stopped = launch("nccl", 1, off, *knobs, "data.on_device=false", "debug.sigterm_rank=0",
                     "debug.sigterm_step=8")
    assert stopped.returncode == 130, stopped.stderr
    again = launch("nccl", 1, off, *knobs, "data.on_device=false")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    assert "stays in host memory" in again.stdout + again.stderr
    assert_bitwise(params(off), params(tmp_path / "on"))
    assert [(r["step"], r["train_loss"]) for r in records(off)] == [
        (r["step"], r["train_loss"]) for r in records(tmp_path / "on")]


# --- nvjpeg path ----------------------------------------------------------------------------


def _smooth(height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """A photo-like uint8 image (noise would measure the resampling kernels, not the crop)."""
    small = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=gen) * 255
    image = torch.nn.functional.interpolate(small, size=(height, width), mode="bicubic")
    return image[0].clamp(0, 255).round().to(torch.uint8)


def test_a_batch_of_crops_is_each_images_own_crop():
    """render_batch (one roi_align per image size) against render_tensor per image: the same
    boxes, flips and sizes; within a fraction of a grey level (another resampling kernel);
    an identity view exact."""
    cfg = load_config(DEFAULT_CONFIG, ["data.augment=imagenet"]).data
    augment, gen = Augment(cfg, 32, 0), torch.Generator().manual_seed(0)
    images = [_smooth(h, w, gen) for h, w in ((64, 96), (64, 96), (80, 80), (96, 64),
                                              (64, 96), (33, 200), (32, 32))]
    for split in ("train", "eval"):
        views = [augment.train_view(im.shape[2], im.shape[1], 1, k) if split == "train"
                 else augment.eval_view(im.shape[2], im.shape[1])
                 for k, im in enumerate(images)]
        batched = render_batch(images, views)
        one_by_one = torch.stack([render_tensor(im, v) for im, v in zip(images, views,
                                                                         strict=True)])
        assert batched.dtype == torch.uint8 and batched.shape == (7, 3, 32, 32)
        assert (batched.float() - one_by_one.float()).abs().mean((1, 2, 3)).max() < 2.0
        if split == "train":  # some flipped, some not: both branches of the batch's flip
            assert any(v.flip for v in views) and not all(v.flip for v in views)
    square = images[-1]
    for flip in (False, True):
        out = render_batch([square, images[0]], [View(0, 0, 32, 32, 32, flip), views[0]])
        assert torch.equal(out[0], square.flip(-1) if flip else square)


def _check_odd_batch(result: dict, files: dict) -> None:
    """15 of 16 images decoded (the broken one skipped and counted), labels in batch order."""
    broken = result["paths"].index(str(files["broken"]))
    assert result["skipped"] == 1
    assert result["y"].tolist() == [y for i, y in enumerate(result["labels"]) if i != broken]
    assert result["x"].shape == (15, 3, 32, 32)


def test_one_refused_file_goes_to_the_cpu_decoder_alone(tmp_path):
    """The CPU twin of the nvjpeg test: torchvision's batch decode fails whole for one broken
    file, on the CPU too; only that file (and the PNG) reach the per-file decoder, the CMYK
    JPEG decodes in the batch; the broken one is skipped and counted."""
    files = odd_folder(tmp_path / "odd")
    result = nvjpeg_batch(str(tmp_path / "odd"), "cpu")
    _check_odd_batch(result, files)
    assert result["cpu_decoded"] == 2  # the PNG and the broken JPEG, not the batch
    clean = nvjpeg_batch(str(tmp_path / "odd"), "cpu", "eval")
    assert clean["x"].shape == (15, 3, 32, 32) and clean["cpu_decoded"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU (CPU twins: test_one_refused_file_goes"
                                            "_to_the_cpu_decoder_alone, test_a_batch_of_crops_is_"
                                            "each_images_own_crop)")
def test_nvjpeg_keeps_indices_on_the_host_and_falls_back_per_file(tmp_path):
    files = odd_folder(tmp_path / "odd")
    result = run_single(nvjpeg_batch, str(tmp_path / "odd"), "cuda", env=gpu_env(1))
    assert result["host"] == {"labels": "cpu", "indices": "cpu"}  # ahead() left them there
    _check_odd_batch(result, files)
    # The PNG and the broken file; the CMYK one too where nvjpeg refuses it. Not the batch.
    assert result["cpu_decoded"] in (2, 3)
    on_cpu = nvjpeg_batch(str(tmp_path / "odd"), "cpu")
    # nvjpeg's IDCT rounds differently from libjpeg's: the same crops, close.
    assert (result["x"] - on_cpu["x"]).abs().mean() * 255 < 3
