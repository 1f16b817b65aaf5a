"""Frozen configuration per stage, resolved as: defaults < TOML file < command-line flags.

Each field carries its help text, so the command-line flags are generated from the dataclass and
every flag can also be written in the config file under the stage's table (``[features]``,
``[head]``). Validation lives in ``__post_init__`` so a config built from Python is checked too.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from pipeline import registry
from pipeline.errors import ConfigError
from pipeline.settings import (
    POSITIVE,
    check_bounds,
    check_choices,
    check_device,
    check_positive,
    flag,
    option,
    parse_size,
)

MAX_VIEWS = 1000  # views per train image: more is a typo, and would reserve disk for that many rows
MAX_LOGIT_ADJUST = 100.0  # tau: 1 is the paper's choice; far larger only overflows the offsets


@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
    """Everything that decides what the feature stage computes and where it goes."""

    data: str | None = option(
        None,
        "image folder ROOT/<class>/<img> or ROOT/{train,val,test}/<class>/<img>, or a CSV manifest",
        group="data",
    )
    data_val: str | None = option(
        None,
        "with tar shards: the val split's shard pattern (else val is carved from train)",
        group="data",
    )
    data_test: str | None = option(
        None, "with tar shards: the test split's shard pattern (else test is carved)", group="data"
    )
    label_key: str = option(
        "label",
        "with tar shards: the field of KEY.json that holds the label (KEY.cls is read first)",
        group="data",
    )
    dataset: str | None = option(
        None,
        "a dataset by name: 'digits' (offline demo) or a torchvision one, e.g. CIFAR10",
        group="data",
    )
    root: str = option(
        "cache/datasets",
        "folder that holds named datasets (downloaded or local copies)",
        group="data",
    )
    download: bool = option(
        False, "download a torchvision dataset into --root if it is not there", group="data"
    )
    val_fraction: float = option(
        0.1,
        "fraction of train (after test is carved) carved out as val when the source has none",
        group="data",
    )
    test_fraction: float = option(
        0.2,
        "fraction of train carved out as test when the source has none (the rule: --carve)",
        group="data",
    )
    split_seed: int = option(0, "seed of the val/test carving", group="data")
    carve: str = option(
        "auto",
        "how val/test are carved from train: hash (each id's seeded hash: adding images never "
        "moves one), "
        "stratified (exact per-class fractions, re-drawn when images are added); auto: hash for "
        "--data, "
        "stratified for --dataset",
        registry.CARVINGS,
        group="data",
    )
    verify_content: bool = option(
        False,
        "identify each image by a sha256 of its bytes too, not only its size and modification time",
        group="data",
    )
    backbone: str = option(
        "resnet50",
        "any torchvision classification model (resnet50, convnext_tiny, vit_b_16, efficientnet_b0; "
        "`pipeline backbones` lists them) or timm:NAME (with the timm extra)",
        group="backbone",
    )
    weights: str = option(
        "DEFAULT",
        "DEFAULT, a weights name (IMAGENET1K_V2), 'none' (random init), or a .pth path",
        group="backbone",
    )
    seed: int = option(0, "seed of the random initialisation when --weights none", group="backbone")
    image_size: int | None = option(
        None,
        "crop size (resize = size*256/224); default: the weights' own preprocessing",
        group="backbone",
        bounds=(16, 4096, "both"),
    )
    device: str = option(
        "auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", group="compute"
    )
    precision: str = option(
        "auto",
        "compute precision: auto is bf16 where the device computes it natively (a CPU with "
        "AVX512-BF16, AMX or Arm BF16; a CUDA GPU with bf16), fp16 on other CUDA GPUs, fp32 "
        "otherwise, and fp32 after all when the first images disagree with fp32 (cosine < 0.999); "
        "bf16/fp16 use autocast",
        registry.PRECISIONS,
        group="compute",
    )
    store_dtype: str = option(
        "float32", "dtype of the stored features", registry.STORE_DTYPES, group="output"
    )
    batch_size: int = option(
        64, "images per forward pass", group="compute", bounds=(1, 65536, "both")
    )
    workers: int | None = option(
        None,
        "DataLoader worker processes (default: one per core, at most 8)",
        group="compute",
        bounds=(0, 256, "both"),
    )
    decode: str = option(
        "cpu",
        "cpu: PIL in the DataLoader workers, JPEGs decoded reduced (DCT scaling) to at least twice "
        "the resize on the "
        "short side; exact: PIL, every image in full; device: workers read bytes, torchvision.io "
        "decodes in full",
        registry.DECODERS,
        group="compute",
    )
    compile: bool = option(
        False,
        "torch.compile the backbone: pays off on long runs (on a 2-core CPU, resnet50 in bf16 "
        "1.34x faster after 33 s of compiling: beyond about 4,000 images)",
        group="compute",
    )
    logits: bool = option(
        False, "also store the backbone's own classifier logits", group="backbone"
    )
    layers: str | None = option(
        None,
        "also store these modules' outputs, global-average-pooled, from the same forward pass: "
        "module paths "
        "joined by commas, e.g. layer3,layer4 (`pipeline backbones NAME --layers` lists them); "
        "read by head --layer",
        group="backbone",
    )
    cut: str | None = option(
        None,
        "also store this module's whole output (its feature map or token sequence, flattened, "
        "float16) as layer cut:MODULE, what `head --head tail` fine-tunes the rest of the backbone "
        "on (`pipeline backbones NAME --cuts` lists sensible ones and their bytes per image)",
        group="backbone",
    )
    views: int = option(
        0,
        "also extract this many augmented views of each train image into NAME.views.h5 (val/test: "
        "centre crop)",
        group="augmented views",
    )
    augment: str = option(
        "crop-flip",
        "the views' recipe: RandomResizedCrop at the crop size + horizontal flip",
        registry.AUGMENTATIONS,
        group="augmented views",
    )
    view_scale: float = option(
        0.08,
        "smallest area fraction a view's RandomResizedCrop keeps (torchvision: 0.08)",
        group="augmented views",
    )
    out: str | None = option(
        None, "cache file to write (default: cache/<data>-<backbone>.h5)", group="output"
    )
    force: bool = option(False, "rebuild even when the cache is current", group="output")
    on_mismatch: str = option(
        "rebuild", "when the cache was built differently", registry.ON_MISMATCH, group="output"
    )
    assemble: str = option(
        "virtual",
        "under torchrun: virtual (an HDF5 virtual dataset over the ranks' part files, which stay "
        "beside it) or copy "
        "(every row copied into one file)",
        registry.ASSEMBLIES,
        group="output",
    )
    skip_bad_images: bool = option(
        False, "record unreadable images and go on instead of stopping", group="data"
    )
    progress: bool = option(True, "show a progress bar", group="output")

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in (self.layers or "").split(",") if name.strip())

    @property
    def stored_layers(self) -> tuple[str, ...]:
        """Every layer the cache keeps beside its features: --layers, then the --cut."""
        return self.layer_names + (
            (f"{registry.CUT_PREFIX}{self.cut.strip()}",) if self.cut else ()
        )

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0 <= self.views <= MAX_VIEWS or not 0.0 < self.view_scale <= 1.0:
            raise ConfigError(
                f"--views {self.views} / --view-scale {self.view_scale}: expected 0 to {MAX_VIEWS} "
                "views per image "
                "(4 to 10 is usual) and a scale in (0, 1]"
            )
        if len(set(self.layer_names)) != len(self.layer_names):
            raise ConfigError(f"--layers {self.layers!r} names a module twice; name each once")
        if any(name.startswith(registry.CUT_PREFIX) for name in self.layer_names):
            raise ConfigError(
                f"--layers {self.layers!r}: a module's whole output is stored with --cut MODULE, "
                "not as a layer named cut:..."
            )
        if self.cut is not None and (not self.cut.strip() or "," in self.cut):
            raise ConfigError(
                f"--cut {self.cut!r} is not one module path; pass one, e.g. --cut layer3 "
                "(`pipeline backbones NAME --cuts` lists them)"
            )
        if self.data is None and self.dataset is None:
            raise ConfigError(
                "no images given; pass --data FOLDER_OR_CSV or --dataset NAME (try --dataset "
                "digits)"
            )
        if self.data is not None and self.dataset is not None:
            raise ConfigError(
                f"both --data {self.data!r} and --dataset {self.dataset!r} given; pass only one"
            )
        if self.dataset is not None:
            registry.canonical_dataset_name(
                self.dataset
            )  # an unknown name fails here, listing the valid ones
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(
                    f"--{flag(name)} {value} is out of range; expected a fraction in [0, 1)"
                )
        check_positive(self, "batch_size", "image_size")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(
                f"--image-size {self.image_size} is too small for these backbones; pass 16 or more "
                "(224 is usual)"
            )
        check_bounds(
            self
        )  # the upper limits: more is a typo that would exhaust memory, not a setting
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"--val-fraction {self.val_fraction} + --test-fraction {self.test_fraction} leave "
                "no train images; "
                "their sum must stay below 1"
            )
        if self.workers is not None and self.workers < 0:
            raise ConfigError(
                f"--workers {self.workers} is negative; pass 0 (load in this process) or more"
            )
        check_bounds(self)
        check_device(self.device)

    @property
    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        source = self.dataset or Path(self.data.rstrip("/")).stem  # type: ignore[union-attr]
        return Path("cache") / f"{source.lower()}-{self.backbone}.h5"


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """How the torch head optimises, each option declared once: its default, help and range.

    The ranges are checked here, and `TorchLinearClassifier` derives its parameter constraints from
    these declarations. `HeadConfig` is a `SolverOptions` with the head stage's other options. `tol`
    is on the mean scale (see `pipeline.heads.solver`)."""

    solver: str = option(
        "lbfgs",
        "lbfgs (full batch), adam or sgd (mini-batch, cosine schedule)",
        registry.SOLVERS,
        group="solver",
    )
    max_iter: int = option(
        1000, "L-BFGS iterations at most (both heads)", group="solver", bounds=(1, 10**7, "both")
    )
    # Tighter than scikit-learn's 1e-4: at 1e-4 both heads stop on the flat, weakly regularised part
    # of
    # the curve wherever their start leaves them, and which C is chosen can follow (docs: findings).
    tol: float = option(
        1e-6,
        "stop when max |gradient| <= tol, on the mean scale: mean weighted loss + ||W||^2 / (2 C "
        "n) (both heads; "
        "scikit-learn's gtol)",
        group="solver",
        bounds=POSITIVE,
    )
    epochs: int = option(
        30,
        "mini-batch solvers and the mlp head: passes over the data (at most, for mlp)",
        group="solver",
        bounds=(1, 10**5, "both"),
    )
    batch_size: int = option(
        512, "mini-batch solvers: rows per step", group="solver", bounds=(1, 10**8, "both")
    )
    lr: float | None = option(
        None,
        "mini-batch solvers and mlp: peak learning rate (default 1e-3 adam and mlp, 0.1 sgd)",
        group="solver",
        bounds=(0.0, 100.0, "right"),
    )
    label_smoothing: float = option(
        0.0,
        "torch head: label smoothing of the cross-entropy",
        group="solver",
        bounds=(0.0, 1.0, "left"),
    )
    balanced_sampler: bool = option(
        False, "torch mini-batch: draw every class equally often", group="long tail and calibration"
    )
    device: str = option("cpu", "torch head device: cpu, cuda, cuda:N, mps or auto", group="solver")
    seed: int = option(
        0,
        "seed of the holdout, few-shot draws, mini-batch order and bootstrap",
        group="selection",
        bounds=(0, float("inf"), "left"),
    )

    def __post_init__(self) -> None:
        check_choices(self)
        check_bounds(self)
        check_device(self.device)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> SolverOptions:
        """The options of any object with these attribute names (a `HeadConfig`), plus
        `overrides`."""
        values = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(cls)
            if hasattr(config, f.name)
        }
        return cls(**(values | overrides))

    @classmethod
    def for_head(cls, config: Any, streaming: bool, **overrides: Any) -> SolverOptions:
        """The options of a `HeadConfig`, its solver resolved: `auto` is L-BFGS with every row in
        memory and Adam when the rows stream from the file (L-BFGS needs full passes)."""
        solver = config.solver if config.solver != "auto" else ("adam" if streaming else "lbfgs")
        return cls.from_config(config, **({"solver": solver} | overrides))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.solver == "adam" else 0.1)


@dataclasses.dataclass(frozen=True)
class HeadConfig(SolverOptions):
    """Everything that decides how a head is trained on a cache, selected and scored: the solver's
    options (inherited from `SolverOptions`, where they are declared) and the head stage's own."""

    solver: str = option(
        "auto",
        "torch head optimiser (auto: lbfgs in memory, adam when streaming)",
        registry.HEAD_SOLVERS,
        group="solver",
    )

    features: str | None = option(
        None, "the cache file written by `pipeline features`", group="input"
    )
    layer: str | None = option(
        None,
        "train on a layer stored with `features --layers` instead of the penultimate features, or "
        "on several "
        "joined by commas (concatenated), e.g. layer3 or layer3,penultimate; 'penultimate' names "
        "the default",
        group="input",
    )
    views: bool = option(
        False,
        "also train on the augmented views in NAME.views.h5 (features --views K): an image's K+1 "
        "views weigh 1/(K+1) "
        "each, so C keeps its per-image meaning; val and test stay centre crops",
        group="input",
    )
    head: str = option(
        registry.DEFAULT_HEAD,
        "the head kind: torch (nn.Linear + cross-entropy; the fastest) or logreg (scikit-learn), "
        "trained with C; "
        "knn (cosine, weighted votes, k chosen on val), ncm (nearest class mean by cosine), mlp "
        "(one hidden layer, AdamW, early stopped on val) or tail (the backbone after a cached "
        "--cut, fine-tuned with a linear head)",
        group="head kind",
    )
    out: str | None = option(
        None, "results folder (default: results/<cache>-<head>)", group="output"
    )
    C: float | None = option(
        None, "train at this C only, no sweep (scikit-learn's C)", group="head kind"
    )
    grid: tuple[float, ...] | None = option(
        None,
        f"C values to sweep (default: {registry.DEFAULT_GRID_TEXT}); for knn, the k values "
        f"(default: {' '.join(map(str, registry.DEFAULT_K_GRID))})",
        group="head kind",
    )
    temperature: float = option(
        0.07,
        "knn: votes weigh exp(cosine / T); ncm: logits are cosine / T (DINO's T = 0.07)",
        group="head kind",
    )
    hidden: tuple[float, ...] | None = option(
        None,
        "mlp: hidden-layer widths to try (default: 256 1024)",
        group="mlp head",
    )
    dropout: tuple[float, ...] | None = option(
        None,
        "mlp: dropout rates to try after the hidden layer (default: 0 0.5)",
        group="mlp head",
    )
    weight_decay: tuple[float, ...] | None = option(
        None,
        "mlp and tail: AdamW weight decays to try (default: 0.0001 0.05); every width x rate x "
        "decay (mlp) or learning rate x decay (tail) is a candidate chosen on val",
        group="mlp head",
    )
    lr_grid: tuple[float, ...] | None = option(
        None,
        "tail: AdamW learning rates to try (default: 0.0001 0.001), each with every --weight-decay",
        group="tail head",
    )
    select: str = option(
        "top1-0.5se",
        "rule that chooses C on validation: top1-1se / balanced-1se take the strongest "
        "regularisation whose score is "
        "within one standard error of the best; top1-0.5se / balanced-0.5se the strongest reached "
        "from the best "
        "through scores within half an SE; top1 / balanced the plain argmax (the published "
        "protocol); logloss "
        "the lowest log-loss",
        tuple(registry.SELECT_RULES),
        group="selection",
    )
    preprocess: str = option(
        "auto",
        "fitted on training rows only (auto: standardize for logreg and torch, l2 for knn and ncm; "
        "center-l2 "
        "subtracts the training mean first)",
        registry.HEAD_PREPROCESSING,
        group="head kind",
    )
    calibrate: str = option(
        "none",
        "temperature: after the choice, fit one softmax temperature on val (held-out rows) by "
        "log-loss and apply it "
        "to the final head; top-1 unchanged",
        registry.CALIBRATIONS,
        group="long tail and calibration",
    )
    logit_adjust: str | None = option(
        None,
        "post-hoc logit adjustment: subtract TAU * log(train class prior) from the logits; a "
        "number, or auto "
        "(TAU chosen on val by the --select metric)",
        group="long tail and calibration",
    )
    imbalance_ratio: float | None = option(
        None,
        "long-tailed training: keep int(n_max * R^(-i/(K-1))) train images of the i-th class "
        "(CIFAR-LT), val "
        "and test untouched",
        group="long tail and calibration",
    )
    imbalance_order: str = option(
        "seeded",
        "--imbalance-ratio: class order by --seed, or by frequency",
        registry.IMBALANCE_ORDERS,
        group="long tail and calibration",
    )
    class_weight: str = option(
        "none",
        "'balanced' weighs classes by n / (classes * n_c)",
        registry.CLASS_WEIGHTS,
        group="long tail and calibration",
    )
    val_fraction: float = option(
        0.1, "stratified holdout from train when the cache has no val split", group="selection"
    )
    shots: int | None = option(
        None,
        "train on this many images per class (few-shot)",
        group="selection",
        bounds=(1, 10**7, "both"),
    )
    repeats: int = option(
        1, "few-shot draws, each with its own seed", group="selection", bounds=(1, 1000, "both")
    )
    sweep_block: int | None = option(
        None,
        "torch L-BFGS: C values trained together along the warm-started path (default: 1 on cpu, "
        "all on cuda)",
        group="solver",
        bounds=(1, 10**4, "both"),
    )
    jobs: int | None = option(
        None, "logreg sweep: parallel fits (default: one per core)", group="solver"
    )
    joblib_backend: str | None = option(
        None,
        "logreg sweep: joblib backend (dask: a dask.distributed cluster)",
        registry.JOBLIB_BACKENDS,
        group="solver",
    )
    max_memory: str | None = option(
        None,
        "bound on the arrays the head holds, e.g. 4GB; above it the torch head streams the cache",
        group="solver",
    )
    bootstrap: int = option(
        1000,
        "bootstrap resamples for the test confidence intervals (0: none)",
        group="selection",
        bounds=(0, 10**6, "both"),
    )
    force: bool = option(
        False, "replace an --out folder that `pipeline head` did not write", group="output"
    )
    progress: bool = option(True, "show a progress bar", group="output")

    def __post_init__(self) -> None:
        if self.layer is not None:
            names = [name.strip() for name in self.layer.split(",")]
            if "" in names or len(set(names)) != len(names):
                raise ConfigError(
                    f"--layer {self.layer!r} names a layer twice or an empty one; join distinct "
                    "names with commas, "
                    "e.g. layer3,layer4"
                )
        super().__post_init__()  # the choices, the solver's ranges, the device
        if self.features is None:
            raise ConfigError(
                "no cache given; pass it: `pipeline head cache/NAME.h5` (build one with `pipeline "
                "features --data "
                "YOUR_IMAGES --out cache/NAME.h5`)"
            )
        # What only a kind of head allows (C or k values, cosine preprocessing, its temperature) is
        # checked by that kind, where the head stage starts: `pipeline.heads.kinds.validate`.
        _ = self.logit_adjust_tau  # checked here
        if self.imbalance_ratio is not None and not 1.0 <= self.imbalance_ratio < float("inf"):
            raise ConfigError(
                f"--imbalance-ratio {self.imbalance_ratio} must be a finite number >= 1 (1: "
                "balanced)"
            )
        if self.imbalance_ratio is not None and self.shots:
            raise ConfigError(
                "--imbalance-ratio and --shots both choose the training rows; pass only one"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"--val-fraction {self.val_fraction} is out of range; expected a fraction in (0, 1)"
            )
        check_positive(self, "shots", "repeats", "sweep_block")
        if self.jobs is not None and self.jobs < 1 and self.jobs != -1:
            raise ConfigError(
                f"--jobs {self.jobs} is not allowed; pass a positive number, or -1 for one per core"
            )
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap {self.bootstrap} is negative; pass 0 for no intervals")
        _ = self.max_memory_bytes  # parsed once, here: a bad size fails before any work

    @property
    def refits_on_val(self) -> bool:
        """Whether the final head is refitted on train+val: not for few-shot or long-tailed runs,
        whose training rows are chosen (val never enters their training)."""
        return not (self.shots or self.imbalance_ratio)

    @property
    def logit_adjust_tau(self) -> float | str | None:
        """--logit-adjust as a number, `auto`, or None."""
        if self.logit_adjust is None or self.logit_adjust == "auto":
            return self.logit_adjust
        try:
            tau = float(self.logit_adjust)
        except (TypeError, ValueError):
            tau = float("nan")
        if (
            not 0.0 <= tau <= MAX_LOGIT_ADJUST
        ):  # beyond it the saved offsets overflow (NaN fails too)
            raise ConfigError(
                f"--logit-adjust {self.logit_adjust!r} is not allowed; pass a number in [0, "
                f"{MAX_LOGIT_ADJUST:g}] "
                "(1 is the usual choice) or auto"
            )
        return tau

    @functools.cached_property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_size(self.max_memory)

    @property
    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path("results") / f"{Path(self.features).stem}-{self.head}"  # type: ignore[arg-type]
