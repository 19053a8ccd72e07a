import pytest
import torch
from torch import nn

from models import MODELS, build_model


def test_lenet_is_the_books_architecture():
    net = build_model("lenet", in_channels=1, num_classes=10, image_size=28)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(20, (3, 3)), (50, (5, 5))]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(800, 128), (128, 10)]
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == 2
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 3
    assert net(torch.zeros(4, 1, 28, 28)).shape == (4, 10)


def test_lenet_adapts_to_cifar_shaped_inputs():
    net = build_model("lenet", in_channels=3, num_classes=10, image_size=32)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32)])
def test_resnet18_has_small_image_stem_and_no_max_pool(channels, side):
    net = build_model("resnet18", in_channels=channels, num_classes=10, image_size=side)
    stem = net[0]
    assert (stem.in_channels, stem.kernel_size, stem.stride) == (channels, (3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    residuals = [m for m in net.modules() if type(m).__name__ == "Residual"]
    assert len(residuals) == 8
    assert net(torch.zeros(2, channels, side, side)).shape == (2, 10)


def test_models_know_nothing_about_parallelism():
    for name in MODELS:
        net = build_model(name, 1, 10, 28)
        assert not isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel))
        assert all(p.device.type == "cpu" for p in net.parameters())


def test_book_init_is_small_normal_and_torch_init_is_pytorchs():
    torch.manual_seed(0)
    book = build_model("lenet", 1, 10, 28, init="book")
    torch.manual_seed(0)
    default = build_model("lenet", 1, 10, 28, init="torch")
    weight = book.classifier[1].weight
    assert abs(weight.std().item() - 0.01) < 0.001 and book.classifier[1].bias.abs().max() == 0
    # PyTorch's Linear init: uniform in +-1/sqrt(fan_in) = +-0.035 for 800 inputs.
    assert default.classifier[1].weight.abs().max() <= 1 / 800**0.5 + 1e-6
    assert default.classifier[1].weight.std() > 2 * weight.std()
