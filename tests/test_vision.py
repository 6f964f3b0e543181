"""Vision models (ViT, ResNet, the CNN) on the simulated meshes: the same loss, gradients and BatchNorm statistics on
every mesh; BatchNorm statistics that are those of the global batch, sharded in the train state; bad configs.

Meshes and helpers as in test_sharding.py: fp32, sharded reductions add in a different order, so values agree within
the bounds of tests/tolerance.py for the sums they went through (vision_sum_lengths below).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sharding import on_mesh
from tolerance import (
    assert_close_after_reordering,
    assert_sgd_params_close_after_reordering,
    float32_sum_tolerance,
    transformer_sum_lengths,
)

from bigjax import config as config_lib
from bigjax.models.resnet import DEPTHS
from bigjax.run import state as state_lib
from bigjax.run import step as step_lib
from bigjax.tasks import make_task

# One device, pure data parallel (BatchNorm statistics averaged over 8), and every axis split at once.
MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2)]

# Tiny members of each family: channel and head counts that split over every test mesh.
TINY_MODELS = {
    "vit": dict(num_layers=2, d_model=32, num_heads=4, patch_size=4),
    "vit_gap": dict(num_layers=2, d_model=32, num_heads=4, patch_size=4, pooling="gap", position_embedding="sincos2d"),
    "resnet": dict(depth=10, width=8, stem="cifar"),
    "resnet_groupnorm": dict(depth=10, width=8, stem="cifar", normalization="groupnorm", norm_groups=4),
    "resnet_scan": dict(depth=18, width=8, stem="imagenet", scan_layers=True, remat="full"),
    "cnn": dict(features=(8, 16), hidden_dim=32),
    "cnn_batchnorm": dict(features=(8, 16), hidden_dim=32, normalization="batchnorm"),
}


def vision_config(variant: str, *overrides: str, image_size: int = 8, channels: int = 3):
    """A tiny image classifier's config, built and checked as an experiment file's would be."""
    config = config_lib.defaults(model=variant.split("_")[0], task="classification")
    config.model.update(TINY_MODELS[variant])
    config.task.num_classes = 10
    config.batch_size = 8
    config.data.update(dict(source="synthetic", image_size=image_size, channels=channels))
    config.optim.update(dict(lr=1e-2, warmup_steps=0))
    config_lib.check_schema(config, config_lib.schema_for(config))
    for override in overrides:
        config_lib.apply_override(config, override)
    config_lib.check_values(config)
    return config


def vision_sum_lengths(config) -> list:
    """The sums an image model's loss and gradients go through: a ViT's as a Transformer's over its patches (and the
    patch embedding's pixels); a convolutional net's layer by layer (conv_sum_lengths)."""
    m, images, size = config.model, config.batch_size, config.data.image_size
    if m.family == "vit":
        tokens = (size // m.patch_size) ** 2 + (m.pooling != "gap")  # the patches and the class token
        d, classes = m.d_model, config.task.num_classes
        lengths = transformer_sum_lengths(images * tokens, classes, d, m.mlp_dim or 4 * d, tokens, m.num_layers)
        return lengths + [m.patch_size**2 * config.data.channels]
    return conv_sum_lengths(config)


def conv_sum_lengths(config) -> list:
    """A convolutional net's sums, layer by layer along its deepest path: a kernel's gradient over the batch's
    positions (the input's, the most); through each convolution forward (its window: kernel area x input channels)
    and back (kernel area x output channels), counted at the stage's widest; its norm's statistics forward (mean and
    variance) and their two means going back, over the batch's pixels at that layer's resolution (BatchNorm: the
    sums the data-parallel devices split) or a group's pixels and channels (GroupNorm); then the pooling, the dense
    layers and the softmax."""
    m, images, size = config.model, config.batch_size, config.data.image_size
    up = lambda n: -(-n // 2)  # a stride of 2 (or a 2x2 pool), padded

    def conv_layer(window: int, channels: int, resolution: int) -> list:
        pixels = resolution * resolution
        norm = {"batchnorm": images * pixels, "groupnorm": pixels * channels // m.norm_groups}.get(m.normalization)
        return [window, window] + [norm] * 4 if norm else [window, window]

    lengths = [images * size * size]
    if m.family == "cnn":  # a 3x3 convolution then a 2x2 pool per entry of features; then two dense layers
        resolution, widths = size, [config.data.channels, *m.features]
        for width_in, width in zip(widths, widths[1:], strict=False):
            lengths += conv_layer(9 * max(width_in, width), width, resolution)
            resolution //= 2
        return lengths + [resolution * resolution * widths[-1], m.hidden_dim, config.task.num_classes]
    kind, blocks = DEPTHS[m.depth]
    convs, expansion = (2, 1) if kind == "basic" else (3, 4)  # per block; a bottleneck's output is 4x wider
    kernel, resolution = (3, size) if m.stem == "cifar" else (7, up(size))
    lengths += conv_layer(kernel * kernel * config.data.channels, m.width, resolution)
    resolution = resolution if m.stem == "cifar" else up(resolution)  # the ImageNet stem's max pool
    for stage, count in enumerate(blocks):
        resolution = resolution if stage == 0 else up(resolution)
        widest = m.width * 2**stage * expansion
        lengths += conv_layer(9 * widest, widest, resolution) * (count * convs)
    return lengths + [resolution * resolution, widest, config.task.num_classes]


def image_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.batch_size, config.data.image_size, config.data.image_size, config.data.channels)
    weights = np.ones(config.batch_size, np.float32)
    weights[-1] = 0  # a padding row
    return {
        "image": rng.normal(size=shape).astype(np.float32),
        "labels": rng.integers(0, config.task.num_classes, config.batch_size).astype(np.int32),
        "label_weights": weights,
    }


def random_variables(task, seed=0):
    """The model's variables filled with random values on the host. Not its initializers: XLA compiles each
    random initializer for seconds on a CPU, more than the rest of a test; and their zeros (the head, the last
    norm of each residual branch) would zero most gradients, which an equivalence test must not compare."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "var":  # BatchNorm's running variance: positive
            return np.ones(leaf.shape, np.float32) + 0.1 * np.abs(noise)
        return (1.0 if name == "scale" else 0.0) + 0.1 * noise

    shapes = nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(fill, shapes)


def train_loss_grads_and_state(setup, variables, batch):
    """Mean training loss, its gradients and the updated model state (BatchNorm statistics) on the setup's mesh."""

    def mean_loss(params, model_state, b):
        sums, new_state = setup.task.loss_sums(params, model_state, b, jax.random.key(1), train=True)
        return sums["loss"] / sums["count"], new_state

    params, model_state = state_lib.split_variables(variables)
    param_shardings, state_shardings = setup.state_shardings.params, setup.state_shardings.model_state
    fn = jax.jit(
        jax.value_and_grad(mean_loss, has_aux=True),
        in_shardings=(param_shardings, state_shardings, setup.sharding.batch),
    )
    with setup.sharding.activate():
        (loss, new_state), grads = fn(
            jax.device_put(params, param_shardings),
            jax.device_put(model_state, state_shardings),
            setup.sharding.global_batch(batch),
        )
    return jax.device_get((loss, grads, new_state))


@pytest.mark.parametrize("variant", ["vit", "resnet", "cnn"])
def test_loss_gradients_and_batch_statistics_match_on_every_mesh(variant):
    config = vision_config(variant)
    task, batch = make_task(config), image_batch(config)
    host_variables = random_variables(task)
    reference = None
    for shape in MESHES:
        result = train_loss_grads_and_state(on_mesh(config, shape), host_variables, batch)
        if reference is None:
            reference = result
            continue
        tolerance = float32_sum_tolerance(*vision_sum_lengths(config))
        np.testing.assert_allclose(result[0], reference[0], rtol=tolerance, err_msg=f"loss on mesh {shape}")
        assert_close_after_reordering(result[1], reference[1], tolerance, f"gradients on mesh {shape}")
        assert_close_after_reordering(result[2], reference[2], tolerance, f"batch statistics on mesh {shape}")
    loss, grads, new_state = reference
    assert np.isfinite(loss) and all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
    if variant == "resnet":  # BatchNorm: every running statistic moved
        moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), new_state, state_lib.split_variables(host_variables)[1])
        assert moved.keys() == {"batch_stats"} and all(m > 0 for m in jax.tree.leaves(moved))
    else:
        assert new_state == {}


