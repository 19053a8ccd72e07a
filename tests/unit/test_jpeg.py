"""The CPU decoder's two paths (train/data/jpeg.py: simplejpeg; PIL) render the same views,
and PIL takes what simplejpeg does not (PNG, CMYK, a missing simplejpeg); the benchmark's
photographs (tools/bench/photos.py)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.errors import UserError
from tests.workers import DEFAULT_CONFIG
from tools.bench.photos import imagenet_size, photo_set
from train.config import load_config
from train.data import jpeg
from train.data.augment import Augment
from train.data.decode import DECODE_ERRORS, render_path
from train.data.imagefolder import scan

pytest.importorskip("simplejpeg")


def _cfg(*overrides: str):
    return load_config(DEFAULT_CONFIG, ["data.augment=imagenet", *overrides]).data


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The benchmark's photographic set, small: 24 train / 10 val JPEGs."""
    pytest.importorskip("skimage")
    return photo_set(24, 10, root=tmp_path_factory.mktemp("photos"))


def _both(path: str, augment: Augment, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    view_of = lambda w, h: augment.train_view(w, h, 3, index)  # noqa: E731
    return render_path(path, view_of, "simplejpeg"), render_path(path, view_of, "pil")


@pytest.mark.parametrize("size", [224, 176, 40])  # 40: most views decode at 1/2 to 1/8 scale
def test_simplejpeg_renders_the_view_pil_renders(photos, size):
    """Whole-pixel boxes: torchvision's tensor RandomResizedCrop exactly, PIL's within one grey
    level inside (PIL's filter reads past the box's edges); boxes at a reduced DCT scale: PIL's
    bits."""
    import torchvision.transforms.v2.functional as TF

    files, _ = scan(_cfg("data.name=imagefolder", f"data.root={photos}"))
    augment, scaled = Augment(_cfg(), size, seed=0), 0
    for i in range(len(files)):
        path, view_of = files.paths[i], lambda w, h, i=i: augment.train_view(w, h, 3, i)
        fast, slow = _both(path, augment, i)
        assert fast.shape == slow.shape == (3, size, size), path
        with open(path, "rb") as f:
            pixels, sx, _, view = jpeg.decode(f.read(), view_of, "RGBX")
        if sx < 1:
            scaled += 1
            assert torch.equal(fast, slow), path
            continue
        whole = torch.from_numpy(pixels[..., :3].copy()).permute(2, 0, 1)
        theirs = TF.resized_crop(whole, view.top, view.left, view.height, view.width,
                                 [size, size], antialias=True)
        assert torch.equal(fast, theirs.flip(-1) if view.flip else theirs), path
        inside = (fast.int() - slow.int())[:, 3:-3, 3:-3]
        assert inside.abs().max() <= 1 and (fast.int() - slow.int()).abs().float().mean() < 1
    assert (scaled > 0) == (size == 40)  # at 224 and 176 no ImageNet-sized view shrinks


@pytest.mark.parametrize("kind", ["png", "cmyk", "progressive", "gray"])
def test_files_simplejpeg_does_not_take_go_to_pil(tmp_path, kind):
    image = Image.effect_mandelbrot((120, 90), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    path = tmp_path / ("a.png" if kind == "png" else "a.jpg")
    if kind == "png":
        image.save(path)
    else:
        mode = {"cmyk": "CMYK", "gray": "L"}.get(kind, "RGB")
        image.convert(mode).save(path, quality=90, progressive=kind == "progressive")
    augment = Augment(_cfg(), 24, seed=0)
    fast, slow = _both(str(path), augment, 0)
    assert fast.shape == slow.shape and (fast.int() - slow.int()).abs().float().mean() < 1
    taken = jpeg.decode(path.read_bytes(), lambda w, h: augment.train_view(w, h, 3, 0))
    if taken is None:
        assert torch.equal(fast, slow)  # PIL rendered both
    assert (taken is None) == (kind in ("png", "cmyk"))


def test_a_broken_jpeg_is_a_decode_error_on_both_paths(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (9, 90, 200)).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:300])  # header kept, scan data cut short
    augment = Augment(_cfg(), 24, seed=0)
    for decoder in ("simplejpeg", "pil"):
        with pytest.raises(DECODE_ERRORS):
            render_path(str(path), lambda w, h: augment.train_view(w, h, 0, 0), decoder)


def test_without_simplejpeg_pil_decodes_everything(photos, monkeypatch):
    monkeypatch.setattr(jpeg, "simplejpeg", None)
    assert jpeg.resolve("auto") == "pil"
    files, _ = scan(_cfg("data.name=imagefolder", f"data.root={photos}"))
    assert files.decoder == "pil"
    augment = Augment(_cfg(), 64, seed=0)
    fast, slow = _both(files.paths[0], augment, 0)
    assert torch.equal(fast, slow)  # both through PIL
    with pytest.raises(UserError, match="simplejpeg is not installed"):
        scan(_cfg("data.name=imagefolder", f"data.root={photos}", "data.decoder=simplejpeg"))


def test_auto_is_simplejpeg_when_installed(photos):
    files, val = scan(_cfg("data.name=imagefolder", f"data.root={photos}"))
    assert files.decoder == val.decoder == "simplejpeg"
    forced, _ = scan(_cfg("data.name=imagefolder", f"data.root={photos}", "data.decoder=pil"))
    assert forced.decoder == "pil"


def test_the_photo_set_has_imagenets_sizes_and_is_written_once(photos):
    rng = random.Random(0)
    sizes = [imagenet_size(rng) for _ in range(5000)]
    width, height = (sum(s[i] for s in sizes) / len(sizes) for i in (0, 1))
    assert 380 < width < 430 and 330 < height < 375  # ImageNet's mean: about 400 x 350
    assert sum(w < h for w, h in sizes) > 1000  # portraits too
    files = sorted(photos.rglob("*.jpg"))
    assert len(files) == 34
    stamps = [f.stat().st_mtime_ns for f in files]
    assert photo_set(24, 10, root=photos.parent) == photos  # found, not written again
    assert [f.stat().st_mtime_ns for f in files] == stamps
    with Image.open(files[0]) as first:
        assert first.format == "JPEG" and first.mode == "RGB"
