"""Which devices a run trains on and in which compute dtype.

`choose_strategy` picks the tf.distribute strategy for the GPUs TensorFlow sees;
`set_precision` sets Keras' global dtype policy from cfg.mixed_precision and the
GPUs' compute capability (`compute_dtype` is that choice, pure).
"""

from __future__ import annotations

import os

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

    It turns on op determinism first when cfg.deterministic (set_determinism): the
    training loop calls it before any data or model exists.
    """
    set_determinism(cfg)
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


# What --deterministic costs, said once when it is on.
DETERMINISM_COST = (
    "deterministic: TensorFlow op determinism is on and the input pipelines keep their "
    "order: the same machine gives the same figures twice. It costs speed (on a GPU often "
    "10-50%: cuDNN's fastest algorithms are not deterministic and are not used), and an op "
    "without a deterministic kernel stops the run with an UnimplementedError."
)


def set_determinism(cfg: RunConfig) -> None:
    """Turn on op determinism and ordered input pipelines when cfg.deterministic.

    Call it before any data or model is built. keras.utils.set_random_seed (which the
    training loop calls) seeds every random op, which op determinism requires; tf.data's
    parallel maps and the streamed reads then deliver in order, since op determinism
    makes every dataset deterministic whatever its options say.
    """
    if not getattr(cfg, "deterministic", False):
        return
    tf.config.experimental.enable_op_determinism()
    print(f"note: {DETERMINISM_COST}")


def intra_op_threads() -> int:
    """The threads one op may split its work over: as set (tf.config.threading or
    TF_NUM_INTRAOP_THREADS), else the CPUs this process may run on, as TensorFlow counts."""
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    setting = os.environ.get("TF_NUM_INTRAOP_THREADS", "")
    return configured or (int(setting) if setting.isdigit() else len(os.sched_getaffinity(0)))


def nondeterminism_tags(cfg: RunConfig, pipeline: str) -> dict[str, str]:
    """The run's `determinism.*` tags: whether it asked for determinism, and the sources of
    run-to-run differences that were in play without it (`make reproduce` names them).

    Args:
        pipeline: the data pipeline, "memory" or "stream" (the run's data_pipeline param).
    """
    deterministic = bool(getattr(cfg, "deterministic", False))
    gpus = len(tf.config.list_physical_devices("GPU"))
    threads = intra_op_threads()
    in_play = []
    if not deterministic:
        if gpus:
            in_play.append(f"GPU kernels ({gpus} GPU(s): cuDNN picks algorithms by speed)")
        in_play.append(
            f"thread counts ({threads} intra-op threads: a sum split over threads may add "
            "in another order)"
        )
        if pipeline == "stream":
            in_play.append("parallel decode order (batches read in parallel from the cache)")
    return {
        "determinism": "on" if deterministic else "off",
        "determinism.gpus": str(gpus),
        # the float sums' order follows it: `make reproduce` trains with the same count
        "determinism.intra_op_threads": str(threads),
        "determinism.in_play": "; ".join(in_play) or "none",
    }
