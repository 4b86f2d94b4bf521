"""Feature extractors. Each maps normalised NCHW images to a feature vector and exposes `feature_dim`."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..registry import Registry

BACKBONES = Registry("backbone")


class BasicBlock(nn.Module):
    """ResNet block: conv-bn-relu-conv-bn plus shortcut, relu."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block: bn-relu-conv twice; the shortcut taps the first activation when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.drop > 0:
            out = F.dropout(out, self.drop, self.training)
        return self.conv2(out) + shortcut


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (carrying the stride, as torchvision's "v1.5"), 1x1 expand by 4, each
    conv followed by BatchNorm; the shortcut projects when shapes change; relu after the sum."""
    expansion = 4

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        mid = c_out // self.expansion
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _stage(block, c_in: int, c_out: int, n: int, stride: int, **kw) -> nn.Sequential:
    layers = [block(c_in, c_out, stride, **kw)] + [block(c_out, c_out, 1, **kw) for _ in range(n - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool), post-activation blocks."""

    def __init__(self, width: int = 64, in_channels: int = 3, blocks=(2, 2, 2, 2)):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
        self.stages = nn.Sequential(*[_stage(BasicBlock, ([w[0]] + w)[i], w[i], n, 1 if i == 0 else 2)
                                      for i, n in enumerate(blocks)])
        self.feature_dim = w[-1]

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)


class PreActResNet(nn.Module):
    """Pre-activation ResNet-18 with a base width (64 is the usual model; 16 is robal's CPU reference)."""

    def __init__(self, width: int = 64, in_channels: int = 3, blocks=(2, 2, 2, 2)):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.stages = nn.Sequential(*[_stage(PreActBlock, ([w[0]] + w)[i], w[i], n, 1 if i == 0 else 2)
                                      for i, n in enumerate(blocks)])
        self.bn = nn.BatchNorm2d(w[-1])
        self.feature_dim = w[-1]

    def forward(self, x):
        out = F.relu(self.bn(self.stages(self.stem(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis) with pre-activation blocks; 34-10 is the paper's model."""

    def __init__(self, depth: int = 34, widen: int = 10, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 28, 34); got {depth}")
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.stages = nn.Sequential(*[_stage(PreActBlock, w[i], w[i + 1], n, 1 if i == 0 else 2, drop=dropout)
                                      for i in range(3)])
        self.bn = nn.BatchNorm2d(w[-1])
        self.feature_dim = w[-1]

    def forward(self, x):
        out = F.relu(self.bn(self.stages(self.stem(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class ImageNetResNet(nn.Module):
    """ImageNet ResNet-50 (He et al.): 7x7 stride-2 stem and 3x3 max-pool, then four stages of bottleneck blocks
    (3, 4, 6, 3) with 4 * width, ..., 32 * width output channels (2048 features at width 64), the last three
    halving the resolution. For 224-pixel images (ImageNet-LT); 23.5M parameters without the head."""

    def __init__(self, width: int = 64, in_channels: int = 3, blocks=(3, 4, 6, 3)):
        super().__init__()
        w = [4 * width * 2 ** i for i in range(4)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential(*[_stage(Bottleneck, ([width] + w)[i], w[i], n, 1 if i == 0 else 2)
                                      for i, n in enumerate(blocks)])
        self.feature_dim = w[-1]

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)


class SmallCNN(nn.Module):
    """Three 3x3 conv layers with BatchNorm for 8x8 digits (BatchNorm keeps cosine heads trainable at lr 0.1)."""

    def __init__(self, width: int = 32, in_channels: int = 1):
        super().__init__()

        def conv(a, b):
            return [nn.Conv2d(a, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]

        self.body = nn.Sequential(*conv(in_channels, width), *conv(width, 2 * width), nn.MaxPool2d(2),
                                  *conv(2 * width, 2 * width))
        self.feature_dim = 2 * width

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


@BACKBONES.register("resnet18")
def resnet18(width: int = 64, in_channels: int = 3) -> nn.Module:
    return ResNet(width, in_channels)


@BACKBONES.register("preact_resnet18")
def preact_resnet18(width: int = 64, in_channels: int = 3) -> nn.Module:
    return PreActResNet(width, in_channels)


@BACKBONES.register("resnet50")
def resnet50(width: int = 64, in_channels: int = 3) -> nn.Module:
    return ImageNetResNet(width, in_channels)


@BACKBONES.register("wrn34_10")
def wrn34_10(depth: int = 34, widen: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(depth, widen, in_channels, dropout)


@BACKBONES.register("small_cnn")
def small_cnn(width: int = 32, in_channels: int = 1) -> nn.Module:
    return SmallCNN(width, in_channels)