def test_scanned_resnet_train_steps_match_on_every_mesh_with_global_sharded_batch_statistics():
    """The compiled train step of a scanned, rematerialized ResNet gives the same parameters and statistics on
    each mesh, step after step. After the first step, the stem's running mean is 0.9 * its old value + 0.1 * the
    channel mean over *all* 8 examples (not over one device's share), and the statistics are split like their
    channels."""
    # SGD without clipping: the update is linear in the gradient (see test_sharding.test_train_steps_match_...).
    config = vision_config("resnet_scan", "config.optim.name=sgd", "config.optim.clip=0", image_size=16)
    tolerance = float32_sum_tolerance(*vision_sum_lengths(config))
    variables = random_variables(make_task(config))
    batches = [image_batch(config, seed) for seed in range(2)]
    old_mean = variables["batch_stats"]["stem_norm"]["mean"]
    expected_mean = 0.9 * old_mean + 0.1 * stem_channel_mean(batches[0]["image"], variables["params"]["stem"]["kernel"])
    references = []  # the one-device run's state after each step, on the host
    for shape in [(1, 1, 1), (2, 2, 2)]:
        setup = on_mesh(config, shape)
        step, _ = step_lib.compile_train_step(setup)
        # Each step starts from the one-device run's state (the first from the given variables): the bounds of
        # tolerance.py are those of one step's sums. A step taken from another mesh's own, slightly different
        # state would carry the last step's rounding through this step's gradient, which no bound here counts.
        start = jax.device_get(state_from_variables(setup.tx, variables, setup.state_shardings))
        for index, batch in enumerate(batches):
            state, _ = step(jax.device_put(start, setup.state_shardings), setup.sharding.global_batch(batch))
            if index == 0:
                running_mean = state.model_state["batch_stats"]["stem_norm"]["mean"]
                assert_close_after_reordering(running_mean, expected_mean, tolerance, f"stem's running mean on {shape}")
                if shape == (2, 2, 2):
                    assert running_mean.sharding.spec == jax.sharding.PartitionSpec("fsdp")
            result = jax.device_get(state)
            if shape == (1, 1, 1):
                references.append(result)
            else:
                what = f"after step {index + 1} on mesh {shape}"
                reference = references[index]
                assert_sgd_params_close_after_reordering(
                    result.params, reference.params, start.params, tolerance, 1, what, batchnorm=True
                )
                assert_close_after_reordering(
                    result.model_state, reference.model_state, tolerance, f"statistics {what}"
                )
            start = references[index]
    # The scanned part of a stage (its one remaining block) stacks its statistics on a leading `layers` axis.
    assert references[-1].model_state["batch_stats"]["stage2_rest"]["norm1"]["mean"].shape == (1, 16)


