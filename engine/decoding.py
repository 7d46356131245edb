"""Decoding and resizing: the one definition training, the cache and prediction share.

`decode_image` turns an image file into the uint8 (size, size, channels) tensor a
model sees; `decode_files` runs it over many files at once and says which failed
and why, so decoding doubles as the check that a file is a readable image.
TensorFlow's decoders are used, not PIL's: on one core they decode and resize a
128 px PNG about twice as fast (doc/benchmarks.md), and they run in tf.data's C++
threads, free of the GIL.

Before decoding, each file's header is read (engine/headers.py): a file over the pixel
limit is refused undecoded, and the EXIF orientation turns a photo upright, as every
viewer shows it, in training, predict and serving alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from engine.headers import max_pixels, read_header, too_large

# Part of every cache key: bump it whenever what decode_image or resize_image
# returns for the same file changes, so no run reads images decoded the old way.
DECODER_VERSION = 2  # 2: EXIF orientation applied
DECODE_BATCH = 1024  # images handed from tf.data to numpy at a time
ALIGN = 64  # bytes: TensorFlow takes an array this aligned as a tensor without a copy


def aligned_zeros(shape: tuple[int, ...], zeros: bool = True) -> np.ndarray:
    """A uint8 array at a 64-byte aligned address, of zeros unless `zeros` is False.

    TensorFlow takes such an array as a tensor without copying it (engine.pipelines.
    as_tensor, and a tf.numpy_function's result); numpy's own arrays are 16-byte aligned.
    """
    size = int(np.prod(shape))
    raw = (np.zeros if zeros else np.empty)(size + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + size].reshape(shape)


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


def upright(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """The image as EXIF orientation 1..8 says to show it (what PIL's
    ImageOps.exif_transpose does; tests check the two agree)."""
    turns = [
        lambda: image,
        lambda: tf.image.flip_left_right(image),
        lambda: tf.image.rot90(image, 2),
        lambda: tf.image.flip_up_down(image),
        lambda: tf.image.transpose(image),
        lambda: tf.image.rot90(image, 3),
        lambda: tf.image.rot90(tf.image.transpose(image), 2),
        lambda: tf.image.rot90(image, 1),
    ]
    return tf.switch_case(tf.clip_by_value(tf.cast(orientation, tf.int32), 1, 8) - 1, turns)


def _orientation(path) -> np.int32:
    value = np.asarray(path).item()  # bytes in a graph, str when called eagerly with a str
    header = read_header(value.decode() if isinstance(value, bytes) else str(value))
    return np.int32(header.orientation if header else 1)


def decode_image(
    path: tf.Tensor, image_size: int, channels: int, orientation: tf.Tensor | None = None
) -> tf.Tensor:
    """An image file's path -> uint8 (image_size, image_size, channels) tensor, upright.

    PNG (8 or 16 bit, palette, with or without alpha), JPEG, GIF (first frame), BMP and
    WebP; alpha is dropped, gray and RGB are converted to `channels`. Files are
    decoded to RGB first whatever `channels` is: TensorFlow decodes a GIF or a CMYK
    JPEG to RGB only.

    Args:
        orientation: the file's EXIF orientation when known (decode_files reads it with
            the pixel check); None reads it from the file's header here.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    if orientation is None:
        orientation = tf.numpy_function(_orientation, [path], tf.int32, stateful=False)
    # Turned after resizing to a square: the same pixels as before it, for less work.
    return upright(resize_image(image, image_size, channels), orientation)


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
    paths: list[str], image_size: int, channels: int, pixel_limit: int | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode and resize image files in parallel, each turned upright by its EXIF.

    Args:
        pixel_limit: a file whose header declares more pixels is refused undecoded
            (0: no limit; None: engine.headers.max_pixels(), 100 megapixels by default).

    Returns:
        (images, failures): images (len(paths), image_size, image_size, channels)
        uint8, in the order of paths, zeros where a file failed; failures maps the
        index of each file that did not decode to the reason.
    """
    images = aligned_zeros((len(paths), image_size, image_size, channels))
    failures: dict[int, str] = {}
    for index, batch, failed in decode_pieces(paths, image_size, channels, pixel_limit):
        images[index] = batch
        failures.update(failed)
    return images, dict(sorted(failures.items()))


def decode_pieces(
    paths: list[str], image_size: int, channels: int, pixel_limit: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, dict[int, str]]]:
    """decode_files a piece at a time, from one parallel pass over all the files.

    Yields:
        (indices, images, failures): up to DECODE_BATCH decoded images and the indices
        of their paths, in order; a last piece with no images holds the failures
        (index -> reason), which decode_files describes.
    """
    limit = max_pixels() if pixel_limit is None else pixel_limit
    headers = [read_header(path) for path in paths]  # ~10 us a file
    refused = {i: why for i, header in enumerate(headers) if (why := too_large(header, limit))}
    todo = np.array([i for i in range(len(paths)) if i not in refused], np.int64)
    decoded = np.zeros(len(paths), bool)
    if len(todo):
        orientation = np.array([headers[i].orientation if headers[i] else 1 for i in todo])
        ds = tf.data.Dataset.from_tensor_slices(
            (todo, np.array(paths, str)[todo], orientation.astype(np.int32))
        )
        ds = ds.map(
            lambda index, path, turn: (index, decode_image(path, image_size, channels, turn)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        # A file that fails drops out here; its index is missing below, and it is
        # decoded once more on its own for the reason. Big batches: little Python
        # work, and memory for no more than a few batches.
        for index, batch in ds.ignore_errors().batch(DECODE_BATCH).as_numpy_iterator():
            decoded[index] = True
            yield index, batch, {}
    failed = [int(i) for i in np.flatnonzero(~decoded) if int(i) not in refused]
    failures = {i: decode_error(paths[i], image_size, channels) for i in failed}
    empty = np.zeros((0, image_size, image_size, channels), np.uint8)
    yield np.zeros(0, np.int64), empty, {**failures, **refused}


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
    out = aligned_zeros((len(images), image_size, image_size, channels))
    start = 0
    for batch in ds.batch(256).as_numpy_iterator():
        out[start : start + len(batch)] = batch
        start += len(batch)
    return out
