"""`pipeline study FILE.toml`: datasets x backbones x heads, each cell through the cache.

Every (dataset, backbone) pair is extracted once (a current cache is reused, never recomputed)
and every head runs on it; optional few-shot runs give accuracy-versus-shots curves. A failing
cell is reported and the rest go on. At the end `pipeline compare` writes the study's report.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import FeaturesConfig, HeadConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.settings import load_document, resolve

TABLES = ("study", "features", "head", "datasets", "backbones", "heads", "fewshot")
STUDY_KEYS = ("name", "results", "cache", "rank")
FEWSHOT_KEYS = ("head", "shots", "repeats")
Report = Callable[[str], None]


def _slug(text: str) -> str:
    """`text` as one folder name: never a path, never `.` or `..`, never hidden."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated study: one features config per (dataset, backbone), head configs per cell."""

    name: str
    results: Path
    extractions: list[tuple[str, str, FeaturesConfig]]  # (dataset label, backbone label, config)
    heads: list[tuple[str, dict[str, Any]]]  # (head label, [head] values)
    fewshot: dict[str, Any] | None
    head_defaults: dict[str, Any]
    rank: bool = True  # transferability scores of each cache (and layer) beside each head run


def _entries(document: dict[str, Any], key: str, source: str) -> list[dict[str, Any]]:
    entries = document.get(key, [])
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise ConfigError(
            f"{source}: needs at least one [[{key}]] table; see configs/demo-study.toml"
        )
    return entries


def _check_keys(values: dict[str, Any], allowed: list[str], where: str) -> None:
    for key in values:
        if key.replace("-", "_") not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(allowed)}")


def _check_unique(labels: list[str], table: str, source: str) -> None:
    """Each entry of a table names its own cache and result folders: two that share a name (as their
    folder names spell it) would overwrite each other."""
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        j = seen.setdefault(_slug(label), i)
        if j != i:
            raise ConfigError(
                f"{source}: [[{table}]] #{j + 1} and #{i + 1} are both named {label!r}; give each "
                "a distinct name"
            )


