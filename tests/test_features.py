"""jtransfer.features: stage outputs by name, cached embeddings, the linear probe and its head.

Compiling a ResNet-18 forward pass costs seconds on 2 cores, so the tests share a few shapes:
(3, 32, 32, 3) batches for `extract`, 16-image batches at 32 px for embeddings.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtransfer as jt
from jtransfer import data, features, heads, partition, train
from jtransfer.errors import ConfigError
from jtransfer.models import vgg

# Training machinery, not convolution numerics: XLA's own convolutions, which
# compile much faster (tests/conftest.py).
XLA_CONVOLUTIONS = True

SIZE = 32  # model input; the generated images are 64 px
BATCH = 3
EMBED = dict(arch="resnet18", image_size=SIZE, batch_size=16)


def random_variables(model, seed: int = 0):
    return jt.models.random_variables(model, SIZE, seed)


@functools.cache
def model_and_variables(arch: str = "resnet18"):
    if arch == "tiny_vgg":  # not registered: any module with `stages` and `feature_maps` works
        model = vgg.VGG(cfg=(16, "M", 16, "M", 32, "M", 32, "M", 32, "M"), batch_norm=True)
    else:
        model = jt.models.create(arch)
    return model, random_variables(model)


@functools.cache
def reference_maps(model):
    return jax.jit(functools.partial(model.apply, train=False, method=model.feature_maps))


def every_stage(model) -> tuple[str, ...]:
    return (*features.feature_levels(model), "prelogits", "logits")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    train_folder = data.make_demo_imagefolder(root / "train", n_per_class=30, size=64, seed=1)
    test_folder = data.make_demo_imagefolder(root / "test", n_per_class=10, size=64, seed=2)
    return train_folder, test_folder


# ---------------------------------------------------------------------------
# extract


@pytest.mark.parametrize("arch", ["resnet18", "tiny_vgg"])
def test_each_stage_is_the_models_own_output_in_eval_mode(arch):
    model, variables = model_and_variables(arch)
    x = images(BATCH)
    out = features.extract(model, variables, x, stages=every_stage(model))
    maps = reference_maps(model)(variables, x)
    for name in features.feature_levels(model):
        np.testing.assert_allclose(out[name], maps[name], rtol=1e-5, atol=1e-4)
    pre = maps["pool" if arch == "resnet18" else "prelogits"]
    np.testing.assert_allclose(out["prelogits"], pre, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["logits"], maps[model.stages[-1]], rtol=1e-5, atol=1e-4)


def test_stage_names_follow_the_forward_order():
    resnet, _ = model_and_variables()
    assert features.stage_names(resnet)[:6] == ("stem", "layer1", "layer2", "layer3", "layer4",
                                                "pool")  # fmt: skip
    assert features.stage_names(resnet)[-2:] == ("prelogits", "logits")
    vgg16_bn = jt.models.create("vgg16_bn")
    assert features.feature_levels(vgg16_bn) == tuple(f"block{i}" for i in range(1, 6))


def test_integer_indices_are_timms_out_indices():
    model, variables = model_and_variables()
    indices = (0, 1, 2, 3, -1, "prelogits", "logits")  # the compiled every_stage() call
    out = features.extract(model, variables, images(BATCH), stages=indices)
    assert list(out) == ["stem", "layer1", "layer2", "layer3", "layer4", "prelogits", "logits"]
    assert out["layer1"].shape == (BATCH, 8, 8, 64)
    assert out["layer4"].shape == (BATCH, 1, 1, 512) and out["prelogits"].shape == (BATCH, 512)


def test_an_unknown_stage_lists_the_valid_names():
    model, variables = model_and_variables()
    with pytest.raises(ConfigError, match=r"'block3'.*stem, layer1, layer2.*prelogits"):
        features.extract(model, variables, images(1), stages=("layer4", "block3"))
    with pytest.raises(ConfigError, match="7"):
        features.extract(model, variables, images(1), stages=7)


def test_one_compilation_per_batch_shape_and_batching_does_not_change_features(monkeypatch):
    model, variables = model_and_variables()
    shapes = []
    real = features._stage_outputs

    def spy(model, keys, variables, x):
        shapes.append(x.shape)
        return real(model, keys, variables, x)

    monkeypatch.setattr(features, "_stage_outputs", spy)
    x = images(7, seed=1)
    out = features.extract(model, variables, x, stages=every_stage(model), batch_size=BATCH)
    assert shapes == [(BATCH, SIZE, SIZE, 3)] * 3  # 3, 3 and 1 padded to 3
    assert out["layer3"].shape[0] == 7 and out["layer3"].dtype == np.float32
    for start in (0, 4):  # other batches around each image
        ref = reference_maps(model)(variables, x[start : start + BATCH])
        np.testing.assert_allclose(
            out["layer3"][start : start + BATCH], ref["layer3"], rtol=1e-5, atol=1e-4
        )


def test_extract_takes_a_loader(folders):
    model, variables = model_and_variables()
    loader = data.make_loader(
        folders[0], batch_size=16, train=False, image_size=SIZE, resize_size=(37, 37)
    )
    out = features.extract(model, variables, loader)["prelogits"]
    assert out.shape == (len(folders[0]), 512)


# ---------------------------------------------------------------------------
# embed_dataset


def test_the_second_embedding_comes_from_the_cache_without_running_the_model(
    folders, tmp_path, monkeypatch
):
    folder = folders[0]
    model, variables = model_and_variables()
    x, y = features.embed_dataset(
        model, variables, folder, cache_dir=tmp_path, weights_id="random init", **EMBED
    )
    assert x.shape == (len(folder), 512) and x.dtype == np.float32
    np.testing.assert_array_equal(y, folder.targets)
    (cache_file,) = tmp_path.glob("*.npz")
    assert cache_file.name.startswith("resnet18-prelogits-random_init-")

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran although the features were cached")

    monkeypatch.setattr(features, "extract", no_model)
    x2, y2 = features.embed_dataset(
        model, variables, folder, cache_dir=tmp_path, weights_id="random init", **EMBED
    )
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    # A new head leaves the pre-logits as they were: still cached. Shuffled samples: same rows.
    new_head = heads.replace_head(variables, "resnet18", 3, seed=5)
    order = np.random.default_rng(0).permutation(len(folder))
    samples = [folder.samples[i] for i in order]
    x3, y3 = features.embed_dataset(
        model, new_head, samples, cache_dir=tmp_path, weights_id="random init", **EMBED
    )
    np.testing.assert_array_equal(x3, x[order])
    np.testing.assert_array_equal(y3, y[order])
    # The evaluation pipeline made them: equal to the features of make_loader's eval batches.
    monkeypatch.undo()
    loader = data.make_loader(
        folder, batch_size=16, train=False, image_size=SIZE, resize_size=(37, 37)
    )
    from_loader = features.extract(model, variables, loader)["prelogits"]
    np.testing.assert_allclose(from_loader, x, rtol=1e-5, atol=1e-4)


def test_embeddings_use_the_weights_view_normalised_on_the_device(folders, tmp_path):
    """A timm view (bicubic, crop_pct, its own mean and std) drives the embedding: the features
    are those of the host's float32 view, and the view is part of the cache key."""
    from jtransfer.preprocess import Preprocessing

    model, variables = model_and_variables()
    samples = folders[1].samples[:16]
    view = Preprocessing.from_pretrained_cfg(
        {
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "input_size": [3, SIZE, SIZE],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.25, 0.5],
        }
    )
    kwargs = dict(arch="resnet18", batch_size=16, cache_dir=tmp_path)
    x, _ = features.embed_dataset(model, variables, samples, preprocessing=view, **kwargs)
    host = np.stack([view.eval(data.load_image(path)) for path, _ in samples])
    assert host.dtype == np.float32 and host.shape == (16, SIZE, SIZE, 3)
    expected = features.extract(model, variables, host)["prelogits"]
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    # The d2l view of the same images is another embedding, in another cache file.
    d2l, _ = features.embed_dataset(model, variables, samples, image_size=SIZE, **kwargs)
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not np.allclose(d2l, x)
    # image_size rescales the view as with_crop_size does: resize floor(24 / 0.9) = 26.
    small, _ = features.embed_dataset(
        model, variables, samples[:4], preprocessing=view, image_size=24, **kwargs
    )
    small_view = view.with_crop_size(24)
    assert small_view.resize_size == 26
    host = np.stack([small_view.eval(data.load_image(path)) for path, _ in samples[:4]])
    np.testing.assert_allclose(
        small, features.extract(model, variables, host)["prelogits"], rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ConfigError, match="Preprocessing"):
        features.embed_dataset(model, variables, samples, preprocessing={"mean": 0}, **kwargs)


