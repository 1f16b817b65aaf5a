"""How a stage's frozen config dataclass is declared (`option`: default, help, choices), read
(defaults < TOML file < command-line flags: `resolve`, `load_table`, `add_arguments`) and checked
(`check_choices`, `check_positive`, `parse_size`). The configs themselves live in `pipeline.config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, MissingError


def option(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    group: str = "options",
    bounds: tuple[float, float, str] | None = None,
) -> Any:
    """A dataclass field that also describes its command-line flag: its help, its allowed values,
    the group of flags `--help` lists it under, and for a number its range `bounds` = (low, high,
    closed), closed as scikit-learn's `Interval` says it ("left", "right", "both", "neither"; inf:
    no limit). `check_bounds` checks the range, and an estimator derives its parameter constraints
    from it."""
    metadata = {"help": help, "choices": choices, "group": group, "bounds": bounds}
    return dataclasses.field(default=default, metadata=metadata)


POSITIVE = (0.0, float("inf"), "neither")  # a positive, finite number
AT_LEAST_ONE = (1, float("inf"), "left")


def check_bounds(config: Any) -> None:
    """Every number within the range its option declares (None passes where the default is None)."""
    for f in dataclasses.fields(config):
        bounds, value = f.metadata.get("bounds"), getattr(config, f.name)
        if bounds is None or (value is None and f.default is None):
            continue
        low, high, closed = bounds
        inside = (low < value or (closed in ("left", "both") and value == low)) and (
            value < high or (closed in ("right", "both") and value == high)
        )
        if inside and value == value and abs(value) != float("inf"):  # NaN and inf fail too
            continue
        if bounds in (POSITIVE, AT_LEAST_ONE):
            raise ConfigError(f"--{flag(f.name)} {value} must be a positive, finite number")
        left, right = (
            "[" if closed in ("left", "both") else "(",
            "]" if closed in ("right", "both") else ")",
        )
        shown = [f"{b:,}" if isinstance(b, int) else f"{b:g}" for b in (low, high)]
        raise ConfigError(
            f"--{flag(f.name)} {value} is out of range; expected {left}{shown[0]}, "
            f"{shown[1]}{right}"
        )


def describe_default(f: dataclasses.Field) -> str:
    """The default as `--help` and the CLI reference show it, once: a help text that already says
    what the default is keeps its own words; None and empty values say nothing."""
    if "default" in f.metadata["help"] or f.default in (None, "", ()):
        return ""
    if isinstance(f.default, bool):
        return f"--{flag(f.name)}" if f.default else f"--no-{flag(f.name)}"
    if isinstance(f.default, tuple):
        return " ".join(f"{v:g}" for v in f.default)
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def flag_help(f: dataclasses.Field) -> str:
    """A flag's help line: what it does, its choices when there are many, its default."""
    text = f.metadata["help"]
    choices = f.metadata["choices"]
    if choices and len(choices) > 6:
        text += f"; one of: {', '.join(choices)}"
    default = describe_default(f)
    return f"{text} (default: {default})" if default else text


def flag(name: str) -> str:
    return name.replace("_", "-")


def check_choices(config: Any) -> None:
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(
                f"--{flag(f.name)} {value!r} is not allowed; choose one of: {', '.join(choices)}"
            )


def parse_size(text: str) -> int:
    """'4GB', '512 MiB', '1.5G', '1000000' -> bytes (decimal and binary units both accepted)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(
            f"--max-memory {text!r} is not a size; write it like 4GB, 512MB or 1.5GiB"
        )
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


def check_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(
            f"--device {device!r} is not a device; choose auto, cpu, cuda, cuda:N or mps"
        )


def check_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not 0 < value < float("inf"):  # NaN fails too
            raise ConfigError(f"--{flag(name)} {value} must be a positive, finite number")


def _base_type(hint: Any) -> Any:
    """`int | None` -> int; `tuple[float, ...]` -> tuple; plain types unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(inner)
    return typing.get_origin(hint) or hint


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field, in the field's group; flags not given stay absent so the file
    and defaults apply."""
    hints = _hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        kind = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": flag_help(f)}
        if kind in (int, float):
            kwargs["metavar"] = "N" if kind is int else "X"
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(nargs="+", type=float, metavar="X")
        else:
            # Choices are listed in the help and checked by the config (one line, exit 2), not by
            # argparse.
            choices = f.metadata["choices"]
            kwargs["type"] = kind
            if choices:
                kwargs.update(metavar="|".join(choices) if len(choices) <= 6 else "NAME")
        groups[group].add_argument(f"--{flag(f.name)}", dest=f.name, **kwargs)


def load_document(path: str | Path, example: str = "configs/demo.toml") -> dict[str, Any]:
    """A whole TOML file, or a one-line error saying why it cannot be read (`example`: a file of
    the kind expected, in this repository, named when the path is wrong)."""
    path = Path(path)
    if not path.is_file():
        where = f" (paths are relative to {Path.cwd()})" if not path.is_absolute() else ""
        raise MissingError(
            f"config file {path} does not exist{where}; pass a TOML file such as {example}"
        )
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"config file {path} is not UTF-8 text; pass a TOML file such as configs/demo.toml"
        ) from None


def load_table(path: str | Path, table: str) -> dict[str, Any]:
    """The ``[table]`` of a TOML config file (empty when the file has no such table)."""
    document = load_document(path)
    section = document.get(table, {})
    if not isinstance(section, dict):
        raise ConfigError(
            f"config file {path}: '{table}' must be a table ([{table}]), got "
            f"{type(section).__name__}"
        )
    return section


def resolve(
    cls: type, file_values: Mapping[str, Any], flags: Mapping[str, Any], source: str = "config"
) -> Any:
    """Build ``cls`` from defaults, then the file's values, then the flags given on the command
    line."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in file_values.items():
        name = key.replace("-", "_")
        if name not in hints:
            raise ConfigError(f"{source}: unknown key {key!r}; valid keys: {', '.join(names)}")
        values[name] = _coerce(name, value, hints[name], source)
    values.update(flags)
    return cls(**values)


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    kind = _base_type(hint)
    optional = type(None) in typing.get_args(hint)
    if optional and value == "none" and kind is not str:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return tuple(float(v) for v in value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"{source}: {name} = {value!r} should be {kind.__name__}; fix the value in the file"
    )


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
