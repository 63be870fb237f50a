"""Larger images (issue 38, item 4): the random-resized crop, the ImageNet stem and ResNet-50.

ResNet-50 without FPCM has torchvision's 25,557,032 parameters for 1,000 classes (its layout:
bottleneck blocks, stride on the 3x3 conv, projection shortcuts); FPCM adds 2C per stage
(C = 256, 512, 1024, 2048). The crop is checked against what it must do to a ramp image.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fpcm_jax import experiment, models
from fpcm_jax.data import augmentation


def parameter_count(model, size):
    params = models.variables_template(model, size)["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def test_resnet50_has_torchvisions_parameters():
    plain = models.create("resnet50", num_classes=1000, fpcm=False, stem="imagenet")
    assert parameter_count(plain, 64) == 25_557_032
    with_fpcm = models.create("resnet50", num_classes=1000, stem="imagenet")
    assert parameter_count(with_fpcm, 64) == 25_557_032 + 2 * (256 + 512 + 1024 + 2048)


def test_the_imagenet_stem_quarters_the_map_before_the_stages():
    """224 px: 7x7/2 conv and 3x3/2 max-pool give 56x56 at the first stage, 7x7 at the last;
    the CIFAR stem keeps 224 there."""
    from flax import traverse_util

    for stem, first in (("imagenet", 56), ("cifar", 224)):
        model = models.create("resnet18", num_classes=10, stem=stem, widths=(8, 8, 8, 8))
        variables = models.variables_template(model, 224)
        _, state = jax.eval_shape(lambda v, x: model.apply(
            v, x, capture_intermediates=True, mutable=["intermediates"]), variables,
            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
        shapes = {path[0]: value[0].shape for path, value in traverse_util.flatten_dict(
            state["intermediates"]).items() if len(path) == 2 and path[1] == "__call__"}
        assert shapes["layer1_1"][1:3] == (first, first)
        assert shapes["layer4_1"][1:3] == (first // 8, first // 8)


def test_stem_and_widths_apply_to_the_resnets_only():
    with pytest.raises(ValueError, match="model.stem='imagenet' applies to the ResNets only"):
        experiment.check_options(experiment.describe(
            tiny_config(model__name="wrn-16-2", model__widths=None, model__stage_sizes=None,
                        model__stem="imagenet")))
    with pytest.raises(ValueError, match="model.stem='huge' is not valid"):
        experiment.check_options(experiment.describe(tiny_config(model__stem="huge")))


def ramp(width=64):
    """One uint8 image whose value grows along x by 2 per pixel (0 to 126)."""
    row = np.arange(width) * 2
    return np.broadcast_to(row[None, :, None], (width, width, 3)).astype(np.uint8)[None]


def test_a_full_crop_is_the_image_and_a_quarter_crop_doubles_the_ramp():
    """Area 1 and ratio 1: the image itself. Area 1/4 and ratio 1: a half-wide box (at some
    position) stretched back to full width: the ramp's slope halves."""
    images = jnp.asarray(np.repeat(ramp(), 4, axis=0))
    whole = augmentation.random_resized_crop(images, jax.random.key(0), scale=(1.0, 1.0),
                                             ratio=(1.0, 1.0), flip=False)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(images) / 255.0, atol=1e-6)
    quarter = np.asarray(augmentation.random_resized_crop(
        images, jax.random.key(1), scale=(0.25, 0.25), ratio=(1.0, 1.0), flip=False))
    slopes = np.diff(quarter[:, 32, 8:56, 0], axis=1) * 255.0  # away from the edges
    np.testing.assert_allclose(slopes, 1.0, atol=1e-3)
    assert quarter.shape == (4, 64, 64, 3) and quarter.min() >= 0 and quarter.max() <= 1


def test_the_crop_flips_half_the_images_and_config_picks_it():
    images = jnp.asarray(np.repeat(ramp(), 400, axis=0))
    out = np.asarray(augmentation.random_resized_crop(images, jax.random.key(2),
                                                      scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    flipped = out[:, 0, 0, 0] > out[:, 0, -1, 0]
    assert 160 < flipped.sum() < 240  # Binomial(400, 0.5): 6 sigma is 60
    config = tiny_config(data__augment="random_resized_crop")
    chosen = augmentation.augment_for(jnp.asarray(ramp()), jax.random.key(0), config.data)
    assert chosen.shape == (1, 64, 64, 3)