def test_changed_images_or_weights_miss_the_cache(folders, tmp_path, monkeypatch):
    model, variables = model_and_variables()
    samples = folders[1].samples[:6]
    features.embed_dataset(model, variables, samples, cache_dir=tmp_path, **EMBED)
    calls = []
    real = features.extract

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "extract", counting)
    other = jax.tree.map(lambda a: a * 1.01, variables)
    features.embed_dataset(model, other, samples, cache_dir=tmp_path, **EMBED)
    assert len(calls) == 1
    path = samples[0][0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    features.embed_dataset(model, variables, samples, cache_dir=tmp_path, **EMBED)
    assert len(calls) == 2
    features.embed_dataset(model, variables, samples, cache_dir=tmp_path, **EMBED)
    assert len(calls) == 2
    assert len(list(tmp_path.glob("*.npz"))) == 3 and not list(tmp_path.glob(".*"))


def test_weights_hash_sees_every_byte_and_can_leave_the_head_out():
    _, variables = model_and_variables()
    h = features.weights_hash(variables)
    assert h == features.weights_hash(jax.tree.map(jnp.asarray, variables))
    bumped = jax.tree.map(np.copy, variables)
    bumped["batch_stats"]["bn1"]["var"][3] += 1e-6
    assert features.weights_hash(bumped) != h
    new_head = heads.replace_head(variables, "resnet18", 2)
    assert features.weights_hash(new_head, exclude=["fc"]) == features.weights_hash(
        variables, exclude=["fc"]
    )


# ---------------------------------------------------------------------------
# fit_linear_probe and insert_head


def toy(n=60, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(d, 3)), axis=1).astype(np.int32)  # linearly separable
    return x, y


