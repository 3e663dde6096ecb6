"""uint8 batches normalised on the device: the same bits as float32 batches normalised on the host.

A uint8 batch is the pixels torchvision holds before ``ToTensor`` (a quarter of the bytes of
the float32 batch to move between processes and to the device); every compiled function that
takes batches normalises it inside (`train.normalize_images`). These tests compare each path
with the float32 one on the same pixels, normalised on the host by
`data.to_normalized_array`, bit for bit: train and eval steps, `fit` with evaluation,
`evaluate`, `predict`, `features.extract`, `lr_find`, the NNX step, and a data-parallel step
on two devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jtransfer as jt
from jtransfer import data, features, fit, partition, train
from jtransfer.errors import ConfigError

# Input handling, not convolution numerics: XLA's own convolutions compile much faster
# (tests/conftest.py); the normalised input is the same either way.
XLA_CONVOLUTIONS = True

SIZE = 32
BATCH = 4
NUM_CLASSES = 3
OTHER_MEAN = (0.5, 0.4, 0.3)  # e.g. a timm checkpoint's preprocessing
OTHER_STD = (0.25, 0.2, 0.3)


def host_normalized(pixels: np.ndarray, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD):
    """The float32 path: each image through the host transform."""
    return np.stack([data.to_normalized_array(p, mean, std) for p in pixels])


def pixels(seed: int, n: int = BATCH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), np.uint8)


def labels(seed: int, n: int = BATCH) -> np.ndarray:
    return np.random.default_rng(seed + 100).integers(0, NUM_CLASSES, n).astype(np.int32)


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_same_bits(a, b) -> None:
    """Every leaf of two pytrees has the same dtype, shape and bytes."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    differ = [k for k in fa if fa[k].dtype != fb[k].dtype or fa[k].tobytes() != fb[k].tobytes()]
    assert not differ, f"{len(differ)} leaves differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def model():
    return jt.models.create("resnet18", num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def variables(model):
    return jt.models.random_variables(model, image_size=SIZE)


@pytest.fixture(scope="module")
def tx():
    return optax.sgd(0.05, momentum=0.9)


@pytest.fixture(scope="module")
def train_step(model, tx):
    # One jitted function for both dtypes: each compiles once, at its first batch.
    return train.make_train_step(model, tx, loss_reduction="mean", return_grads=True)


# ---------------------------------------------------------------------------
# normalize_images


@pytest.mark.parametrize("mean,std", [(None, None), (OTHER_MEAN, OTHER_STD)])
def test_every_pixel_value_matches_the_host_transform(mean, std):
    values = np.repeat(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1), 3, axis=3)
    values = np.concatenate([values, values[:, ::-1, ::-1]])  # (2, 16, 16, 3)
    kwargs = {} if mean is None else {"mean": mean, "std": std}
    want = host_normalized(values, **kwargs)
    jitted = jax.jit(lambda x: train.normalize_images(x, mean, std))
    for got in (train.normalize_images(values, mean, std), jitted(values)):
        got = np.asarray(got)
        assert got.dtype == np.float32 and got.shape == values.shape
        assert got.tobytes() == want.tobytes()


def test_float_images_pass_through_and_other_dtypes_are_refused():
    x = jnp.ones((1, 2, 2, 3), jnp.float32)
    assert train.normalize_images(x) is x
    assert train.normalize_images(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ConfigError, match="uint8 pixels.*int32"):
        train.normalize_images(np.zeros((1, 2, 2, 3), np.int32))
    with pytest.raises(ConfigError, match="channels last"):
        train.normalize_images(np.zeros((1, 3, 2, 2), np.uint8))
    with pytest.raises(ConfigError, match="mean must be 3 numbers"):
        train.check_normalization((0.5, 0.5), None)
    with pytest.raises(ConfigError, match="std must be > 0"):
        train.make_eval_step(jt.models.create("resnet18"), std=(0.2, 0.0, 0.2))


# ---------------------------------------------------------------------------
# Steps


def test_train_step_uint8_is_bit_identical_to_float32(model, variables, tx, train_step):
    s_float = train.create_train_state(model, variables, tx)
    s_uint8 = train.create_train_state(model, variables, tx)
    for seed in range(2):  # the second step reads the first one's momentum and batch_stats
        x = pixels(seed)
        s_float, m_float = train_step(s_float, {"image": host_normalized(x), "label": labels(seed)})
        s_uint8, m_uint8 = train_step(s_uint8, {"image": x, "label": labels(seed)})
        assert_same_bits(m_uint8, m_float)  # loss, the summable metrics and the gradient
    assert_same_bits(s_uint8, s_float)  # params, batch_stats, optimizer state, step
    assert float(m_float["loss"]) > 0


