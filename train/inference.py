"""A trained model for inference, from a run folder: `load_trained("runs/latest")`.

Checkpoints carry what inference needs besides the weights (`InputSpec`: the input shape, the
number of classes and the training set's normalization), so that the model takes images as a
dataset holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import config as engine
from common.errors import UserError
from common.records import CHECKPOINT_DIR, CONFIG_FILE
from models import build_model
from train.data import load_datasets
from train.data.build import DataFacts
from train.run_path import follow_latest


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


class Predictor(nn.Module):
    """The trained model behind the training batches' preprocessing: images in, logits out."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        super().__init__()
        self.model, self.spec = model, spec
        mean = torch.zeros(1) if spec.mean is None else spec.mean
        std = torch.full((1,), 255.0) if spec.std is None else spec.std
        self.register_buffer("mean", mean.float().reshape(1, -1, 1, 1))
        self.register_buffer("std", std.float().reshape(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`images` [N, C, H, W]: uint8 in 0..255 (as torchvision.io.read_image gives), or
        floats in 0..1 (torchvision's ToTensor). Returns logits [N, classes]."""
        pixels = images.float() if images.dtype == torch.uint8 else images.float() * 255
        return self.model((pixels - self.mean) / self.std)


def load_trained(run_dir: str | Path, checkpoint: str = "last.pt",
                 device: str | torch.device = "cpu") -> Predictor:
    """The model of a run folder (`runs/latest`: the newest run) from one of its checkpoints,
    on `device`, in eval mode."""
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
    return Predictor(model, spec).to(device).eval()


def _spec_from_data(cfg: engine.Config) -> InputSpec:
    """Checkpoints written before they carried an InputSpec: read the dataset again."""
    train_set, _ = load_datasets(cfg.data, cfg.seed)
    return InputSpec.of(train_set)
