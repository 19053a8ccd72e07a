"""A trained model for inference, from a run folder: `load_trained("runs/latest")`.

Checkpoints carry what inference needs besides the weights (`InputSpec`: the input shape, the
number of classes and the training set's normalization), so that the model takes images as a
dataset holds them, and refuses images it was not trained on: another channel count always;
another size unless `resize=True` asks for them to be resized to the training size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common import config as engine
from common.errors import UserError
from common.records import CHECKPOINT_DIR, CONFIG_FILE
from models import build_model
from train.data import load_datasets
from train.data.build import DataFacts
from train.run.location import follow_latest


@dataclass
class InputSpec:
    """What the model was trained on: a checkpointed part that is never restored (the data of
    the run that loads it decides), only read back by `load_trained`."""

    channels: int
    image_size: int
    num_classes: int
    mean: torch.Tensor | None  # per channel, in 0..255 units, [1, C, 1, 1]; None: x / 255
    std: torch.Tensor | None

    @classmethod
    def of(cls, data: DataFacts) -> InputSpec:
        """What the training batches were: their shape, classes and normalization."""
        return cls(data.channels, data.image_size, data.num_classes,
                   *(data.stats or (None, None)))

    def state_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "image_size": self.image_size,
                "num_classes": self.num_classes, "mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # facts of the data, not state: a resumed run keeps its own


class WrongInput(UserError, ValueError):
    """Images the model was not trained on (another channel count or size)."""


class Predictor(nn.Module):
    """The trained model behind the training batches' preprocessing: images in, logits out.
    `resize`: images of another height and width are resized (bilinear, antialiased) to the
    training size; without it they are refused, since a model fed another size either fails
    deep inside or, with adaptive pooling, predicts silently worse."""

    def __init__(self, model: nn.Module, spec: InputSpec, resize: bool = False):
        super().__init__()
        self.model, self.spec, self.resize = model, spec, resize
        mean = torch.zeros(1) if spec.mean is None else spec.mean
        std = torch.full((1,), 255.0) if spec.std is None else spec.std
        self.register_buffer("mean", mean.float().reshape(1, -1, 1, 1))
        self.register_buffer("std", std.float().reshape(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`images` [N, C, H, W]: uint8 in 0..255 (as torchvision.io.read_image gives), or
        floats in 0..1 (torchvision's ToTensor). Returns logits [N, classes]."""
        self.check(images)
        pixels = images.float() if images.dtype == torch.uint8 else images.float() * 255
        side = self.spec.image_size
        if tuple(pixels.shape[-2:]) != (side, side):
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.model((pixels - self.mean) / self.std)

    def check(self, images: torch.Tensor) -> None:
        """WrongInput unless `images` are [N, C, H, W] of the training channel count, and of
        the training size or `resize` allows another."""
        spec, shape = self.spec, tuple(images.shape)
        if len(shape) != 4:
            raise WrongInput(f"images must be a batch [N, C, H, W]; got shape {shape}")
        if shape[1] != spec.channels:
            raise WrongInput(f"the model was trained on {spec.channels}-channel images; these "
                             f"have {shape[1]} channels (shape {shape}): convert them first")
        side = spec.image_size
        if shape[2:] != (side, side) and not self.resize:
            raise WrongInput(f"the model was trained on {side}x{side} images; these are "
                             f"{shape[2]}x{shape[3]}: resize them, or load the model with "
                             f"load_trained(..., resize=True) to have them resized to "
                             f"{side}x{side}")


def load_trained(run_dir: str | Path, checkpoint: str = "last.pt",
                 device: str | torch.device = "cpu", resize: bool = False) -> Predictor:
    """The model of a run folder (`runs/latest`: the newest run) from one of its checkpoints,
    on `device`, in eval mode. `resize`: accept images of another size, resized to the
    training size (else they are refused: WrongInput)."""
    folder = follow_latest(Path(run_dir))
    path = folder / CHECKPOINT_DIR / checkpoint
    if not path.is_file():
        raise UserError(f"{path} does not exist (is {folder} a run folder that saved a "
                        f"checkpoint?)")
    cfg = engine.load_config(folder / CONFIG_FILE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    spec = InputSpec(**state["inputs"]) if "inputs" in state else _spec_from_data(cfg)
    model = build_model(cfg.model.name, spec.channels, spec.num_classes, spec.image_size)
    model.load_state_dict(state["model"])
    return Predictor(model, spec, resize).to(device).eval()


def _spec_from_data(cfg: engine.Config) -> InputSpec:
    """Checkpoints written before they carried an InputSpec: read the dataset again."""
    train_set, _ = load_datasets(cfg.data, cfg.seed)
    return InputSpec.of(train_set)
