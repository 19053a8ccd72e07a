"""Models by name (torchvision's, a user's callable, timm's refusal), published weights from
the torch hub cache, `model.init_from`, and the shape check before training."""

import pytest
import torch
from torch import nn

from common.errors import UserError
from common.schema import ModelConfig
from models import build_model
from models.pretrained import weights_file
from train.data.build import DataFacts
from train.model import check_shape, read_weights


def facts(channels=3, side=32, classes=10):
    return DataFacts(channels, side, classes, [str(i) for i in range(classes)], 1, 1, "memory", "")


@pytest.mark.parametrize("name", ["torchvision.resnet18", "torchvision.mobilenet_v3_small"])
@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_builders_take_the_datas_classes_and_channels(name, channels):
    from torchvision import models

    net = build_model(name, channels, 7, 32)
    assert net(torch.zeros(2, channels, 32, 32)).shape == (2, 7)
    # torchvision's own keys (a gray image is repeated by a hook, not a new layer)
    reference = models.get_model(name.split(".", 1)[1], num_classes=7)
    assert list(net.state_dict()) == list(reference.state_dict())


def test_a_users_callable_gets_classes_channels_and_size(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def build(num_classes, in_channels, image_size):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, "
        "num_classes))\n"
        "def not_a_model(num_classes, in_channels, image_size):\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = build_model("python:my_models:build", 2, 5, 12)
    assert net(torch.zeros(3, 2, 12, 12)).shape == (3, 5)
    with pytest.raises(UserError, match="returned a int, not an nn.Module"):
        build_model("python:my_models:not_a_model", 2, 5, 12)
    with pytest.raises(UserError, match="my_models has no callable nothing"):
        build_model("python:my_models:nothing", 2, 5, 12)


def test_pretrained_weights_come_from_the_hub_cache_and_a_new_head_keeps_its_init(
        tmp_path, monkeypatch):
    from torchvision import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, _, path = weights_file("resnet18")
    assert path.parent == tmp_path / "hub" / "checkpoints"
    published = models.resnet18(num_classes=1000).state_dict()  # stands in for the download
    path.parent.mkdir(parents=True)
    torch.save(published, path)
    torch.manual_seed(0)
    net = build_model("torchvision.resnet18", 3, 10, 32, pretrained=True)
    state = net.state_dict()
    assert torch.equal(state["conv1.weight"], published["conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_var"], published["layer4.1.bn2.running_var"])
    assert state["fc.weight"].shape == (10, 512)  # fresh: 10 classes, not 1000


def test_pretrained_weights_missing_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, progress=True):
        raise OSError("network unreachable")  # what this machine answers; CI may be online

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as info:
        build_model("torchvision.resnet18", 3, 10, 32, pretrained=True)
    assert "weights are not in the torch hub cache" in str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(info.value)
    with pytest.raises(UserError, match="lenet has no published weights"):
        build_model("lenet", 1, 10, 28, pretrained=True)


def test_init_from_takes_a_checkpoint_or_a_state_dict_and_names_mismatches(tmp_path):
    source = build_model("torchvision.resnet18", 3, 10, 32)
    target = build_model("torchvision.resnet18", 3, 10, 32)
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}  # saved from DDP
    torch.save({"model": wrapped, "step": 3}, tmp_path / "ckpt.pt")
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    for name in ("ckpt.pt", "plain.pt"):
        state = read_weights(str(tmp_path / name), target)
        assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    other = build_model("torchvision.resnet18", 3, 4, 32)
    with pytest.raises(UserError) as info:
        read_weights(str(tmp_path / "plain.pt"), other)
    assert "2 of another shape (fc.weight: (10, 512) in the file, (4, 512) in the model)" in str(
        info.value)
    with pytest.raises(UserError, match=r"keys 127 missing \(0.weight, .*122 unexpected \(conv1"):
        read_weights(str(tmp_path / "plain.pt"), build_model("resnet18", 3, 10, 32))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="is not a state dict .names to tensors.; got a list"):
        read_weights(str(tmp_path / "list.pt"), target)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="is not a state dict torch can load with weights_only"):
        read_weights(str(tmp_path / "text.pt"), target)


def test_a_model_that_cannot_take_the_datas_shape_is_caught_naming_both():
    vit = build_model("torchvision.vit_b_16", 1, 10, 28)
    with pytest.raises(UserError) as info:
        check_shape(ModelConfig(name="torchvision.vit_b_16"), vit, facts(1, 28), torch.device(
            "cpu"), channels_last=False)
    message = str(info.value)
    assert "images of shape 1x28x28 (it takes 3x224x224)" in message
    assert "Expected 224 but got 28" in message
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(UserError, match=r"gives outputs of shape \(2, 4\).*expected \(2, 10\)"):
        check_shape(ModelConfig(name="python:m:f"), wrong, facts(), torch.device("cpu"), False)


def test_timm_names_go_to_timm_create_model_when_it_is_installed(monkeypatch):
    """timm is an optional extra, absent here: a stand-in module shows what is asked of it
    (the refusal without it: test_config.py)."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("timm")
    fake.list_models = lambda: ["resnet50", "vit_small_patch16_224"]

    def create_model(name, pretrained, num_classes, in_chans):
        calls.append((name, pretrained, num_classes, in_chans))
        return nn.Linear(in_chans, num_classes)

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    assert isinstance(build_model("timm.resnet50", 1, 7, 32, pretrained=True), nn.Linear)
    assert calls == [("resnet50", True, 7, 1)]
    with pytest.raises(UserError, match="did you mean timm.resnet50"):
        build_model("timm.resnet5", 1, 7, 32)
