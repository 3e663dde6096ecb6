"""How a model's stages behave in train mode when a prefix of them is frozen.

Both families are a sequence of named stages (ResNet: stem, layer1..layer4, fc;
VGG: block1..block5, classifier). `frozen_stages = k` freezes the first k:

* a Python int is static: frozen stages run BatchNorm on running statistics and
  their output goes through `jax.lax.stop_gradient`, so no backward pass runs
  through them at all (the cheap way to train a head on a frozen backbone);
* a traced integer scalar changes per call without re-compiling (gradual
  unfreezing): frozen stages still run BatchNorm on running statistics and keep
  `batch_stats` bit-identical, but gradients are computed and must be zeroed by
  the optimizer (see `jtransfer.partition`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def bn_uses_running_average(train: bool, frozen_stages: int | Array, stage: int) -> bool | Array:
    """Whether BatchNorm layers of stage `stage` run in eval mode."""
    if not train:
        return True
    if isinstance(frozen_stages, int):
        return stage < frozen_stages
    return jnp.asarray(stage) < frozen_stages


def end_of_stage(x: Array, frozen_stages: int | Array, stage: int) -> Array:
    """Stops gradients at the end of a statically frozen prefix."""
    if isinstance(frozen_stages, int) and stage == frozen_stages - 1:
        return jax.lax.stop_gradient(x)
    return x