def _defaults_for(head: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The [head] defaults that apply to `head`: a C grid, C and class weights set there are for the
    kinds trained with C (and a preprocessing only for the kinds that take it); a [[heads]] entry
    sets its own."""
    from pipeline.heads import kinds

    kind = kinds.get(head)
    if kind.takes_c:
        return defaults
    skipped = {"grid", "C", "class_weight"}
    if defaults.get("preprocess") not in (None, "auto", *kind.preprocessings):
        skipped.add("preprocess")
    return {key: value for key, value in defaults.items() if key.replace("-", "_") not in skipped}


def _backbone_label(entry: dict[str, Any]) -> str:
    return (
        entry.get("name")
        or f"{entry.get('backbone', 'resnet50')}-{entry.get('weights', 'DEFAULT')}"
    )


def plan(path: str | Path) -> Plan:
    """Read and validate the whole study before anything runs."""
    from pipeline import registry
    from pipeline.backbones import backbone
    from pipeline.heads import kinds

    source = str(path)
    document = load_document(path, example="configs/demo-study.toml")
    for key in document:
        if key not in TABLES:
            raise ConfigError(f"{source}: unknown table {key!r}; valid ones: {', '.join(TABLES)}")
    study = document.get("study", {})
    _check_keys(study, list(STUDY_KEYS), f"{source} [study]")
    name = study.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise ConfigError(f"{source} [study]: name = {name!r} is not a string; name it in quotes")
    results = Path(study.get("results", "results")) / _slug(name)
    ranks = study.get("rank", True)
    if not isinstance(ranks, bool):
        raise ConfigError(f"{source} [study]: rank = {ranks!r}; expected true or false")
    cache = Path(study.get("cache", "cache"))
    feature_fields = [f.name for f in dataclasses.fields(FeaturesConfig)]
    head_fields = [f.name for f in dataclasses.fields(HeadConfig)]
    defaults = document.get("features", {})
    _check_keys(defaults, feature_fields, f"{source} [features]")
    head_defaults = document.get("head", {})
    _check_keys(head_defaults, head_fields, f"{source} [head]")

    datasets = _entries(document, "datasets", source)
    backbones = _entries(document, "backbones", source)
    extractions = []
    labels = [
        ds.get("name") or ds.get("dataset") or Path(str(ds.get("data", f"data{i}"))).stem
        for i, ds in enumerate(datasets)
    ]
    _check_unique(labels, "datasets", source)
    _check_unique([_backbone_label(bb) for bb in backbones], "backbones", source)
    for i, ds in enumerate(datasets):
        where = f"{source} [[datasets]] #{i + 1}"
        _check_keys(ds, ["name", *feature_fields], where)
        if "dataset" in ds:
            registry.canonical_dataset_name(
                ds["dataset"]
            )  # unknown names fail here, listing the valid ones
        label = labels[i]
        for j, bb in enumerate(backbones):
            _check_keys(bb, ["name", *feature_fields], f"{source} [[backbones]] #{j + 1}")
            bb_label = _backbone_label(bb)
            values = {**defaults, **{k: v for k, v in ds.items() if k != "name"}}
            values.update({k: v for k, v in bb.items() if k != "name"})
            values.setdefault("out", str(cache / f"{_slug(label)}-{_slug(bb_label)}.h5"))
            values["progress"] = False
            cfg = resolve(FeaturesConfig, values, {}, source=where)
            backbone.describe(
                cfg.backbone, cfg.weights, cfg.seed, cfg.image_size
            )  # names checked up front
            extractions.append((label, bb_label, cfg))
    heads = []
    for k, hd in enumerate(_entries(document, "heads", source)):
        where = f"{source} [[heads]] #{k + 1}"
        _check_keys(hd, ["name", *head_fields], where)
        head = hd.get("head", head_defaults.get("head", registry.DEFAULT_HEAD))
        values = {
            **_defaults_for(head, head_defaults),
            **{key: v for key, v in hd.items() if key != "name"},
        }
        checked = resolve(
            HeadConfig, {**values, "features": "check.h5"}, {}, source=where
        )  # validate now
        try:
            kinds.validate(checked)  # and with the rules of the head's kind
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        heads.append((hd.get("name") or values.get("head", registry.DEFAULT_HEAD), values))
    _check_unique([label for label, _ in heads], "heads", source)
    fewshot = document.get("fewshot")
    if fewshot is not None:
        _check_keys(fewshot, list(FEWSHOT_KEYS), f"{source} [fewshot]")
        shots = fewshot.get("shots", [1, 2, 4, 8, 16])
        if not shots or not all(isinstance(s, int) and s > 0 for s in shots):
            raise ConfigError(
                f"{source} [fewshot]: shots = {shots!r}; expected positive whole numbers, e.g. [1, "
                "2, 4]"
            )
        head = fewshot.get("head", registry.DEFAULT_HEAD)
        fewshot = {"head": head, "shots": shots, "repeats": fewshot.get("repeats", 5)}
    plan = Plan(name, results, extractions, heads, fewshot, head_defaults, ranks)
    _check_outputs(plan, source)
    return plan


def cell_folder(plan: Plan, data: str, backbone: str, head: str, shots: int | None = None) -> Path:
    """Where the cell (dataset, backbone, head[, shots]) writes its results."""
    return (
        plan.results
        / ("fewshot" if shots else "")
        / f"{_slug(data)}__{_slug(backbone)}__{_slug(head)}"
    )


def _fewshot_labels(plan: Plan) -> list[tuple[str, int]]:
    if not plan.fewshot:
        return []
    return [(f"{plan.fewshot['head']}-{k}shot", k) for k in plan.fewshot["shots"]]


def _check_outputs(plan: Plan, source: str) -> None:
    """No two cells write one results folder, and no two extractions one cache, however their names
    join (`a__b` + `c` and `a` + `b__c` spell the same folder)."""
    folders: dict[Path, str] = {}
    caches: dict[Path, tuple[str, FeaturesConfig]] = {}
    for data, bb, cfg in plan.extractions:
        earlier = caches.setdefault(cfg.out_path, (f"{data} / {bb}", cfg))
        if earlier[1] != cfg:
            raise ConfigError(
                f"{source}: {earlier[0]} and {data} / {bb} would both write the cache "
                f"{cfg.out_path}; give the "
                "entries names that differ, or set out = ... in one of them"
            )
        for head, shots in [(label, None) for label, _ in plan.heads] + _fewshot_labels(plan):
            cell = f"{data} / {bb} / {head}"
            other = folders.setdefault(cell_folder(plan, data, bb, head, shots), cell)
            if other != cell:
                raise ConfigError(
                    f"{source}: {other} and {cell} would both write "
                    f"{cell_folder(plan, data, bb, head, shots)}; "
                    "give the entries names that do not run into each other"
                )


def _extract(fcfg: FeaturesConfig, report: Report) -> Any:
    """The cell's cache made current, never at the cost of a file the study did not write: a cache
    at its name that holds other features (another model or preprocessing) is refused, naming the
    keys; a cache of the very same features under another name in the folder is used as it is."""
    from pipeline.cache import reader, schema
    from pipeline.features import extract, stage

    def precision_only(message: str) -> None:  # the study says what auto chose, nothing else
        if message.startswith("precision: "):
            report(f"{out.name}: {message}")

    out = fcfg.out_path
    prepared = extract.prepare(fcfg, precision_only)
    wanted = prepared.wanted
    if out.exists() and not fcfg.force:
        with reader.open_cache(out) as f:
            existing = schema.json_attr(f, "fingerprint")
        if schema.model_part(existing) != schema.model_part(wanted):
            differs = "; ".join(
                schema.fingerprint_diff(schema.model_part(existing), schema.model_part(wanted))
            )
            raise ConfigError(
                f"{out} holds other features ({differs}) and a study never replaces a cache; move "
                "it, or give "
                'this cell its own file with out = "..." in its [[datasets]] or [[backbones]] entry'
            )
    # under --precision auto a twin computed in any precision holds these features too
    variants = (
        {p: wanted | {"precision": p} for p in ("fp32", "bf16", "fp16")}
        if fcfg.precision == "auto"
        else {wanted["precision"]: wanted}
    )
    if reader.stored_fingerprint(out) != wanted:
        for twin in sorted(out.parent.glob("*.h5")) if out.parent.is_dir() else []:
            try:
                found = reader.stored_fingerprint(twin) if twin != out else None
            except PipelineError:
                continue
            same = next((p for p, v in variants.items() if found == v), None)
            if same:
                report(f"reusing {twin}: it holds the very features {out} would ({same})")
                return stage.run_local(dataclasses.replace(fcfg, out=str(twin), precision=same))
    return stage.run_local(fcfg, prepared=prepared)


class _Scores:
    """A cache's transferability scores per layer, computed once on first use; a cache the scores
    cannot be computed on is said once, and its runs go on without them."""

    def __init__(self, cache: Path, cell: str, say: Report) -> None:
        self.cache, self.cell, self.say = cache, cell, say
        self.found: dict[str | None, dict[str, float]] = {}

    def __call__(self, layer: str | None) -> dict[str, float]:
        from pipeline import rank

        if layer not in self.found:
            try:
                scores = rank.score_cache(self.cache, layer)
            except PipelineError as exc:
                self.say(f"no transferability scores for {self.cell}: {exc}")
                scores = {}
            self.found[layer] = {name: scores[name] for name in rank.SCORES if name in scores}
        return self.found[layer]


def run(
    path: str | Path, report: Report = lambda message: None, progress: bool = True
) -> dict[str, Any]:
    """Run every cell; returns {computed, reused, failed, runs} and writes the comparison report."""
    from pipeline.evaluate import compare
    from pipeline.heads import protocol

    p = plan(path)
    try:  # before any work: the report's names are free, or a previous study's
        compare.check_report_target(p.results / "report.md", force=False)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}".split(";")[0] + "; move it away, or give the study another name"
        ) from None
    n_fewshot = len(p.fewshot["shots"]) if p.fewshot else 0
    steps = len(p.extractions) * (1 + len(p.heads) + n_fewshot)
    summary: dict[str, Any] = {"computed": [], "reused": [], "failed": [], "runs": []}
    started = time.perf_counter()
    report(
        f"study {p.name}: {len(p.extractions)} caches x {len(p.heads)} heads (+{n_fewshot} "
        "few-shot runs each)"
    )
    bar = tqdm(total=steps, unit="step", desc=f"study {p.name}", disable=not progress)

    def attempt(label: str, job: Callable[[], Any]) -> Any:
        bar.set_postfix_str(label, refresh=True)
        try:
            return job()
        except PipelineError as exc:
            summary["failed"].append({"cell": label, "error": str(exc)})
            bar.write(f"failed: {label}: {exc}", file=sys.stderr)
            return None
        finally:
            bar.update(1)

    with bar:
        for data_label, bb_label, fcfg in p.extractions:
            cell = f"{data_label} / {bb_label}"
            say = functools.partial(bar.write, file=sys.stderr)
            done = attempt(f"{cell}: features", lambda fcfg=fcfg, say=say: _extract(fcfg, say))
            if done is None:
                bar.update(len(p.heads) + n_fewshot)  # nothing to train on
                continue
            fcfg = dataclasses.replace(
                fcfg, out=done.path
            )  # a twin cache of the same features, when reused
            (summary["reused"] if done.status == "current" else summary["computed"]).append(
                str(fcfg.out_path)
            )
            scores = _Scores(fcfg.out_path, cell, say) if p.rank else None
            jobs = [(head_label, values, None) for head_label, values in p.heads]
            if p.fewshot:
                values = {**_defaults_for(p.fewshot["head"], p.head_defaults)}
                values |= {"head": p.fewshot["head"], "repeats": p.fewshot["repeats"]}
                jobs += [(label, {**values, "shots": k}, k) for label, k in _fewshot_labels(p)]
            for head_label, values, shots in jobs:
                out = cell_folder(p, data_label, bb_label, head_label, shots)
                hcfg = resolve(
                    HeadConfig, {**values, "features": str(fcfg.out_path), "out": str(out)}, {}
                )
                hcfg = dataclasses.replace(hcfg, progress=False)
                labels = {
                    "study": p.name,
                    "dataset": data_label,
                    "backbone": bb_label,
                    "head": head_label,
                }
                ranked = scores(hcfg.layer) if scores and not shots else None
                result = attempt(
                    f"{cell} / {head_label}",
                    lambda h=hcfg, c=labels, s=ranked: protocol.run(h, cell=c, scores=s),
                )
                if result is not None:
                    summary["runs"].append(str(out))
    if summary["runs"]:
        compare.write_report([p.results], p.results / "report.md")
    seconds = time.perf_counter() - started
    report(
        f"study {p.name} done in {seconds:.0f} s: {len(summary['computed'])} caches computed, "
        f"{len(summary['reused'])} reused, {len(summary['runs'])} head runs, "
        f"{len(summary['failed'])} failed; "
        + (f"report: {p.results / 'report.md'}" if summary["runs"] else "no run to report")
    )
    return summary