@pytest.mark.parametrize("method", ["sgd", "adam", "lbfgs"])
def test_every_method_fits_a_separable_problem(method):
    x, y = toy()
    lr = {"sgd": 0.5, "adam": 0.05, "lbfgs": None}[method]
    head = features.fit_linear_probe(x, y, 3, method=method, epochs=60, lr=lr, batch_size=16)
    assert head["kernel"].shape == (6, 3) and head["bias"].shape == (3,)
    assert features.probe_accuracy(head, x, y) >= 0.95


def test_lbfgs_weight_decay_is_the_l2_penalty_of_coupled_decay():
    x, y = toy()
    wd = 0.1
    head = features.fit_linear_probe(x, y, 3, method="lbfgs", weight_decay=wd, epochs=200)

    def objective(h):
        ce = -jax.nn.log_softmax(features.probe_logits(h, x))[np.arange(len(y)), y].mean()
        return ce + 0.5 * wd * sum((p**2).sum() for p in jax.tree.leaves(h))

    grad = jax.jit(jax.grad(objective))(head)
    assert max(float(abs(g).max()) for g in jax.tree.leaves(grad)) < 1e-4


def test_probe_visits_examples_in_the_training_loaders_order(folders):
    folder = folders[0]
    loader = data.make_loader(folder, batch_size=8, train=True, seed=3, num_epochs=None)
    for epoch in (0, 1):
        order = features.epoch_order(len(folder), 3, epoch).tolist()
        assert order[: loader.steps_per_epoch * 8] == loader.epoch_order(epoch)


