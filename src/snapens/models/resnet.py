"""ResNet for CIFAR (He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snapens.models._common import check_common, dropout_layer, init_weights

__all__ = ["CifarResNet", "resnet_blocks_per_stage", "SHORTCUTS"]

#: "A": parameter-free shortcut (strided subsampling + zero channel padding); "B": 1x1 conv + BN projection.
SHORTCUTS = ("A", "B")


def resnet_blocks_per_stage(depth: int) -> int:
    """n for a CIFAR ResNet of depth ``D = 6n + 2`` (1 stem conv, 6n convs in 3 stages, 1 linear layer).

    Raises:
        ValueError: if ``D`` is not of the form 6n+2 with n >= 1.
    """
    if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 8 and (depth - 2) % 6 == 0:
        return (depth - 2) // 6
    raise ValueError(f"invalid ResNet depth {depth!r}: expected D = 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")


class _PadShortcut(nn.Module):
    """Option A (paper sec. 4.2): take every ``stride``-th pixel and append zero channels; no parameters."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        # x[..., ::s, ::s] has ceil(H/s) rows, the same as the 3x3/stride-s/pad-1 convolution of the main path.
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class _BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-dropout-conv3x3-BN, added to the shortcut, then ReLU (post-activation)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, shortcut: str, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_planes)
        self.dropout = dropout_layer(dropout)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            if shortcut == "A":
                self.shortcut = _PadShortcut(stride, out_planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-D for CIFAR: a 16-channel 3x3 stem, three stages of n basic blocks with 16, 32, 64 filters
    (stages 2 and 3 start with stride 2), global average pooling and a linear layer; D = 6n + 2.

    ResNet-20 has 0.27M parameters and ResNet-110 1.7M with the paper's option-A shortcuts.

    Args:
        depth: D = 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes: Number of output logits.
        in_channels: Input channels (3 for CIFAR, 1 for digits).
        shortcut: ``"A"`` (parameter-free, the paper's CIFAR choice) or ``"B"`` (1x1 projection + BN) where the
            shape changes; identity elsewhere.
        dropout: Dropout probability between the two convolutions of each block (not in the paper; default 0).
    """

    def __init__(
        self, *, depth: int, num_classes: int, in_channels: int = 3, shortcut: str = "A", dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_common(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
        n = resnet_blocks_per_stage(depth)
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown ResNet shortcut option {shortcut!r}; expected 'A' or 'B'")

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        stages = []
        in_planes = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(in_planes, width, stride, shortcut, dropout))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_channels, H, W]``, H, W >= 8."""
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