def state_from_variables(tx, variables, shardings):
    """A TrainState holding `variables`, placed on the state's shardings (optimizer state fresh)."""
    params, model_state = state_lib.split_variables(variables)

    def make():
        return state_lib.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model_state=model_state
        )

    return jax.jit(make, out_shardings=shardings)()


def stem_channel_mean(images, kernel):
    """The per-channel mean of the ImageNet stem's 7x7/2 convolution over the whole batch, computed on the host."""
    out = jax.lax.conv_general_dilated(
        jnp.asarray(images), kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return np.asarray(out).mean(axis=(0, 1, 2))


def test_vit_attention_is_bidirectional():
    """The class token sits first; were attention causal, it would never see a patch and every image would get
    the same logits. Changing only the last patch changes them."""
    config = vision_config("vit")
    task = make_task(config)
    variables = random_variables(task)
    images = image_batch(config)["image"][:2]
    changed = images.copy()
    changed[:, -4:, -4:, :] += 1.0  # the last 4x4 patch
    logits = jax.jit(task.model.apply)(variables, np.concatenate([images, changed]))
    assert np.abs(logits[:2] - logits[2:]).max() > 1e-3


def test_pooling_position_and_norm_variants_build_and_run():
    """The variants the mesh tests leave out, through the real initializers: ViT with average pooling and fixed
    2-D positions (no class token, no learned positions), GroupNorm ResNet (no batch statistics), the CNN with
    BatchNorm; a training step's loss is finite and counts the weighted examples."""
    for variant, params_not_expected, collections in [
        ("vit_gap", {"cls", "position_embed"}, set()),
        ("resnet_groupnorm", set(), set()),
        ("cnn_batchnorm", set(), {"batch_stats"}),
    ]:
        config = vision_config(variant)
        task = make_task(config)
        shapes = nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0)))
        params, model_state = state_lib.split_variables(shapes)
        assert not params_not_expected & params.keys() and model_state.keys() == collections
        params, model_state = state_lib.split_variables(random_variables(task))
        sums, _ = jax.jit(lambda p, m, b, t=task: t.loss_sums(p, m, b, jax.random.key(0), train=True))(
            params, model_state, image_batch(config)
        )
        assert np.isfinite(sums["loss"]) and sums["count"] == config.batch_size - 1


@pytest.mark.parametrize(
    "variant, override, message",
    [
        ("vit", "config.model.patch_size=3", r"image_size=8 is not a multiple of config.model.patch_size=3"),
        ("resnet_groupnorm", "config.model.norm_groups=3", r"norm_groups=3 does not divide the channels \[8\]"),
        ("cnn", "config.model.normalization=layernorm", r"config.model.normalization='layernorm' is not one of"),
        ("resnet", "config.model.depth=20", r"config.model.depth=20 is not one of 10, 18, 34, 50, 101, 152"),
    ],
)
def test_bad_vision_configs_are_clear_errors(variant, override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        vision_config(variant, override)


def test_an_image_model_without_an_image_size_is_a_clear_error():
    config = vision_config("cnn")
    config.data.image_size = 0
    with pytest.raises(config_lib.ConfigError, match=r"config.data.image_size must be set"):
        make_task(config)
