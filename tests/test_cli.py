"""The command line, the Config and the MLproject must agree, and bad values must say so."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train
from engine.config import UserError, build_parser, field_type, parse_bool, parse_config

ROOT = Path(__file__).resolve().parents[1]
MLPROJECT_TYPES = {"int": "int", "float": "float", "str": "string", "bool": "bool"}


def mlproject_main() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["main"]


@pytest.mark.parametrize("text", ["true", "True", "YES", "1", "on"])
def test_parse_bool_true(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["false", "No", "0", "OFF"])
def test_parse_bool_false(text):
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["maybe", "", "2", "Falsey"])
def test_parse_bool_rejects_other_words(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected true/false"):
        parse_bool(text)


def test_flags_have_real_types_and_both_spellings():
    argv = "--epochs 3 --learning_rate 0.01 --randomize-images no --data-source imagedir"
    cfg = parse_config(train.Config, argv.split())
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.learning_rate == 0.01
    assert cfg.randomize_images is False
    assert cfg.data_source == "imagedir"


def test_defaults_come_from_config():
    assert parse_config(train.Config, []) == train.Config()


def test_help_lists_every_parameter_with_type_and_default():
    text = " ".join(build_parser(train.Config).format_help().split())
    for f in dataclasses.fields(train.Config):
        flag = "--" + f.name.replace("_", "-")
        assert f"{flag} {field_type(f).upper()}" in text, flag
    assert "(default: malaria)" in text
    assert "(default: 5)" in text


def test_mlproject_matches_config():
    entry = mlproject_main()
    params = entry["parameters"]
    config_fields = {f.name: f for f in dataclasses.fields(train.Config)}
    assert set(params) == set(config_fields), "MLproject and Config name different parameters"
    for name, f in config_fields.items():
        assert params[name]["type"] == MLPROJECT_TYPES[field_type(f)], name
        default = params[name]["default"]
        assert type(default) is type(f.default) or isinstance(f.default, float), name
        assert default == f.default, name
        assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"], name


def test_mlproject_command_parses_to_the_defaults():
    entry = mlproject_main()
    values = {
        name: str(p["default"]).lower() if isinstance(p["default"], bool) else p["default"]
        for name, p in entry["parameters"].items()
    }
    argv = entry["command"].format(**values).split()[2:]
    # empty-string defaults vanish in split(); re-insert them as mlflow's quoting would
    fixed = []
    for i, token in enumerate(argv):
        fixed.append(token)
        if token.startswith("--") and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            fixed.append("")
    assert parse_config(train.Config, fixed) == train.Config()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"batch_size": -4}, "batch_size must be a positive integer"),
        ({"data_source": "s3"}, "data_source 's3' is unknown; use one of: tfds"),
        ({"weights": "random"}, "weights must be 'imagenet' or 'none'"),
        ({"val_split": 1.5}, "val_split must be between 0 and 1"),
        ({"mixed_precision": "maybe"}, "mixed_precision must be one of auto, bfloat16, float16"),
        ({"convolutions": 0, "image_size": 16}, "VGG16 (convolutions=0) needs image_size >= 32"),
        ({"convolutions": -1}, "convolutions must be 0 (VGG16) or a positive number"),
    ],
)
def test_bad_values_are_named(overrides, message):
    cfg = dataclasses.replace(train.Config(), **overrides)
    with pytest.raises(UserError) as caught:
        cfg.validate()
    assert message in str(caught.value)


def test_command_line_errors_exit_2_with_a_message_and_no_traceback(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'db'}", "PATH": "/usr/bin:/bin"}
    for argv, message in [
        (["--epochs", "0"], "error: epochs must be a positive integer, got 0"),
        (["--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
        (["--xla", "maybe"], "expected true/false, yes/no or 1/0, got 'maybe'"),
    ]:
        done = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "db").exists(), "a rejected command must not touch the store"
