"""The registered model takes image files: in process, and over REST from a real
`mlflow models serve` (started by `lifecycle.py serve`, what `make serve` runs).

A tiny model is trained and registered once; the server is started once for the
module. Answers over REST are compared with `lifecycle.py predict` on the same files,
and with the Keras network on training's own decoding of them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

import lifecycle
from engine import prediction, serving
from engine.images import decode_image
from engine.network import class_probabilities
from engine.sources import make_demo_data
from tests.conftest import LOCAL_BASE, make_local_base, module_store, tiny_config, train_and_log
from tests.servers import free_port, spawn, stop_process_group, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
LIFECYCLE = [sys.executable, str(ROOT / "lifecycle.py")]
MODEL = "models:/cells/1"
CLASSES = ["parasitized", "uninfected"]

# ---------------------------------------------------------------- fast: request parsing


def test_file_bytes_takes_base64_data_urls_and_bytes():
    png = b"\x89PNG\r\n\x1a\n..."
    text = base64.b64encode(png).decode()
    assert serving.file_bytes(text) == png
    assert serving.file_bytes(f"data:image/png;base64,{text}") == png
    assert serving.file_bytes(text[:8] + "\n" + text[8:]) == png  # wrapped base64 lines
    assert serving.file_bytes(png) == png
    with pytest.raises(ValueError, match="not base64"):
        serving.file_bytes("this is not base64!")
    with pytest.raises(ValueError, match="expected a base64-encoded image file"):
        serving.file_bytes(None)


def test_request_values_reads_every_input_form():
    frame = pd.DataFrame({"image": ["a", "b"]})
    assert serving.request_values(frame) == ["a", "b"]
    assert serving.request_values(pd.DataFrame({"img": ["a"]})) == ["a"]  # one column
    assert serving.request_values({"image": ["a", "b"]}) == ["a", "b"]
    assert serving.request_values(["a", "b"]) == ["a", "b"]
    assert serving.request_values("a") == ["a"]
    with pytest.raises(ValueError, match="column named 'image'"):
        serving.request_values(pd.DataFrame({"x": ["a"], "y": ["b"]}))


def test_request_print_json_is_the_body_curl_sends(tmp_path, capsys):
    Image.new("L", (10, 7), 128).save(tmp_path / "cell.png")
    assert lifecycle.main(["request", "--print-json", str(tmp_path / "cell.png")]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body == {"dataframe_records": [{"image": serving.encode_file(tmp_path / "cell.png")}]}
    assert (
        base64.b64decode(body["dataframe_records"][0]["image"])
        == (tmp_path / "cell.png").read_bytes()
    )
    assert lifecycle.main(["request", "--print-json", str(tmp_path / "missing.png")]) == 2
    assert "error: cannot read" in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_logged_before_image_input_answers_the_same_way(tracking_store, tmp_path):
    """A registered version of the Keras network alone (tensorflow flavor) still classifies."""
    import train

    network = train.define_network((32, 32, 3), 2, tiny_config())
    metadata = {"class_names": CLASSES, "image_size": 32, "channels": 3}
    experiment = mlflow.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.tensorflow.log_model(network, name="model", metadata=metadata)
    Image.new("RGB", (50, 40), (200, 90, 120)).save(tmp_path / "cell.png")
    answers = serving.load_classifier(info.model_uri).classify(
        [serving.encode_file(tmp_path / "cell.png")]
    )
    pixels = decode_image(tf.constant(str(tmp_path / "cell.png")), 32, 3).numpy()[None]
    (probs,) = class_probabilities(network.predict(pixels.astype("float32"), verbose=0))
    assert answers["class"][0] == CLASSES[int(probs.argmax())]
    assert answers["probability"][0] == pytest.approx(probs.max(), abs=1e-6)
    assert serving.load_network(info.model_uri) is not None


# ---------------------------------------------------------------- slow: a registered model


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One registered version (`cells` 1) of a tiny model in a fresh local store."""
    root = tmp_path_factory.mktemp("serving")
    with module_store(f"sqlite:///{root / 'mlflow.db'}") as uri:
        cfg = tiny_config(data_dir=str(root / "demo"), registered_model_name="cells")
        assert train_and_log(cfg).model_version == "1"
        yield {"uri": uri, "root": root}