def test_eval_step_uint8_with_other_mean_std(model, variables):
    step = train.make_eval_step(model, mean=OTHER_MEAN, std=OTHER_STD)
    x = pixels(3)
    got = step(variables, {"image": x, "label": labels(3)})
    want = step(variables, {"image": host_normalized(x, OTHER_MEAN, OTHER_STD), "label": labels(3)})
    assert_same_bits(got, want)
    imagenet = train.make_eval_step(model)(variables, {"image": x, "label": labels(3)})
    assert float(imagenet["loss"]) != float(got["loss"])  # the mean and std were used


# ---------------------------------------------------------------------------
# fit, evaluate, predict, features, lr_find, NNX


@pytest.fixture(scope="module")
def demo_pixels(tmp_path_factory):
    """A tiny ImageFolder's images at SIZE px, as uint8 arrays (train 8, test 6)."""
    root = tmp_path_factory.mktemp("uint8_demo")
    out = {}
    for split, n, seed in (("train", 4, 0), ("test", 3, 1)):
        folder = data.make_demo_imagefolder(root / split, n_per_class=n, size=SIZE, seed=seed)
        images = [
            np.asarray(data.resize(data.load_image(path), (SIZE, SIZE)), np.uint8)
            for path, _ in folder.samples
        ]
        out[split] = (np.stack(images), np.asarray([y for _, y in folder.samples], np.int32))
    return out


def batches(x: np.ndarray, y: np.ndarray, size: int, as_float: bool) -> list[dict]:
    x = host_normalized(x) if as_float else x
    return [{"image": x[i : i + size], "label": y[i : i + size]} for i in range(0, len(x), size)]


def test_fit_uint8_is_bit_identical_to_float32(model, variables, demo_pixels):
    # fit compiles its own steps (a mesh, frozen-parameter masks). A frozen backbone keeps
    # them cheap to compile; the uint8 images still go through every layer.
    runs = {}
    for as_float in (True, False):
        state, history = fit.fit(
            model,
            variables,
            partition.preset("resnet18", "head"),
            batches(*demo_pixels["train"], BATCH, as_float),
            batches(*demo_pixels["test"], BATCH, as_float),  # 6 = 4 + a padded 2
            learning_rate=0.01,
            momentum=0.9,
            epochs=2,
            progress=False,
            log=None,
        )
        runs[as_float] = state, history
    (s_float, h_float), (s_uint8, h_uint8) = runs[True], runs[False]
    assert_same_bits(s_uint8, s_float)
    timing = ("examples_per_s", "compile_s", "epoch_s")
    strip = [{k: v for k, v in e.items() if k not in timing} for e in (*h_float, *h_uint8)]
    assert strip[:2] == strip[2:] and strip[0]["test_count"] == 6
    x, y = demo_pixels["test"]
    assert fit.evaluate(model, s_uint8, batches(x, y, 4, False)) == fit.evaluate(
        model, s_uint8, batches(x, y, 4, True)
    )
    # The same compiled function as the evaluation's: batches of 4, the last one padded.
    got = fit.predict(model, s_uint8, x, batch_size=4)
    assert got.tobytes() == fit.predict(model, s_uint8, host_normalized(x), batch_size=4).tobytes()


def test_features_extract_uint8(model, variables, demo_pixels):
    x, _ = demo_pixels["test"]  # 6 images in batches of 4: the last one padded
    stages = ("layer3", "prelogits")
    got = features.extract(model, variables, x, stages=stages, batch_size=4)
    want = features.extract(model, variables, host_normalized(x), stages=stages, batch_size=4)
    assert_same_bits(got, want)
    other = features.extract(
        model, variables, x, stages="prelogits", batch_size=4, mean=OTHER_MEAN, std=OTHER_STD
    )
    host = host_normalized(x, OTHER_MEAN, OTHER_STD)
    want_other = features.extract(model, variables, host, stages="prelogits", batch_size=4)
    assert other["prelogits"].tobytes() == want_other["prelogits"].tobytes()


def test_lr_find_uint8(model, variables, demo_pixels):
    from jtransfer import lr_find

    rules = partition.preset("resnet18", "head")
    results = [
        lr_find.lr_find(
            model,
            variables,
            rules,
            batches(*demo_pixels["train"], BATCH, as_float),
            start_lr=1e-3,
            end_lr=1.0,
            num_steps=3,
        )
        for as_float in (True, False)
    ]
    assert results[0].losses.tobytes() == results[1].losses.tobytes()


