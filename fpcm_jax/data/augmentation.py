"""Training augmentation on the device, inside the jitted step: the official CIFAR one (a
zero-padded random crop and a horizontal flip) and ImageNet's random-resized crop for larger
images (`data.augment`). Each takes uint8 NHWC images and returns float32 in [0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def augment(images: jax.Array, key: jax.Array, padding: int = 4, flip: bool = True) -> jax.Array:
    """uint8 NHWC -> float32 in [0, 1]: zero-padded random crop and random horizontal flip.

    As torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, one draw per image.
    """
    batch, height, width, _ = images.shape
    x = images.astype(jnp.float32) / 255.0
    crop_key, flip_key = jax.random.split(key)
    if padding:
        padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
        crop = lambda image, offset: jax.lax.dynamic_slice(
            image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
        x = jax.vmap(crop)(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
        x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
    return x


AUGMENTATIONS = ("pad_crop", "random_resized_crop")


def augment_for(images: jax.Array, key: jax.Array, data_config) -> jax.Array:
    """The training augmentation config.data asks for: `pad_crop` (the official CIFAR one,
    `augment`) or `random_resized_crop` (ImageNet's, for larger images), each with its flip."""
    if data_config.get("augment", "pad_crop") == "random_resized_crop":
        return random_resized_crop(images, key, flip=data_config.flip)
    return augment(images, key, data_config.crop_padding, data_config.flip)


def random_resized_crop(images: jax.Array, key: jax.Array, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), flip: bool = True) -> jax.Array:
    """uint8 NHWC -> float32 in [0, 1]: per image a box of area scale x the image's and
    aspect ratio in `ratio` (log-uniform), at a uniform position, resized back to the
    image's size (bilinear, antialiased), then a random horizontal flip; as torchvision's
    RandomResizedCrop + RandomHorizontalFlip, the box clamped to the image instead of retried."""
    batch, height, width, _ = images.shape
    x = images.astype(jnp.float32) / 255.0
    area_key, ratio_key, y_key, x_key, flip_key = jax.random.split(key, 5)
    area = jax.random.uniform(area_key, (batch,), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(ratio_key, (batch,), minval=np.log(ratio[0]),
                                   maxval=np.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    box_w = jnp.clip(jnp.sqrt(area * aspect) * width, 1.0, width)
    box_h = jnp.clip(jnp.sqrt(area / aspect) * height, 1.0, height)
    top = jax.random.uniform(y_key, (batch,)) * (height - box_h)
    left = jax.random.uniform(x_key, (batch,)) * (width - box_w)

    def crop(image, top, left, box_h, box_w):
        scale_hw = jnp.stack([height / box_h, width / box_w])
        return jax.image.scale_and_translate(image, image.shape, (0, 1), scale_hw,
                                             -jnp.stack([top, left]) * scale_hw, "linear")

    x = jax.vmap(crop)(x, top, left, box_h, box_w)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
        x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
    return jnp.clip(x, 0.0, 1.0)
