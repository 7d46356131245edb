"""Which devices a run trains on and in which compute dtype.

`choose_strategy` picks the tf.distribute strategy for the GPUs TensorFlow sees;
`set_precision` sets Keras' global dtype policy from cfg.mixed_precision and the
GPUs' compute capability (`compute_dtype` is that choice, pure).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from engine import multiworker
from engine.config import RunConfig


def gpu_devices() -> list[str]:
    """The names of the GPUs TensorFlow sees, e.g. ["/device:GPU:0"]."""
    return [device.name for device in tf.config.list_logical_devices("GPU")]


def choose_strategy(cfg: RunConfig) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy over the workers TF_CONFIG names (see
    engine.multiworker); else MirroredStrategy over all GPUs when there are several,
    OneDeviceStrategy on one.

    Each copies the next batches to the GPU(s) while the current one trains: the
    prefetch to the device that keeps a GPU fed (under the default strategy each batch
    is copied only when its step asks for it). Without a GPU, the default strategy.
    """
    mode = cfg.distribute_mode()
    if multiworker.wanted_cluster(mode) is not None:
        return multiworker.make_strategy()  # before gpu_devices: it must come first
    gpus = gpu_devices()
    if mode == "true" and len(gpus) > 1:
        return tf.distribute.MirroredStrategy(gpus)
    if gpus:
        return tf.distribute.OneDeviceStrategy(gpus[0])
    return tf.distribute.get_strategy()


def compute_dtype(setting: str, capabilities: list[tuple[int, int]]) -> str:
    """float32, bfloat16 or float16 for a mixed_precision setting and the GPUs' compute
    capabilities (an empty list on the CPU).

    auto (or true) picks bfloat16 on compute capability 8.0 and newer (Ampere, Hopper:
    no loss scaling needed), float16 on older GPUs, float32 on the CPU.
    """
    if setting in ("float32", "false"):
        return "float32"
    if not capabilities:
        if setting != "auto":
            print(f"note: {setting} compute needs a GPU; training in float32")
        return "float32"
    if setting in ("bfloat16", "float16"):
        return setting
    return "bfloat16" if min(capabilities) >= (8, 0) else "float16"


def set_precision(cfg: RunConfig) -> str:
    """Set Keras' global dtype policy from cfg.mixed_precision; return the policy's name.

    Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer at compile time.
    """
    capabilities = [
        tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    dtype = compute_dtype(cfg.mixed_precision, capabilities)
    policy = "float32" if dtype == "float32" else f"mixed_{dtype}"
    keras.mixed_precision.set_global_policy(policy)
    return policy
