"""Reading an exported classifier that someone else made: `load_export`.

`torch.export.load` trusts its archive. Pickled payloads are unpickled, and the program's JSON
becomes Python source: node targets are looked up, and names and keyword names are pasted into
generated code that is then executed. So a crafted `.pt2` can run code without any pickle. Here
the archive is checked first, the way a parser of foreign input should be:

- the entries: only those an export of this project has, each once, under one top folder, not a
  zip bomb; no payload declared as pickled; the sample inputs plain tensors (`weights_only`);
- the program (`models/*.json`): no guard code, no custom objects; every node's target an ATen
  operator (or `operator.getitem`); every name an identifier and every module path a dotted one;
  every string printable ASCII; the pytree specs only tuples, lists and dicts. The nodes' debug
  metadata (stack traces, module stacks) is dropped, not trusted.
- the symbolic shapes (`expr_str`, which torch hands to `sympy.sympify`, an `eval`): only sympy's
  printed form of an integer shape expression (known constructors, symbol names, numbers), with
  no attribute access, no other name and no power.
- the payload lists: every payload a plain tensor file (`weight_N`, `tensor_N`), never an object
  that torch would unpickle whatever the list says (`custom_obj_N`, `opaque_obj_N`).

torch then reads a fresh archive holding exactly the checked (and cleaned) entries, so what it
reads cannot differ from what was checked. Whatever torch still refuses becomes one line.
"""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

from pipeline.errors import MissingError, WeightsError

ENTRIES = re.compile(
    r"[^/]+/(data/weights/weight_\d+|data/(weights|constants)/\w+_config\.json|models/\w+\.json"
    r"|data/sample_inputs/\w+\.pt|extra/[\w.-]+|archive_format|archive_version|byteorder|\.data/version"
    r"|\.data/serialization_id)"
)
MAX_EXPANSION = (
    16  # an export is stored, not compressed: entries that unpack to far more are a zip bomb
)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PATH = re.compile(r"[A-Za-z0-9_.]*")  # a module path ("" for the root, "body.layer1.0")
TARGET = re.compile(r"torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.getitem")
PRINTABLE = re.compile(r"[\x20-\x7e]*")
NAME_KEYS = {"name"}
PATH_KEYS = {"fqn", "parameter_name", "buffer_name", "constant_name", "target_name"}
PYTREE_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}
PAYLOAD = re.compile(r"(weight|tensor)_\d+")
# An integer shape expression as torch writes it (sympy's srepr: calls, no infix operators), token
# by token: a quoted symbol name, a number, a name of EXPRESSION_NAMES, a minus sign, a parenthesis,
# a comma, an equals sign. No dot, so no attribute access; no `*`, so no power.
EXPRESSION_TOKEN = re.compile(r"\s+|'[A-Za-z]{1,8}\d{0,9}'|\d{1,20}(?!\d)|[A-Za-z_]\w*|[-(),=]")
# Only what integer shape expressions are made of: no powers, no floats (nothing to blow up)
_NAMES = (
    "Symbol Integer Rational Add Mul Max Min FloorDiv CleanDiv CeilDiv Mod PythonMod oo "
    "IntInfinity NegativeIntInfinity True False integer positive nonnegative real finite"
)
EXPRESSION_NAMES = frozenset(_NAMES.split())
MAX_EXPRESSION = 4096


class Refused(Exception):
    """Why an archive is not loaded (turned into a WeightsError naming the file)."""


def _refuse(path: Path, why: str) -> WeightsError:
    return WeightsError(
        f"refusing to load {path}: {why}; load only exports made by `pipeline export`"
    )


