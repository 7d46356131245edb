"""Write MLproject's `main` entry point from a Config class, so a knob is declared once.

    python -m engine.mlproject train:Config            # rewrite MLproject's main entry
    python -m engine.mlproject train:Config --check    # exit 1 when MLproject is stale

`make mlproject` runs the first. Only the block between the two marker lines is
written; everything else in MLproject (docker_env, the other entry points) stays.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from dataclasses import fields
from pathlib import Path

from engine.config import field_type

BEGIN = "  # ---- main: written by `make mlproject` from train.Config; do not edit by hand ----"
END = "  # ---- end main ----"
# Bare words YAML would read as a boolean or null, not as the text: written quoted.
_YAML_WORDS = ("true", "false", "yes", "no", "on", "off", "null")
_MLPROJECT_TYPES = {"int": "int", "float": "float", "str": "string", "bool": "bool"}


def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if text == "":
        return "''"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-/]*", text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def render_main(config_cls: type, script: str = "train.py") -> str:
    """The `main` entry point: one typed parameter per Config field, and the command."""
    lines = [BEGIN, "  main:", "    parameters:"]
    for f in fields(config_cls):
        kind = _MLPROJECT_TYPES[field_type(f)]
        lines.append(f"      {f.name}: {{type: {kind}, default: {_yaml_value(f.default)}}}")
    lines += ["    command: >-", f"      python {script}"]
    lines += [f"      --{f.name.replace('_', '-')} {{{f.name}}}" for f in fields(config_cls)]
    lines.append(END)
    return "\n".join(lines)


def update(text: str, config_cls: type) -> str:
    """MLproject text with the block between the markers replaced by render_main()."""
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"MLproject lacks the marker lines:\n{BEGIN}\n{END}")
    return text[:start] + render_main(config_cls) + text[stop + len(END) :]


def _load(spec: str) -> type:
    module_name, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module_name), attribute or "Config")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="module:Class of the Config, e.g. train:Config")
    parser.add_argument("--file", default="MLproject", help="the MLproject file")
    parser.add_argument("--check", action="store_true", help="only say whether it is stale")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(args.file).resolve().parent))
    path = Path(args.file)
    current = path.read_text()
    wanted = update(current, _load(args.config))
    if args.check:
        if current != wanted:
            print(
                f"{path} is stale: its main entry point differs from {args.config}; "
                "run `make mlproject`",
                file=sys.stderr,
            )
            return 1
        print(f"{path} matches {args.config}")
        return 0
    if current != wanted:
        path.write_text(wanted)
        print(f"rewrote {path}'s main entry point from {args.config}")
    else:
        print(f"{path} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