def test_bad_probe_arguments_are_config_errors():
    x, y = toy()
    with pytest.raises(ConfigError, match="labels must lie"):
        features.fit_linear_probe(x, y, 2)
    with pytest.raises(ConfigError, match="method"):
        features.fit_linear_probe(x, y, 3, method="newton")
    with pytest.raises(ConfigError, match="lbfgs takes no lr"):
        features.fit_linear_probe(x, y, 3, method="lbfgs", lr=0.1)
    with pytest.raises(ConfigError, match=r"\(N, D\)"):
        features.fit_linear_probe(x[:, :, None], y, 3)


def test_the_probe_is_a_frozen_backbone_finetune_on_cached_features(folders, tmp_path):
    """Same head init, same batches in the same order, same SGD: the same head comes out.

    The fine-tune is torch's feature extraction (requires_grad=False on the body, a new fc)
    without augmentation: the evaluation view of each image for training too.
    """
    arch, lr, epochs, batch = "resnet18", 0.05, 6, 20
    train_folder, test_folder = folders
    backbone, variables = model_and_variables(arch)
    # The pre-logits do not depend on the head: embed with the ImageNet-sized model.
    x, y = features.embed_dataset(backbone, variables, train_folder, cache_dir=tmp_path, **EMBED)
    x_test, y_test = features.embed_dataset(
        backbone, variables, test_folder, cache_dir=tmp_path, **EMBED
    )
    head = features.fit_linear_probe(
        x, y, 2, method="sgd", lr=lr, momentum=0.9, epochs=epochs, batch_size=batch, seed=0
    )

    model = jt.models.create(arch, num_classes=2)
    variables = heads.replace_head(variables, arch, 2, seed=0)
    rules = partition.preset(arch, "head")
    tx = partition.make_optimizer(variables["params"], rules, learning_rate=lr, momentum=0.9)
    state = train.create_train_state(model, variables, tx)
    step = train.make_train_step(
        model, tx, loss_reduction="mean", frozen_stages=partition.frozen_prefix(arch, rules)
    )
    (everything,) = data.make_loader(
        train_folder, batch_size=len(train_folder), train=False, image_size=SIZE,
        resize_size=(37, 37),
    )  # fmt: skip
    for epoch in range(epochs):
        order = features.epoch_order(len(train_folder), 0, epoch)
        for rows in order.reshape(-1, batch):
            batch_ = {"image": everything["image"][rows], "label": everything["label"][rows]}
            state, _ = step(state, batch_)

    np.testing.assert_allclose(head["kernel"], state.params["fc"]["kernel"], atol=1e-5)
    np.testing.assert_allclose(head["bias"], state.params["fc"]["bias"], atol=1e-5)
    probe_acc = features.probe_accuracy(head, x_test, y_test)
    assert probe_acc == features.probe_accuracy(state.params["fc"], x_test, y_test)
    assert probe_acc > 0.6  # random weights, but colour survives into the features
    frozen_stats = variables["batch_stats"]["bn1"]["var"]
    np.testing.assert_array_equal(state.batch_stats["bn1"]["var"], frozen_stats)


def test_an_inserted_head_predicts_and_exports_to_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    import porting

    _, variables = model_and_variables()
    rng = np.random.default_rng(0)
    head = {"kernel": rng.normal(size=(512, 4)).astype(np.float32), "bias": np.arange(4.0)}
    new = features.insert_head(variables, "resnet18", head)
    x = images(BATCH)
    model = jt.models.create("resnet18", num_classes=4)
    out = features.extract(model, new, x, stages=("prelogits", "logits"))
    np.testing.assert_allclose(
        out["logits"], features.probe_logits(head, out["prelogits"]), rtol=1e-5, atol=1e-4
    )
    net = torchvision.models.resnet18(num_classes=4).eval()
    net.load_state_dict(porting.to_torchvision(new, "resnet18"), strict=True)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(out["logits"], theirs, rtol=1e-4, atol=1e-3)
    with pytest.raises(ConfigError, match=r"kernel \(512, C\)"):
        features.insert_head(
            variables, "resnet18", {"kernel": np.zeros((4096, 2)), "bias": np.zeros(2)}
        )
