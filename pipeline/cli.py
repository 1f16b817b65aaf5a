"""The command line: `pipeline features | info | ...`. The only module that prints errors or sets
exit codes: user mistakes become one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pipeline import __version__
from pipeline.config import FeaturesConfig, HeadConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.settings import add_arguments, load_table, resolve


class _Help(argparse.HelpFormatter):
    """Every flag's default shown once: appended where the help does not already say it, left out
    where there is none (None, False, or a flag read from the config's own help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or default == []:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        if default is True and isinstance(action, argparse.BooleanOptionalAction):
            shown = action.option_strings[0]
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line like every other error (`main` prints it, exit status 2), not a
    usage block; subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--weight` is no flag: a later one could be
        super().__init__(*args, **kwargs)

    def _commands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """Unknown flags are named with the subcommand they were given to and its closest flag."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._commands().get(getattr(parsed, "command", None) or "", self)
            flags = [f for f in command._option_string_actions if f.startswith("--")]
            close = [
                match
                for extra in extras
                if extra.startswith("-")
                for match in difflib.get_close_matches(extra.split("=")[0], flags, n=1)
            ]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{command.prog}: unrecognized arguments: {' '.join(extras)}{hint}; see "
                f"`{command.prog} --help`"
            )
        return parsed

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)'", message)
        names = list(self._commands())
        close = difflib.get_close_matches(choice.group(1), names, n=1) if choice and names else []
        if close:
            message = f"no command {choice.group(1)!r} (did you mean {close[0]!r}?)"
        raise ConfigError(f"{self.prog}: {message}; see `{self.prog} --help`")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _config(args: argparse.Namespace, cls: type, table: str) -> Any:
    """defaults < the config file's [table] < flags given on the command line."""
    flags = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    file_values = load_table(args.config, table) if args.config else {}
    return resolve(cls, file_values, flags, source=f"{args.config} [{table}]")


def _features(args: argparse.Namespace) -> int:
    from pipeline.features import stage  # torch is imported only by the commands that need it

    stage.run(_config(args, FeaturesConfig, "features"), report=_say)
    return 0


def _head(args: argparse.Namespace) -> int:
    from pipeline.evaluate import report
    from pipeline.heads import protocol  # no torch unless the torch head is chosen

    if args.cache is not None:
        if getattr(args, "features", args.cache) != args.cache:
            raise ConfigError(
                f"two caches given: {args.cache} and --features {args.features}; pass one"
            )
        args.features = args.cache
    result = protocol.run(_config(args, HeadConfig, "head"), report_to=_say)
    print(report.format_table(result))
    plots = "validation_curve.png, confusion_matrix.png, reliability.png"
    _say(f"results in {result['out']}/: result.json, curve.csv, {plots}")
    return 0


def _rank(args: argparse.Namespace) -> int:
    from pipeline import rank
    from pipeline.settings import parse_size

    budget = None if args.max_memory is None else parse_size(args.max_memory)
    layers = args.layer or [None]
    ranked = rank.run(args.caches, layers, args.out, budget, args.progress, args.force)
    print(rank.format_table(ranked))
    if args.out:
        _say(f"scores in {args.out}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from pipeline import study

    summary = study.run(args.file, report=_say, progress=args.progress)
    if summary["failed"]:
        _say(
            f"error: {len(summary['failed'])} cell(s) failed: "
            + "; ".join(f["cell"] for f in summary["failed"])
        )
        return 2
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pipeline.evaluate import compare

    compare.check_alpha(args.alpha)
    if args.pair:
        a, b = (compare.load_run(p) for p in args.pair)
        print(compare.pair(a, b, args.alpha)["statement"])
        return 0
    done = compare.write_report(args.paths, args.out, args.alpha, force=args.force)
    for reason in done["skipped"]:
        _say(f"skipped: {reason}")
    for p in done["pairs"]:
        print(("* " if p["significant"] else "  ") + p["statement"])
    _say(f"wrote {done['report']} ({done['runs']} runs, {len(done['pairs'])} paired comparisons)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from pipeline import predict

    overrides = {
        k: getattr(args, k)
        for k in ("device", "batch_size", "workers", "progress")
        if getattr(args, k) is not None
    }
    done = predict.predict(
        args.head,
        args.data,
        args.out,
        args.top_k,
        args.strict,
        args.weights,
        overrides,
        report=_say,
        force=args.force,
    )
    print(predict.format_predictions(done, args.top_k))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline import predict

    predict.export(args.head, args.out, args.weights, report=_say, force=args.force)
    return 0


def _info(args: argparse.Namespace) -> int:
    from pipeline.cache import reader

    if args.path is None and args.config is None:
        raise ConfigError(
            "info needs a cache file: pass its path, or --config with a [features] table"
        )
    path = args.path or _config(args, FeaturesConfig, "features").out_path
    print(format_summary(reader.summary(path)))
    return 0


def _pack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline import outputs
    from pipeline.cache import virtual

    source, out = Path(args.cache), Path(args.out)
    outputs.check_file_output(out, "pack", args.force or virtual.same_cache(source, out))
    virtual.pack(source, out, report=_say)
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from pipeline.backbones import catalog

    if args.cuts:
        if not args.filter:
            raise ConfigError(
                "--cuts lists the cut points of one backbone: pipeline backbones resnet50 --cuts"
            )
        print(catalog.format_cuts(args.filter))
        return 0
    if args.layers:
        if not args.filter:
            raise ConfigError(
                "--layers lists the modules of one backbone: pipeline backbones resnet50 --layers"
            )
        print(catalog.format_layers(args.filter))
        return 0
    if args.filter and not catalog.torchvision_rows(args.filter):
        timm = catalog.timm_names(args.filter.removeprefix(catalog.TIMM_PREFIX))
        if not timm:
            names = [row["name"] for row in catalog.torchvision_rows()]
            close = difflib.get_close_matches(args.filter, names, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"no backbone matches {args.filter!r}; {hint}`pipeline backbones` lists them all"
            )
    print(catalog.format_table(args.filter))
    return 0


def _short_list(names: list[str], most: int = 10) -> str:
    shown = ", ".join(names[:most])
    return f"{shown}, ... ({len(names) - most} more)" if len(names) > most else shown


def format_summary(s: dict[str, Any]) -> str:
    state = (
        "complete"
        if s["complete"]
        else f"INCOMPLETE ({s['rows_done']} of {s['shape'][0]} rows written)"
    )
    carved = "; ".join(
        f"{name} carved from {c['from']} ({c['fraction']:.0%}, seed {c['seed']})"
        for name, c in s["carved"].items()
    )
    splits = ", ".join(f"{name} {n}" for name, n in s["splits"].items() if n)
    lines = [
        f"{s['path']}: {state}, {s['bytes'] / 1e6:.1f} MB",
        f"  features     {s['shape']} {s['dtype']}"
        + (f"; logits {s['logits']}" if s["logits"] else ""),
        *(
            [
                "  layers       "
                + ", ".join(f"{k} {v}" for k, v in s["layers"].items())
                + "".join(f"; {k}: its whole output, flattened, float16" for k in s["cuts"])
            ]
            if s["layers"]
            else []
        ),
        f"  classes      {len(s['classes'])}: {_short_list(s['classes'])}",
        f"  splits       {splits}" + (f" ({carved})" if carved else ""),
        f"  skipped      {len(s['skipped'])} unreadable images"
        + (f": {_short_list(s['skipped'], 5)}" if s["skipped"] else ""),
        f"  source       {s['source']}",
        *([f"  precision    {_precision(s)}"] if s["fingerprint"].get("precision") else []),
        "  fingerprint",
        *(f"    {key:<14} {value}" for key, value in s["fingerprint"].items()),
        f"  created      {s['created']} with "
        + ", ".join(f"{k} {v}" for k, v in s["versions"].items()),
    ]
    return "\n".join(lines)


def _precision(s: dict[str, Any]) -> str:
    """The precision a cache was computed in, and why when `--precision auto` chose it (a record
    of another shape is left out; its text is shown printable and short)."""

    def shown(value: Any) -> str:
        text = "".join(c if c.isprintable() else " " for c in str(value))
        return text if len(text) <= 120 else text[:117] + "..."

    choice = s.get("precision_choice") or {}
    text = shown(s["fingerprint"]["precision"])
    if choice.get("requested") == "auto":
        text += f" (auto: {shown(choice.get('why', '?'))}"
        cosine, images = choice.get("min_cosine_to_fp32"), choice.get("images_checked")
        if isinstance(cosine, int | float) and isinstance(images, int) and images > 0:
            text += f"; least cosine to fp32 {cosine:.6f} on {images} images"
        if "fallback_from" in choice:
            text += f"; {shown(choice['fallback_from'])} fell short"
        text += ")"
    return text


def _head_arguments(parser: argparse.ArgumentParser) -> None:
    """What `predict` and `export` both need: the trained head, and where its weights are now."""
    parser.add_argument("--head", required=True, help="a results folder written by `pipeline head`")
    parser.add_argument(
        "--weights", help="where the backbone weights are now (checked against the cache)"
    )
    _force_argument(parser)


def _force_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="replace an existing --out file that this command did not write",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pipeline",
        description="Cached-embedding linear probing: extract frozen backbone features once, then "
        "train heads fast.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, cls, handler, help_text, description, usage in (
        (
            "features",
            FeaturesConfig,
            _features,
            "extract backbone features of an image set into an HDF5 cache",
            "Pass every image through a frozen torchvision or timm model once and cache its "
            "penultimate features.",
            "pipeline features (--data PATH | --dataset NAME) [--backbone NAME] [--weights W] "
            "[--out FILE] [...]",
        ),
        (
            "head",
            HeadConfig,
            _head,
            "train a head on a cache: choose its setting on val, refit, test once",
            "Train a head (linear, kNN or nearest class mean) on cached features: choose its "
            "setting (C, k) "
            "on validation, refit on train+val, score the test split once.",
            "pipeline head CACHE [--head torch|logreg|knn|ncm] [--out DIR] [...]",
        ),
    ):
        stage = commands.add_parser(
            name, help=help_text, description=description, usage=usage, formatter_class=_Help
        )
        if name == "head":
            stage.add_argument("cache", nargs="?", help="the cache file (the same as --features)")
        stage.add_argument(
            "--config", help=f"TOML file whose [{name}] table sets any of these flags"
        )
        add_arguments(stage, cls)
        stage.set_defaults(handler=handler)

    ranking = commands.add_parser(
        "rank",
        formatter_class=_Help,
        help="score caches for their labels without training (LogME, H-score, LEEP, NCE, LOO)",
        description="Which backbone or layer: transferability scores of each cache's train rows "
        "(never val or test), best LogME first. See docs/guide/ranking.md.",
    )
    ranking.add_argument("caches", nargs="+", metavar="CACHE", help="the .h5 caches to score")
    ranking.add_argument(
        "--layer",
        action="append",
        help="score this stored layer ('penultimate' for the features; commas concatenate); "
        "repeat it for several (default: the penultimate features)",
    )
    ranking.add_argument("--out", help="also write the scores as JSON, e.g. results/scores.json")
    ranking.add_argument(
        "--max-memory", help="bound on the rows held at once, e.g. 1GB (the default reads 64 MB)"
    )
    ranking.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress"
    )
    _force_argument(ranking)
    ranking.set_defaults(handler=_rank)

    study = commands.add_parser(
        "study",
        formatter_class=_Help,
        help="run a study: datasets x backbones x heads through the cache, then compare",
        description="Run every cell of a study file (TOML): extraction through the cache, then "
        "each head.",
    )
    study.add_argument("file", help="the study file, e.g. configs/transfer-suite.toml")
    study.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress"
    )
    study.set_defaults(handler=_study)

    compare = commands.add_parser(
        "compare",
        formatter_class=_Help,
        help="one table (Markdown + CSV) from many head results, with paired tests and plots",
        description="Gather result.json files into one comparison with 95% intervals and paired "
        "tests.",
    )
    compare.add_argument(
        "paths", nargs="*", default=["results"], help="result folders, searched recursively"
    )
    compare.add_argument(
        "--out", default="results/report.md", help="the Markdown report (CSV and PNGs beside it)"
    )
    compare.add_argument(
        "--alpha", type=float, default=0.05, help="significance level of the paired tests"
    )
    compare.add_argument(
        "--pair", nargs=2, metavar="RESULT", help="compare just these two runs, paired"
    )
    _force_argument(compare)
    compare.set_defaults(handler=_compare)

    predict = commands.add_parser(
        "predict",
        formatter_class=_Help,
        help="classify new images with a trained head (rebuilds its backbone)",
        description="Rebuild the head's backbone and preprocessing, classify images, write top-k "
        "to a CSV.",
    )
    _head_arguments(predict)
    predict.add_argument(
        "--data", required=True, help="a folder of images, a CSV with a path column, or one image"
    )
    predict.add_argument("--out", default="predictions.csv", help="the CSV to write")
    predict.add_argument("--top-k", type=int, default=5, help="classes per image in the CSV")
    predict.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stop on an unreadable image instead of listing it",
    )
    predict.add_argument(
        "--device", help="auto, cpu, cuda, cuda:N or mps (default: as the cache was made)"
    )
    predict.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="images per forward pass (default: as the cache was made)",
    )
    predict.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="DataLoader worker processes (default: as the cache was made)",
    )
    predict.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: as the cache was made)",
    )
    predict.set_defaults(handler=_predict)

    export = commands.add_parser(
        "export",
        formatter_class=_Help,
        help="one torch file with backbone, preprocessing constants and head",
        description="Write a torch.export program (uint8 crops -> probabilities) that loads "
        "without this package.",
    )
    _head_arguments(export)
    export.add_argument("--out", required=True, help="the file to write, e.g. classifier.pt2")
    export.set_defaults(handler=_export)

    info = commands.add_parser(
        "info",
        help="describe a cache file",
        description="Summarise a feature cache file.",
        formatter_class=_Help,
    )
    info.add_argument("path", nargs="?", help="the .h5 cache file")
    info.add_argument("--config", help="or: the TOML file whose [features] table names the cache")
    info.set_defaults(handler=_info)

    pack = commands.add_parser(
        "pack",
        formatter_class=_Help,
        help="copy a cache (a virtual one over torchrun part files, or any) into one "
        "self-contained file",
        description="Write every row and attribute of a cache into one ordinary file (verified, "
        "then renamed).",
    )
    pack.add_argument("cache", help="the cache to pack, e.g. cache/big.h5")
    pack.add_argument("--out", required=True, help="the single file to write")
    _force_argument(pack)
    pack.set_defaults(handler=_pack)

    backbones = commands.add_parser(
        "backbones",
        formatter_class=_Help,
        help="list the backbones: family, feature dimension, the layer it is the input of, "
        "weights, preprocessing",
        description="List the torchvision classification models (and timm ones, with the extra) by "
        "name.",
    )
    backbones.add_argument(
        "filter", nargs="?", default="", help="only names containing this, e.g. vit or resnet"
    )
    backbones.add_argument(
        "--layers", action="store_true", help="list the modules of the backbone FILTER names"
    )
    backbones.add_argument(
        "--cuts",
        action="store_true",
        help="list where `features --cut` may cut the backbone FILTER names for `head --head "
        "tail`, with the bytes per image each costs",
    )
    backbones.set_defaults(handler=_backbones)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, interruptible: bool = False) -> int:
    """Run one command; user mistakes are one line on stderr and exit status 2.

    `interruptible` (the program entry sets it): SIGTERM stops a run like Ctrl-C, inside the
    handlers that keep finished work and print one line; outside them both signals exit quietly.
    """
    quiet = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        if interruptible:
            signal.signal(signal.SIGINT, _interrupt)
            signal.signal(signal.SIGTERM, _interrupt)
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except PipelineError as exc:
        _say(f"error: {exc}")
        if interruptible and getattr(exc, "hdf5_broken", False):
            # HDF5 may crash while tearing down a file whose write failed; everything is already
            # saved or reported, so leave without its exit handlers.
            sys.stdout.flush()
            os._exit(2)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:  # `pipeline info X | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if _raised_in_hdf5(exc):  # a damaged file found past the checks made where it was opened
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            _say(
                f"error: an HDF5 file does not read back ({reason}): it is damaged; rebuild it "
                "with the command that wrote it (`pipeline features --force`)"
            )
            return 2
        if isinstance(exc, OSError):  # the file system refused something the user pointed at
            where = f"{exc.filename}: " if exc.filename else ""
            _say(f"error: {where}{exc.strerror or exc}; check the path and its permissions")
            return 2
        raise
    finally:
        if interruptible:
            signal.signal(signal.SIGINT, quiet[0])
            signal.signal(signal.SIGTERM, quiet[1])


def _raised_in_hdf5(exc: BaseException) -> bool:
    """The exception came out of h5py (its innermost frame is h5py's)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("h5py")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
