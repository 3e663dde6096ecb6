"""torchvision's ResNet (v1.5: Bottleneck strides on its 3x3 conv) in Flax.

ResNeXt and Wide ResNet are the same network with a wider or grouped 3x3 conv in
every Bottleneck (torchvision's `groups` and `width_per_group`), so they share
the classes, the stages and the state_dict key names.

Submodules are named so that the torch state_dict key follows from the Flax path
by one rule (`layer1_0/downsample_0` <-> `layer1.0.downsample.0`); see
`porting.torchvision`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jtransfer.errors import ConfigError
from jtransfer.models import _stages
from jtransfer.models.conv import PreparedConv
from jtransfer.models.layers import (
    BatchNorm,
    conv_init,
    global_avg_pool,
    head_init,
    max_pool_3x3_s2,
    param_dtype_for,
)

Array = jax.Array
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")


class BasicBlock(nn.Module):
    """Two 3x3 convs; ResNet-18/34."""

    features: int
    stride: int
    conv: Any
    norm: Any
    expansion = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        identity = x
        y = self.conv(self.features, (3, 3), (self.stride, self.stride), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            identity = self.conv(
                self.features, (1, 1), (self.stride, self.stride), padding=0, name="downsample_0"
            )(x)
            identity = self.norm(name="downsample_1")(identity)
        return nn.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5; grouped for ResNeXt) -> 1x1 x4; ResNet-50/101/152.

    As torchvision's: the inner width is `int(features * width_per_group / 64) *
    groups` (`features` for ResNet, 2x for Wide ResNet, 32x4d = 32 groups of 4
    channels at the first stage for ResNeXt).
    """

    features: int
    stride: int
    conv: Any
    norm: Any
    groups: int = 1
    width_per_group: int = 64
    expansion = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = self.features * self.expansion
        width = int(self.features * (self.width_per_group / 64.0)) * self.groups
        identity = x
        y = self.conv(width, (1, 1), padding=0, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(
            width,
            (3, 3),
            (self.stride, self.stride),
            feature_group_count=self.groups,
            name="conv2",
        )(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(out, (1, 1), padding=0, name="conv3")(y)
        y = self.norm(name="bn3")(y)
        if self.stride != 1 or x.shape[-1] != out:
            identity = self.conv(
                out, (1, 1), (self.stride, self.stride), padding=0, name="downsample_0"
            )(x)
            identity = self.norm(name="downsample_1")(identity)
        return nn.relu(y + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet.

    Attributes:
        stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        block_cls: BasicBlock or Bottleneck.
        groups: groups of every Bottleneck's 3x3 conv (32 or 64 for ResNeXt).
        width_per_group: channels per group at the first stage, as torchvision's
            (64 for ResNet, 128 for Wide ResNet, 4 or 8 for ResNeXt).
        num_classes: rows of `fc`.
        dtype: compute dtype. bfloat16 / float16 keep params, BatchNorm statistics
            and logits float32; float64 (jax x64 enabled, float64 params) makes
            everything float64, for exact comparisons with torch float64.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    groups: int = 1
    width_per_group: int = 64
    num_classes: int = 1000
    dtype: Any = jnp.float32

    stages = STAGES

    def __call__(self, x: Array, train: bool = False, frozen_stages: int | Array = 0) -> Array:
        """Logits (N, num_classes) for ImageNet-normalised NHWC images."""
        return self._forward(x, train, frozen_stages, until="fc")["fc"]

    def features(self, x: Array, train: bool = False, frozen_stages: int | Array = 0) -> Array:
        """Pre-logits: the globally pooled layer4 output, (N, 512 or 2048)."""
        return self._forward(x, train, frozen_stages, until="pool")["pool"]

    def feature_maps(
        self, x: Array, train: bool = False, frozen_stages: int | Array = 0
    ) -> dict[str, Array]:
        """Every stage's output by name: stem, layer1..layer4, pool, fc."""
        return self._forward(x, train, frozen_stages, until="fc")

    @nn.compact
    def _forward(self, x, train, frozen_stages, until):
        param_dtype = param_dtype_for(self.dtype)
        conv = partial(
            nn.Conv,
            use_bias=False,
            padding=1,
            dtype=self.dtype,
            param_dtype=param_dtype,
            kernel_init=conv_init,
            conv_general_dilated_cls=PreparedConv,
        )

        def norm(stage):
            use_ra = _stages.bn_uses_running_average(train, frozen_stages, stage)
            return partial(
                BatchNorm, use_running_average=use_ra, dtype=self.dtype, param_dtype=param_dtype
            )

        out = {}
        x = x.astype(self.dtype)
        x = conv(64, (7, 7), (2, 2), padding=3, name="conv1")(x)
        x = nn.relu(norm(0)(name="bn1")(x))
        x = max_pool_3x3_s2(x)
        out["stem"] = x = _stages.end_of_stage(x, frozen_stages, 0)
        if self.block_cls is BasicBlock and (self.groups, self.width_per_group) != (1, 64):
            # torchvision refuses the same: BasicBlock has no grouped or wide form.
            raise ConfigError("BasicBlock only supports groups=1 and width_per_group=64")
        widths = (
            {}
            if self.block_cls is BasicBlock
            else {"groups": self.groups, "width_per_group": self.width_per_group}
        )
        for i, n_blocks in enumerate(self.stage_sizes):
            stage = i + 1
            for j in range(n_blocks):
                stride = 2 if stage > 1 and j == 0 else 1
                block = self.block_cls(
                    64 * 2**i, stride, conv, norm(stage), **widths, name=f"layer{stage}_{j}"
                )
                x = block(x)
            out[f"layer{stage}"] = x = _stages.end_of_stage(x, frozen_stages, stage)
        out["pool"] = x = global_avg_pool(x)
        if until == "pool":
            return out
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=param_dtype,
            kernel_init=head_init,
            name="fc",
        )(x)
        out["fc"] = logits.astype(param_dtype)
        return out


# Bottleneck variants spell out groups and width_per_group: `fit.infer_arch` tells
# resnet50 from resnext50_32x4d by comparing a module's attributes with these.
VARIANTS = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, groups=1, width_per_group=64),
    "resnet101": dict(
        stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck, groups=1, width_per_group=64
    ),
    "resnet152": dict(
        stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck, groups=1, width_per_group=64
    ),
    "resnext50_32x4d": dict(
        stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, groups=32, width_per_group=4
    ),
    "resnext101_32x8d": dict(
        stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck, groups=32, width_per_group=8
    ),
    "resnext101_64x4d": dict(
        stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck, groups=64, width_per_group=4
    ),
    "wide_resnet50_2": dict(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, width_per_group=128),
    "wide_resnet101_2": dict(stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck, width_per_group=128),
}
