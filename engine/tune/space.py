"""A study's search space: parameters of the Config, each a range or a list of choices.

Written in tune.yaml, one parameter per top-level key:

    learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range, log scale
    dropout: {low: 0.0, high: 0.5}                           # a range
    convolutions: [1, 2, 3]                                  # choices

and overridden on the command line with `--param learning_rate=1e-4:1e-2:log`,
`--param dropout=0:0.5` or `--param convolutions=1,2,3`. Every name, type and bound
is checked against the Config before any trial starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.config import UserError, field_type, parse_bool

_CASTS = {"int": int, "float": float, "str": str, "bool": parse_bool}


@dataclass
class Param:
    """One searched parameter: a range (low, high, log) or a list of choices."""

    name: str
    kind: str  # the Config field's type: int, float, str or bool
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this parameter's value."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def values_to_check(self) -> list[Any]:
        """The values the Config must accept: both ends of a range, or every choice."""
        if self.choices is not None:
            return list(self.choices)
        cast = _CASTS[self.kind]
        return [cast(self.low), cast(self.high)]

    def describe(self) -> str:
        """The parameter and its range or choices, as a line of the study's header."""
        if self.choices is not None:
            return f"{self.name} in {self.choices}"
        return f"{self.name} in [{self.low}, {self.high}]" + (" (log)" if self.log else "")


def _cast(name: str, kind: str, value: Any) -> Any:
    try:
        return _CASTS[kind](value if kind != "bool" else str(value))
    except (TypeError, ValueError) as err:
        raise UserError(f"tune parameter {name}: '{value}' is not a {kind} ({err})") from err


def make_param(name: str, spec: Any, config_cls: type) -> Param:
    """A Param from its tune.yaml value (a dict with low/high[/log] or a list), checked.

    Raises:
        UserError: the name is not a Config field, or the range or choices are unusable.
    """
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"tune parameter '{name}' is not a knob of {config_cls.__name__}{hint}; the "
            f"search space may name only Config fields: {', '.join(known)}. Nothing was trained."
        )
    kind = field_type(known[name])
    if isinstance(spec, list | tuple):
        if not spec:
            raise UserError(f"tune parameter {name} has an empty list of choices")
        return Param(name, kind, choices=[_cast(name, kind, v) for v in spec])
    keys = set(spec) if isinstance(spec, dict) else set()
    if not isinstance(spec, dict) or keys - {"low", "high", "log"} or not {"low", "high"} <= keys:
        raise UserError(
            f"tune parameter {name}: write a range as {{low: A, high: B}} (optionally "
            f"log: true) or choices as a list [a, b, c], got {spec!r}"
        )
    if kind not in ("int", "float"):
        raise UserError(
            f"tune parameter {name} is a {kind}; give it a list of choices, not a range"
        )
    low, high = _cast(name, kind, spec["low"]), _cast(name, kind, spec["high"])
    log = parse_bool(str(spec.get("log", False)))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UserError(f"tune parameter {name}: the range [{low}, {high}] is not finite")
    if low > high:
        raise UserError(
            f"tune parameter {name}: the range is inverted (low {low} > high {high}); "
            "swap the two ends"
        )
    if low == high:
        raise UserError(
            f"tune parameter {name}: the range [{low}, {high}] is empty; widen it, or pin "
            f"the value with --{name.replace('_', '-')} {low} instead of searching it"
        )
    if log and low <= 0:
        raise UserError(f"tune parameter {name}: a log range needs low > 0, got {low}")
    return Param(name, kind, low=low, high=high, log=log)


def parse_param_flag(text: str) -> tuple[str, Any]:
    """`name=low:high[:log]` or `name=a,b,c` -> (name, the tune.yaml value)."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise UserError(f"--param '{text}': write NAME=LOW:HIGH, NAME=LOW:HIGH:log or NAME=A,B,C")
    name = name.strip().replace("-", "_")
    if ":" in value:
        parts = value.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise UserError(f"--param '{text}': a range is LOW:HIGH or LOW:HIGH:log")
        spec: dict[str, Any] = {"low": parts[0], "high": parts[1]}
        if len(parts) == 3:
            spec["log"] = True
        for end in ("low", "high"):
            try:
                spec[end] = float(spec[end])
            except ValueError as err:
                raise UserError(f"--param '{text}': '{spec[end]}' is not a number") from err
        return name, spec
    return name, [v.strip() for v in value.split(",")]


def load_space(
    path: Path | None, overrides: list[str], config_cls: type, pinned: set[str]
) -> list[Param]:
    """The search space: tune.yaml's parameters, then --param overrides, less pinned ones.

    Args:
        path: the tune.yaml file (None or missing: start from an empty space).
        overrides: the --param NAME=... flags; each replaces or adds one parameter.
        pinned: names given as train flags; a flag pins the value, so it is not searched.

    Raises:
        UserError: a bad file, name, range or choice list.
    """
    raw: dict[str, Any] = {}
    if path is not None and path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise UserError(f"{path} must map parameter names to ranges or choice lists")
    for text in overrides:
        name, spec = parse_param_flag(text)
        raw[name] = spec
    space = [make_param(str(name), spec, config_cls) for name, spec in raw.items()]
    space = [p for p in space if p.name not in pinned]
    if not space:
        raise UserError(
            "the search space is empty: add parameters to tune.yaml or pass "
            "--param NAME=LOW:HIGH (a train flag pins a parameter instead of searching it)"
        )
    return space


def check_space(space: list[Param], base: Any) -> None:
    """Raise UserError unless the Config accepts every end of every range and every choice."""
    for param in space:
        for value in param.values_to_check():
            cfg = dataclasses.replace(base, **{param.name: value})
            try:
                cfg.validate()
            except UserError as err:
                raise UserError(
                    f"tune parameter {param.describe()}: the value {value!r} is refused by "
                    f"the Config ({err}); narrow the range. Nothing was trained."
                ) from err
