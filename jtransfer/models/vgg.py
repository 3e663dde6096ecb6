"""torchvision's VGG (11/13/16/19, with and without BatchNorm) in Flax.

Layer indices follow torchvision's `nn.Sequential` numbering, so Flax names
`features_7` and `classifier_6` are torch's `features.7` and `classifier.6`.
The first classifier Linear consumes the 7x7x512 map flattened in NHWC order;
porting permutes torch's channel-first weight once (`FLATTEN_INPUTS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jtransfer.models import _stages
from jtransfer.models.conv import PreparedConv
from jtransfer.models.layers import (
    BatchNorm,
    adaptive_avg_pool2d,
    conv_init,
    head_init,
    max_pool_2x2,
    param_dtype_for,
)

Array = jax.Array
M = "M"
STAGES = ("block1", "block2", "block3", "block4", "block5", "classifier")
# Dense layers whose input is a flattened (C, H, W) map in torch.
FLATTEN_INPUTS = {"classifier_0": (512, 7, 7)}

# torch.nn.Linear's default init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)).
_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class VGG(nn.Module):
    """torchvision.models.VGG.

    Attributes:
        cfg: channels per conv, "M" for a 2x2 max-pool (torchvision's cfgs A/B/D/E).
        batch_norm: whether each conv is followed by BatchNorm.
        num_classes: rows of `classifier_6`.
        dropout: classifier dropout rate (torch: 0.5); active only when train=True
            and a "dropout" rng is given.
        dtype: compute dtype; as for `ResNet` (float64: everything float64).
    """

    cfg: Sequence[int | str]
    batch_norm: bool = False
    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32

    stages = STAGES

    def __call__(self, x: Array, train: bool = False, frozen_stages: int | Array = 0) -> Array:
        """Logits (N, num_classes) for ImageNet-normalised NHWC images."""
        return self._forward(x, train, frozen_stages, until="classifier")["classifier"]

    def features(self, x: Array, train: bool = False, frozen_stages: int | Array = 0) -> Array:
        """Pre-logits: the 4096-d input of `classifier_6`."""
        return self._forward(x, train, frozen_stages, until="prelogits")["prelogits"]

    def feature_maps(
        self, x: Array, train: bool = False, frozen_stages: int | Array = 0
    ) -> dict[str, Array]:
        """Every stage's output by name: block1..block5 (each pool), pool, prelogits, classifier."""
        return self._forward(x, train, frozen_stages, until="classifier")

    @nn.compact
    def _forward(self, x, train, frozen_stages, until):
        out = {}
        param_dtype = param_dtype_for(self.dtype)
        x = x.astype(self.dtype)
        idx, block = 0, 0
        for v in self.cfg:
            if v == M:
                x = max_pool_2x2(x)
                out[f"block{block + 1}"] = x = _stages.end_of_stage(x, frozen_stages, block)
                block += 1
                idx += 1
                continue
            x = nn.Conv(
                v,
                (3, 3),
                padding=1,
                dtype=self.dtype,
                param_dtype=param_dtype,
                kernel_init=conv_init,
                conv_general_dilated_cls=PreparedConv,
                name=f"features_{idx}",
            )(x)
            idx += 1
            if self.batch_norm:
                use_ra = _stages.bn_uses_running_average(train, frozen_stages, block)
                x = BatchNorm(
                    use_running_average=use_ra,
                    dtype=self.dtype,
                    param_dtype=param_dtype,
                    name=f"features_{idx}",
                )(x)
                idx += 1
            x = nn.relu(x)
            idx += 1
        out["pool"] = x = adaptive_avg_pool2d(x, (7, 7))
        x = x.reshape(x.shape[0], -1)
        dense = dict(dtype=self.dtype, param_dtype=param_dtype, kernel_init=_linear_init)
        for i in (0, 3):
            x = nn.relu(nn.Dense(4096, name=f"classifier_{i}", **dense)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        out["prelogits"] = x
        if until == "prelogits":
            return out
        dense["kernel_init"] = head_init
        logits = nn.Dense(self.num_classes, name="classifier_6", **dense)(x)
        out["classifier"] = logits.astype(param_dtype)
        return out


_CFGS = {
    "A": (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),
    "B": (64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),
    "D": (64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M),
    "E": (
        64,
        64,
        M,
        128,
        128,
        M,
        256,
        256,
        256,
        256,
        M,
        512,
        512,
        512,
        512,
        M,
        512,
        512,
        512,
        512,
        M,
    ),
}

VARIANTS = {
    f"vgg{depth}{'_bn' if bn else ''}": dict(cfg=_CFGS[cfg], batch_norm=bn)
    for depth, cfg in ((11, "A"), (13, "B"), (16, "D"), (19, "E"))
    for bn in (False, True)
}