def test_nnx_train_step_uint8(model, variables):
    from jtransfer import nnx as jnnx

    rules = partition.preset("resnet18", "head")  # cheap to compile: no backward below fc
    frozen = partition.frozen_prefix("resnet18", rules)
    modules, metrics = [], []
    for as_float in (True, False):
        module = jnnx.from_variables("resnet18", variables)
        opt = jnnx.make_optimizer(module, rules, learning_rate=0.01)
        x = pixels(5)
        batch = {"image": host_normalized(x) if as_float else x, "label": labels(5)}
        metrics.append(jnnx.train_step(module, opt, batch, frozen_stages=frozen))
        modules.append(jnnx.to_variables(module))
    assert_same_bits(metrics[0], metrics[1])
    assert_same_bits(modules[0], modules[1])


_SHARDED = """
import json
import jax, numpy as np, optax
import jtransfer as jt
from jtransfer import partition, train
from tests.test_uint8 import host_normalized, labels, pixels

assert jax.device_count() == 2, jax.devices()
model = jt.models.create("resnet18", num_classes=3)
variables = jt.models.random_variables(model, image_size=32)
rules = partition.preset("resnet18", "head")  # cheap to compile: no backward below fc
tx = partition.make_optimizer(variables["params"], rules, learning_rate=0.01)
mesh = train.data_parallel_mesh()
step = train.make_train_step(
    model, tx, mesh=mesh, frozen_stages=partition.frozen_prefix("resnet18", rules)
)
out = {}
for name in ("float32", "uint8"):
    state = train.create_train_state(model, variables, tx, mesh=mesh)
    x = pixels(7)
    image = host_normalized(x) if name == "float32" else x
    batch = train.shard_batch({"image": image, "label": labels(7)}, mesh)
    out[name + "_devices"] = len(batch["image"].sharding.device_set)
    state, metrics = step(state, batch)
    leaves = jax.tree.leaves(jax.device_get((state, metrics)))
    out[name] = [np.asarray(v).tobytes().hex() for v in leaves]
print(json.dumps(out))
"""


def test_data_parallel_step_uint8_on_two_devices():
    from tests.test_train import run_on_two_cpu_devices

    result = run_on_two_cpu_devices(_SHARDED)
    assert result["uint8_devices"] == result["float32_devices"] == 2
    assert result["uint8"] == result["float32"]


def test_a_uint8_loader_brings_its_mean_and_std(model, variables, tmp_path):
    folder = data.make_demo_imagefolder(tmp_path / "test", n_per_class=3, size=SIZE, seed=2)
    opts = dict(batch_size=4, train=False, image_size=SIZE, resize_size=(SIZE, SIZE))
    stats = dict(mean=OTHER_MEAN, std=OTHER_STD)  # e.g. a timm checkpoint's
    as_uint8 = data.make_loader(folder, dtype=np.uint8, **opts, **stats)
    as_float = data.make_loader(folder, **opts, **stats)
    assert next(iter(as_uint8))["image"].dtype == np.uint8
    assert fit.normalization(None, None, as_uint8) == (OTHER_MEAN, OTHER_STD)
    assert fit.normalization(None, None, as_float) == (None, None)  # normalised already
    with pytest.raises(ConfigError, match="differs from the mean"):
        fit.normalization(data.IMAGENET_MEAN, None, as_uint8)
    # Evaluated with the loader's statistics, not ImageNet's: the float32 loader's numbers.
    assert fit.evaluate(model, variables, as_uint8) == fit.evaluate(model, variables, as_float)


def test_cli_finetune_batch_dtypes_train_to_the_same_bits(tmp_path):
    import contextlib
    import io

    from cli_subprocess import assert_bit_identical, saved_state

    from jtransfer import checkpoint, cli

    root = tmp_path / "data"
    data.make_demo_imagefolder(root / "train", n_per_class=4, size=40, seed=0)
    data.make_demo_imagefolder(root / "test", n_per_class=2, size=40, seed=1)

    def finetune(out, *extra):
        argv = ["finetune", "--data", root, "--weights", "none", "--freeze", "backbone"]
        argv += ["--image-size", "32", "--batch-size", "4", "--epochs", "1", "--out", out]
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = cli.main([str(a) for a in (*argv, *extra)])
        assert code == 0
        return stdout.getvalue()

    finetune(tmp_path / "float32", "--batch-dtype", "float32")
    finetune(tmp_path / "uint8")  # the default
    steps = checkpoint.checkpoint_steps(tmp_path / "uint8")
    assert steps == checkpoint.checkpoint_steps(tmp_path / "float32") == [2]
    assert_bit_identical(saved_state(tmp_path / "uint8", 2), saved_state(tmp_path / "float32", 2))
    # The same bits either way, so the flag is no part of the run: a float32 run resumes as uint8.
    assert "batch_dtype" not in checkpoint.read_metadata(tmp_path / "float32")["config"]
    assert "nothing to do" in finetune(tmp_path / "float32")