def load_export(path: str | Path) -> Any:
    """`torch.export.load` for a file from others, after the checks above. Returns the
    ExportedProgram (``.module()`` gives the callable); anything refused is a one-line WeightsError.
    """
    path = Path(path)
    try:
        entries = _read_entries(path)
        for name, data in list(entries.items()):
            entries[name] = _checked(name, data)
    except Refused as why:
        raise _refuse(path, str(why)) from None
    except FileNotFoundError:
        raise MissingError(f"no export at {path}; write one with `pipeline export`") from None
    clean = io.BytesIO()
    with zipfile.ZipFile(clean, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return _torch_load(path, clean.getvalue())


def _read_entries(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        raise Refused("it is a folder")
    if path.exists() and not path.is_file():
        raise Refused("it is not a regular file")  # a FIFO would block the read forever
    data = path.read_bytes()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            declared = sum(item.file_size for item in archive.infolist())
            if declared > MAX_EXPANSION * len(data) + (1 << 20):
                raise Refused(
                    f"its entries unpack to {declared / 1e9:.1f} GB from {len(data) / 1e6:.1f} MB"
                )
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise Refused(f"entry {repeated[0]!r} appears more than once")
            tops = {name.split("/", 1)[0] for name in names}
            if len(tops) != 1:
                raise Refused(
                    f"its entries sit under {len(tops)} top folders ({', '.join(sorted(tops))})"
                )
            entries = {}
            for name in names:
                if not ENTRIES.fullmatch(name):
                    raise Refused(f"unexpected entry {name!r}")
                entries[name] = archive.read(name)  # checks the entry's own header and CRC too
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError):
        raise Refused("it is not a torch.export archive") from None
    if not any("/models/" in name for name in entries):
        raise Refused("it holds no program (models/*.json)")
    return entries


def _json(name: str, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refused(f"{name} is not JSON") from None


def _checked(name: str, data: bytes) -> bytes:
    """The entry as torch may read it: checked, and for a program, its debug metadata dropped."""
    if name.endswith("_config.json"):
        try:
            config = _json(name, data)["config"]
            pickled = any(entry.get("use_pickle", True) for entry in config.values())
        except (TypeError, KeyError, AttributeError):
            raise Refused(f"{name} is not a payload list") from None
        if pickled:
            raise Refused(f"{name} declares pickled payloads")
        for entry in config.values():
            if not PAYLOAD.fullmatch(str(entry.get("path_name"))):
                raise Refused(f"{name} names a payload {str(entry.get('path_name'))[:40]!r}")
        return data
    if "/data/sample_inputs/" in name:
        import torch

        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception:
            raise Refused(f"{name} is not plain tensors") from None
        return data
    if "/models/" in name:
        program = _json(name, data)
        try:
            _check_program(program)
        except (TypeError, KeyError, AttributeError, ValueError):
            raise Refused(f"{name} is not a program of the expected form") from None
        return json.dumps(program).encode()
    if "/extra/" in name:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(f"{name} is not UTF-8 text") from None
    return data


def _check_program(program: dict[str, Any]) -> None:
    """Raise Refused for anything of a program that could become code; drop the nodes' metadata."""
    if program.get("guards_code"):
        raise Refused("its program carries guard code")
    graph = program["graph_module"]["graph"]
    if graph.get("custom_obj_values"):
        raise Refused("its program holds custom objects")
    for node in graph["nodes"]:
        if not TARGET.fullmatch(str(node["target"])):
            raise Refused(f"its program calls {str(node['target'])[:80]!r}, not an ATen operator")
        node["metadata"] = {}
    _walk(program, ())
    module = program["graph_module"]
    for entry in module.get("module_call_graph") or []:
        signature = entry.get("signature") or {}
        for key in ("in_spec", "out_spec"):
            if signature.get(key):
                _check_pytree(_json(key, signature[key].encode()))


def _walk(value: Any, where: tuple[str, ...]) -> None:
    """Every string printable ASCII; names identifiers and module paths dotted, wherever they
    sit."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not PRINTABLE.fullmatch(key):
                raise Refused(f"its program has a key {str(key)[:40]!r} of unexpected characters")
            if where and where[-1].endswith("_values") and not NAME.fullmatch(key):
                raise Refused(f"its program names a value {key[:40]!r}")
            _walk(item, (*where, key))
    elif isinstance(value, list):
        for item in value:
            _walk(item, where)
    elif isinstance(value, str):
        key = where[-1] if where else ""
        if not PRINTABLE.fullmatch(value):
            raise Refused(
                f"its program has a string of unexpected characters at {'/'.join(where)[-60:]}"
            )
        if key in NAME_KEYS and not NAME.fullmatch(value):
            raise Refused(f"its program has a name {value[:40]!r} that is not an identifier")
        if key in PATH_KEYS and not PATH.fullmatch(value):
            raise Refused(f"its program has a module path {value[:40]!r} that is not a dotted name")
        if key == "expr_str":
            _check_expression(value)


def _check_expression(text: str) -> None:
    """A symbolic shape torch will `sympify` (an eval): only known names, no attribute access."""
    if len(text) > MAX_EXPRESSION or text.count("(") > 256:
        raise Refused(f"its program has a shape expression of {len(text)} characters")
    at = 0
    while at < len(text):
        token = EXPRESSION_TOKEN.match(text, at)
        if token is None:
            raise Refused(f"its program has a shape expression {text[:60]!r} that is not one")
        word = token.group()
        if (word[0].isalpha() or word[0] == "_") and word not in EXPRESSION_NAMES:
            raise Refused(f"its program has a shape expression naming {word[:40]!r}")
        at = token.end()


def _check_pytree(spec: Any) -> None:
    if isinstance(spec, list):
        for item in spec:
            _check_pytree(item)
    elif isinstance(spec, dict):
        if "type" in spec and spec["type"] not in PYTREE_TYPES:
            raise Refused(f"its program's inputs or outputs are of type {str(spec['type'])[:60]!r}")
        for item in spec.values():
            _check_pytree(item)


def _torch_load(path: Path, data: bytes) -> Any:
    """torch.export.load of checked bytes; its own refusals (and the tracebacks it logs) become one
    line."""
    import torch

    quiet = logging.getLogger("torch")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise _refuse(path, f"torch cannot read it ({type(exc).__name__}: {reason})") from None
    finally:
        quiet.setLevel(level)
