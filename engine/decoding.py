"""Decoding and resizing: the one definition training, the cache and prediction share.

`decode_image` turns an image file into the uint8 (size, size, channels) tensor a
model sees; `decode_files` runs it over many files at once and says which failed
and why, so decoding doubles as the check that a file is a readable image.
TensorFlow's decoders are used, not PIL's: on one core they decode and resize a
128 px PNG about twice as fast (doc/benchmarks.md), and they run in tf.data's C++
threads, free of the GIL.
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

# Part of every cache key: bump it whenever what decode_image or resize_image
# returns for the same file changes, so no run reads images decoded the old way.
DECODER_VERSION = 1
DECODE_BATCH = 1024  # images handed from tf.data to numpy at a time


def resize_image(image: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """Any image tensor (H, W[, C]) -> uint8 (image_size, image_size, channels)."""
    if image.shape.rank == 2:
        image = image[..., tf.newaxis]
    have = image.shape[-1]
    if have == 4:
        image = image[..., :3]
        have = 3
    if have == 1 and channels == 3:
        image = tf.image.grayscale_to_rgb(image)
    elif have == 3 and channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    image = tf.image.resize(image, (image_size, image_size))  # bilinear, as Keras loaders
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def decode_image(path: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """An image file's path -> uint8 (image_size, image_size, channels) tensor.

    PNG (8 or 16 bit, palette, with or without alpha), JPEG, GIF (first frame) and
    BMP; alpha is dropped, gray and RGB are converted to `channels`. Files are
    decoded to RGB first whatever `channels` is: TensorFlow decodes a GIF or a CMYK
    JPEG to RGB only.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return resize_image(image, image_size, channels)


def decode_error(path: str, image_size: int, channels: int) -> str:
    """Why one file does not decode: the decoder's own message, on one line."""
    try:
        decode_image(tf.constant(path), image_size, channels)
    except tf.errors.OpError as err:
        # "{{function_node ...}} Invalid PNG data, size 910 [Op:DecodeImage] name: " -> the middle
        message = re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", " ".join(err.message.split()))
        return message.strip() or type(err).__name__
    return "decoded only on a second try"  # e.g. the file was being written meanwhile


def decode_files(
    paths: list[str], image_size: int, channels: int
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode and resize image files in parallel.

    Returns:
        (images, failures): images (len(paths), image_size, image_size, channels)
        uint8, in the order of paths, zeros where a file failed; failures maps the
        index of each file that did not decode to the reason.
    """
    images = np.zeros((len(paths), image_size, image_size, channels), np.uint8)
    decoded = np.zeros(len(paths), bool)
    if paths:
        ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), np.array(paths, str)))
        ds = ds.map(
            lambda index, path: (index, decode_image(path, image_size, channels)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        # A file that fails drops out here; its index is missing below, and it is
        # decoded once more on its own for the reason. Big batches: little Python
        # work, and memory for no more than one batch besides the images.
        for index, batch in ds.ignore_errors().batch(DECODE_BATCH).as_numpy_iterator():
            images[index] = batch
            decoded[index] = True
    failed = np.flatnonzero(~decoded)
    failures = {int(i): decode_error(paths[i], image_size, channels) for i in failed}
    return images, failures


def resize_images(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """Images in memory (N, H, W[, C]), pixel values 0..255 -> (N, size, size, channels) uint8."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.dtype == np.uint8 and images.shape[1:] == (image_size, image_size, channels):
        return images
    ds = tf.data.Dataset.from_tensor_slices(images).map(
        lambda image: resize_image(image, image_size, channels),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    out = np.empty((len(images), image_size, image_size, channels), np.uint8)
    start = 0
    for batch in ds.batch(256).as_numpy_iterator():
        out[start : start + len(batch)] = batch
        start += len(batch)
    return out