@pytest.fixture(scope="module")
def images(registry) -> dict[str, Path]:
    """Files a client might send: the model's size and others, gray, RGBA, four formats."""
    folder = registry["root"] / "requests"
    make_demo_data(folder / "demo", samples=4, image_size=32, seed=7)
    demo = sorted((folder / "demo").rglob("*.png"))
    cell = Image.open(demo[0]).convert("RGB")
    files = {f"demo{i}": path for i, path in enumerate(demo)}
    variants = {
        "gray.png": cell.convert("L"),
        "rgba.png": cell.convert("RGBA"),
        "large.jpg": cell.resize((80, 56)),
        "small.bmp": cell.resize((20, 20)),
        "palette.gif": cell.convert("P"),
        "cell.tiff": cell,
    }
    for name, image in variants.items():
        image.save(folder / name)
        files[name] = folder / name
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    files["broken.png"] = folder / "broken.png"
    return files


@pytest.fixture(scope="module")
def server(registry):
    """`lifecycle.py serve` (mlflow models serve --env-manager local) on a free port."""
    port = free_port()
    log_path = registry["root"] / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}
    command = [*LIFECYCLE, "serve", "--model", MODEL, "--port", str(port)]
    process = spawn(command, log_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/ping", process, log_path, timeout=180)
        yield url
    finally:
        stop_process_group(process)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def network_answers(paths: list[Path]) -> np.ndarray:
    """The Keras network's class probabilities on training's decoding of the files."""
    network = serving.load_network(MODEL)
    pixels = np.stack([decode_image(tf.constant(str(p)), 32, 3).numpy() for p in paths])
    return class_probabilities(network.predict(pixels.astype("float32"), verbose=0))


@pytest.mark.slow
def test_signature_and_input_example_make_a_usable_request(registry, server):
    info = mlflow.models.get_model_info(MODEL)
    assert info.signature.inputs.to_dict() == [
        {"type": "string", "name": "image", "required": True}
    ]
    outputs = {c["name"] for c in info.signature.outputs.to_dict()}
    assert outputs == {"class", "probability", "probabilities", "error"}
    assert info.metadata["class_names"] == CLASSES and info.metadata["image_size"] == 32
    # the request the MLflow UI shows: a real PNG, base64, answered as it stands
    example = json.loads(
        Path(mlflow.artifacts.download_artifacts(f"{MODEL}/serving_input_example.json")).read_text()
    )
    (image,) = example["dataframe_split"]["data"][0]
    assert Image.open(io.BytesIO(base64.b64decode(image))).size == (32, 32)
    (answer,) = post(server, example)["predictions"]
    assert answer["class"] in CLASSES and answer["error"] is None


@pytest.mark.slow
def test_served_answer_equals_make_predict_on_the_same_files(registry, images, server, tmp_path):
    paths = [images[f"demo{i}"] for i in range(4)]
    body = {"dataframe_records": [{"image": serving.encode_file(p)} for p in paths]}
    answers = post(server, body)["predictions"]

    output = tmp_path / "predictions.csv"
    prediction.predict(MODEL, [str(p) for p in paths], output)
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(p.resolve()) for p in paths]
    for answer, row in zip(answers, rows, strict=True):
        assert answer["error"] is None
        assert answer["class"] == row["predicted_class"]
        assert answer["probability"] == pytest.approx(float(row["probability"]), abs=1e-6)
        assert set(answer["probabilities"]) == set(CLASSES)
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0)
        for name in CLASSES:
            assert answer["probabilities"][name] == pytest.approx(
                float(row[f"probability_{name}"]), abs=1e-6
            )
    # ... and both equal the network on training's own decoding of the files
    expected = network_answers(paths)
    assert [a["class"] for a in answers] == [CLASSES[k] for k in expected.argmax(axis=1)]
    np.testing.assert_allclose([a["probability"] for a in answers], expected.max(axis=1), atol=1e-5)

    # `python lifecycle.py request` sends the same files and prints the same answers
    printed = subprocess.run(
        [*LIFECYCLE, "request", "--url", server, *map(str, paths[:2])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr[-2000:]
    for path, answer in zip(paths[:2], answers[:2], strict=True):
        assert f"{path}: {answer['class']} ({answer['probability']:.4f})" in printed.stdout


@pytest.mark.slow
def test_split_and_inputs_forms_answer_like_records(images, server):
    encoded = [serving.encode_file(images[f"demo{i}"]) for i in range(3)]
    records = post(server, {"dataframe_records": [{"image": e} for e in encoded]})
    split = post(
        server, {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}
    )
    inputs = post(server, {"inputs": {"image": encoded}})
    assert records == split == inputs
    assert len(records["predictions"]) == 3


@pytest.mark.slow
def test_a_bad_image_gets_an_error_and_the_others_their_answers(images, server):
    body = {
        "dataframe_records": [
            {"image": serving.encode_file(images["demo0"])},
            {"image": serving.encode_file(images["broken.png"])},
            {"image": "not base64 at all!"},
            {"image": serving.encode_file(ROOT / "README.md")},
            {"image": serving.encode_file(images["demo1"])},
            {"image": serving.encode_file(images["cell.tiff"])},
        ]
    }
    answers = post(server, body)["predictions"]
    assert [a["error"] is None for a in answers[:5]] == [True, False, False, False, True]
    # TensorFlow's decoder (training's) does not read TIFF: only that row says so
    assert "not a readable image" in answers[5]["error"] and answers[5]["class"] is None
    assert "not a readable image" in answers[1]["error"]
    assert "not base64" in answers[2]["error"]
    assert answers[1]["class"] is None and answers[1]["probability"] is None
    expected = network_answers([images["demo0"], images["demo1"]])
    np.testing.assert_allclose(
        [answers[0]["probability"], answers[4]["probability"]], expected.max(axis=1), atol=1e-5
    )


@pytest.mark.slow
def test_gray_rgba_other_sizes_and_formats_are_decoded_as_in_training(images, server):
    names = ["gray.png", "rgba.png", "large.jpg", "small.bmp", "palette.gif"]
    body = {"dataframe_records": [{"image": serving.encode_file(images[n])} for n in names]}
    answers = post(server, body)["predictions"]
    assert all(a["error"] is None for a in answers), answers
    expected = network_answers([images[n] for n in names])
    assert [a["class"] for a in answers] == [CLASSES[k] for k in expected.argmax(axis=1)]
    np.testing.assert_allclose([a["probability"] for a in answers], expected.max(axis=1), atol=1e-5)


@pytest.mark.slow
def test_request_command_reports_a_dead_server_in_one_line(images):
    port = free_port()  # nothing listens there
    printed = subprocess.run(
        [*LIFECYCLE, "request", "--url", f"http://127.0.0.1:{port}", str(images["demo0"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 2
    last_line = printed.stderr.strip().splitlines()[-1]  # TensorFlow logs its start before it
    assert last_line.startswith("error: no answer from") and "Traceback" not in printed.stderr


@pytest.mark.slow
def test_export_and_validate_still_reach_the_raw_pixel_network(registry, tmp_path):
    assert lifecycle.main(["export", "--model", MODEL, "--output", str(tmp_path / "tf")]) == 0
    exported = tf.saved_model.load(str(tmp_path / "tf" / "1")).signatures["serving_default"]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    (output,) = exported(tf.constant(pixels)).values()
    network = serving.load_network(MODEL)
    np.testing.assert_allclose(output.numpy(), network.predict(pixels, verbose=0), atol=1e-5)


# ---------------------------------------------------------------- docker: build-docker


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.usefixtures("docker_engine")
@pytest.mark.skipif(
    "'docker' not in (config.getoption('markexpr') or '')",
    reason="builds an image for minutes: run it with make test-docker (-m docker)",
)
def test_build_docker_image_serves_the_same_api(registry, images, tmp_path):
    """`mlflow models build-docker` on the registry-less base; one request to the image.

    Minutes (the image installs MLflow and TensorFlow from PyPI), so it runs where the
    Docker tests are asked for by name, `make test-docker`, and not in `make test`.
    """
    make_local_base()
    tag = "image-classifier-serving:test"
    mlflow.models.build_docker(
        model_uri=MODEL, name=tag, env_manager="local", base_image=LOCAL_BASE
    )
    port = free_port()
    # the registry-less base has no nginx: uvicorn answers on 8000 itself
    options = "-d --rm -e DISABLE_NGINX=true -e UVICORN_HOST=0.0.0.0 -e MLFLOW_MODELS_WORKERS=1"
    container = subprocess.run(
        ["docker", "run", *options.split(), "-p", f"127.0.0.1:{port}:8000", tag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                time.sleep(2)
        body = {
            "dataframe_records": [
                {"image": serving.encode_file(images["demo0"])},
                {"image": serving.encode_file(images["broken.png"])},
            ]
        }
        good, broken = post(url, body)["predictions"]
        expected = network_answers([images["demo0"]])[0]
        assert good["class"] == CLASSES[expected.argmax()] and good["error"] is None
        assert good["probability"] == pytest.approx(expected.max(), abs=1e-5)
        assert "not a readable image" in broken["error"]
    finally:
        subprocess.run(["docker", "stop", container], capture_output=True)
