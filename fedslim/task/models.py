"""Model registry: global models and compact students, by name.

Every factory takes ``(input_shape, num_classes)`` -- the shape of ONE example, e.g.
``(1, 8, 8)`` for digits or ``(20,)`` for a 20-feature vector -- and returns a fresh
``nn.Module``. Register your own from a plug-in module (see docs/extending.md)::

    @register_model("my_mlp")
    def my_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module: ...

Spatial size is absorbed by adaptive pooling, so the image models run on any H x W.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedslim.errors import RegistryError
from fedslim.registry import Registry

InputShape = tuple[int, ...]
ModelFactory = Callable[[InputShape, int], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")
register_model = MODELS.register


def build_model(name: str, input_shape: InputShape = (1, 8, 8), num_classes: int = 10
                ) -> nn.Module:
    """Instantiate a registered model for examples of ``input_shape``; unknown names list
    the known ones."""
    return MODELS[name](tuple(input_shape), num_classes)


def seeded_model(name: str, seed: int, input_shape: InputShape, num_classes: int
                 ) -> nn.Module:
    """The run's round-0 model: the same weights in every process that knows the seed (on
    CPU), so nodes can build it themselves instead of downloading it."""
    torch.manual_seed(seed)
    return build_model(name, input_shape, num_classes)


def _channels(input_shape: InputShape) -> int:
    if len(input_shape) != 3:
        raise RegistryError(f"this model needs images of shape (C, H, W), got examples of "
                            f"shape {tuple(input_shape)}; use a model for vectors (e.g. 'mlp')")
    return int(input_shape[0])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ConvNet(nn.Module):
    """Two 3x3 conv layers, pooled to 4x4, then a two-layer MLP head."""

    def __init__(self, in_channels: int, num_classes: int, c1: int, c2: int,
                 hidden: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d((4, 4)),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("digits_cnn")
def digits_cnn(input_shape: InputShape, num_classes: int) -> nn.Module:
    """~151k parameters for 1x8x8 digits: the default global model."""
    return ConvNet(_channels(input_shape), num_classes, c1=32, c2=64, hidden=128)


@register_model("digits_student")
def digits_student(input_shape: InputShape, num_classes: int) -> nn.Module:
    """~30k parameters (~20% of ``digits_cnn``): the compact student."""
    return ConvNet(_channels(input_shape), num_classes, c1=16, c2=32, hidden=48)


@register_model("digits_tiny")
def digits_tiny(input_shape: InputShape, num_classes: int) -> nn.Module:
    """~7k parameters: an even smaller student, for the size/accuracy frontier."""
    return ConvNet(_channels(input_shape), num_classes, c1=8, c2=16, hidden=24)


@register_model("digits_wide")
def digits_wide(input_shape: InputShape, num_classes: int) -> nn.Module:
    """~1.1M parameters (a 512-wide head): the large model of the byte-budget benchmark."""
    return ConvNet(_channels(input_shape), num_classes, c1=64, c2=128, hidden=512)


@register_model("wide32")
def wide32(input_shape: InputShape, num_classes: int) -> nn.Module:
    """~10.1M parameters for 3x32x32 inputs: two conv layers and a 9728-wide dense layer.

    The ~10M-parameter workload of the scale benchmark: as many parameters (bytes on the
    wire, server memory) as a ResNet-18, at a compute cost a 2-core CPU can train.
    """
    return ConvNet(_channels(input_shape), num_classes, c1=32, c2=64, hidden=9728)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet8(nn.Module):
    """ResNet-8 for 32x32 inputs: stem + three residual stages (16/32/64 x width)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 1) -> None:
        super().__init__()
        w = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(BasicBlock(w[0], w[0], 1), BasicBlock(w[0], w[1], 2),
                                    BasicBlock(w[1], w[2], 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(w[2], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@register_model("resnet8")
def resnet8(input_shape: InputShape, num_classes: int) -> nn.Module:
    """ResNet-8-like (~78k params at width 1) for CIFAR-sized 3x32x32 inputs."""
    return ResNet8(_channels(input_shape), num_classes, width=1)


@register_model("resnet8_student")
def resnet8_student(input_shape: InputShape, num_classes: int) -> nn.Module:
    """A narrow plain CNN student for 32x32 inputs (< 25% of ``resnet8``)."""
    return ConvNet(_channels(input_shape), num_classes, c1=8, c2=16, hidden=32)


class QuickstartNet(nn.Module):
    """Flower's PyTorch quickstart ``Net`` (LeNet-5 style, 62,006 parameters for 3x32x32
    and 10 classes), layer for layer: conv 5x5 (6), pool, conv 5x5 (16), pool, 120, 84."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@register_model("quickstart_cnn")
def quickstart_cnn(input_shape: InputShape, num_classes: int) -> nn.Module:
    """Flower's quickstart-pytorch ``Net`` for 32x32 images (e.g. ``dataset=digits32``)."""
    channels = _channels(input_shape)
    if tuple(input_shape[1:]) != (32, 32):
        raise RegistryError(f"quickstart_cnn needs 32x32 images, got examples of shape "
                            f"{tuple(input_shape)}; use dataset=digits32 or synthetic32")
    return QuickstartNet(channels, num_classes)


class SeqCNN(nn.Module):
    """Three 1-D conv blocks (each halves the length), then a two-layer head on the
    flattened features, which keeps WHERE along the sequence a feature was found."""

    def __init__(self, in_channels: int, length: int, num_classes: int, hidden: int = 64
                 ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, 16, 7, padding=3), nn.ReLU(inplace=True), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool1d(2),
            nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool1d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (length // 8), hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("seq_cnn")
def seq_cnn(input_shape: InputShape, num_classes: int) -> nn.Module:
    """~33k parameters for (C, T) sequences with T >= 8 (e.g. ``dataset=motifs``)."""
    if len(input_shape) != 2 or int(input_shape[1]) < 8:
        raise RegistryError(f"seq_cnn needs sequences of shape (C, T) with T >= 8, got "
                            f"examples of shape {tuple(input_shape)}")
    return SeqCNN(int(input_shape[0]), int(input_shape[1]), num_classes)


class MLP(nn.Module):
    """Flatten, then ``hidden`` ReLU layers: for feature vectors (or any shape)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _features(input_shape: InputShape) -> int:
    n = 1
    for d in input_shape:
        n *= int(d)
    return n


@register_model("mlp")
def mlp(input_shape: InputShape, num_classes: int) -> nn.Module:
    """Two hidden layers of 64: a small model for vectors (~5k params for 20 features)."""
    return MLP(_features(input_shape), num_classes, hidden=(64, 64))


@register_model("digits_mlp")
def digits_mlp(input_shape: InputShape, num_classes: int) -> nn.Module:
    """One hidden layer of 256 (19,210 parameters on 8x8 digits): the <= 20k-parameter
    model of the byte-budget benchmark (issue 15), the largest that size allows."""
    return MLP(_features(input_shape), num_classes, hidden=(256,))


@register_model("mlp_student")
def mlp_student(input_shape: InputShape, num_classes: int) -> nn.Module:
    """One hidden layer of 16: a compact student for ``mlp``."""
    return MLP(_features(input_shape), num_classes, hidden=(16,))
