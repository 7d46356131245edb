"""The example define_network: shapes, heads, the VGG16 freeze; the precision policy."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import train
from engine.config import UserError
from engine.network import build_network
from tests.conftest import tiny_config

pytestmark = pytest.mark.example


@pytest.mark.parametrize(("num_classes", "outputs"), [(2, 1), (5, 5)])
def test_cnn_output_shape_and_head(num_classes, outputs):
    cfg = tiny_config(convolutions=3)
    model, _ = build_network(train.define_network, (32, 32, 3), num_classes, cfg)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (4, outputs)
    if outputs > 1:
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in model.layers) == 3
    labels = np.eye(num_classes)[[0, 1, 0, 1]] if outputs > 1 else np.array([[0], [1], [0], [1]])
    scores = model.evaluate(images, labels, verbose=0, return_dict=True)
    assert set(scores) == {"loss", "accuracy", "auc", "precision", "recall"}


def test_cnn_rescales_raw_pixels_itself():
    model = train.define_network((16, 16, 1), 2, tiny_config(convolutions=1))
    assert isinstance(model.layers[1], keras.layers.Rescaling)


def test_augmentation_layers_only_when_asked():
    def has_random_flip(cfg):
        model = train.define_network((32, 32, 3), 2, cfg)
        return any(isinstance(layer, keras.layers.RandomFlip) for layer in model.layers)

    assert has_random_flip(tiny_config(randomize_images=True))
    assert not has_random_flip(tiny_config(randomize_images=False))


@pytest.mark.parametrize("fine_tune_layers", [0, 4])
def test_vgg16_transfer_learning_freezes_the_base(fine_tune_layers):
    cfg = tiny_config(convolutions=0, weights="none", fine_tune_layers=fine_tune_layers)
    model = train.define_network((32, 32, 3), 3, cfg)
    base = model.get_layer("vgg16")
    trainable = [layer.name for layer in base.layers if layer.trainable and layer.weights]
    expected = [layer.name for layer in base.layers[-fine_tune_layers:] if layer.weights]
    assert trainable == (expected if fine_tune_layers else [])
    assert model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0).shape == (2, 3)


def test_weights_that_cannot_be_downloaded_are_one_paragraph(tmp_path, monkeypatch):
    """Offline, keras.applications' download raises a bare Exception: it becomes a
    UserError that says what to do, not a traceback."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # nothing cached there

    def needs_a_download(input_shape, num_classes, cfg):
        keras.utils.get_file("weights.h5", "http://127.0.0.1:9/weights.h5")  # port 9: refused

    with pytest.raises(UserError) as caught:
        build_network(needs_a_download, (32, 32, 3), 2, tiny_config())
    message = str(caught.value)
    assert "could not download" in message and "127.0.0.1:9" in message
    assert "--weights none" in message


def test_other_errors_of_define_network_are_not_hidden():
    def broken(input_shape, num_classes, cfg):
        raise RuntimeError("a bug in the fork's code")

    with pytest.raises(RuntimeError, match="a bug in the fork"):
        build_network(broken, (32, 32, 3), 2, tiny_config())
