"""Every choice a user can make, in one place: what config validation accepts, what `--help` lists,
what error messages offer, and what the tests enumerate. Plain data, no heavy imports, so the
config and the command line read it without importing torch or scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ConfigError

# ----------------------------------------------------------------------------------- features

# Backbones: any torchvision classification model (`pipeline backbones` lists them), or timm:NAME
# with
# the timm extra; the feature is the input of the model's final classification layer. The ResNets
# are
# the first family: the fast tests' backbones, and the candidates named when a checkpoint fits
# another.
TIMM_PREFIX = "timm:"
CUT_PREFIX = "cut:"  # a stored layer that is a module's whole output, flattened (features --cut)
RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
# Torchvision datasets: our split name -> constructor arguments of the official split. Sources
# without a val (or test) split get one carved from train; ImageNet's official "val" is the
# conventional test set.
TORCHVISION_DATASETS: dict[str, dict[str, dict[str, Any]]] = {
    "CIFAR10": {"train": {"train": True}, "test": {"train": False}},
    "CIFAR100": {"train": {"train": True}, "test": {"train": False}},
    "STL10": {"train": {"split": "train"}, "test": {"split": "test"}},
    "Flowers102": {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    "OxfordIIITPet": {"train": {"split": "trainval"}, "test": {"split": "test"}},
    "DTD": {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    "Food101": {"train": {"split": "train"}, "test": {"split": "test"}},
    "FGVCAircraft": {
        "train": {"split": "train"},
        "val": {"split": "val"},
        "test": {"split": "test"},
    },
    "Caltech101": {"train": {}},
    "SUN397": {"train": {}},
    "ImageNet": {"train": {"split": "train"}, "test": {"split": "val"}},
}
DATASETS = (
    "digits",
    *TORCHVISION_DATASETS,
)  # digits: the offline demo (scikit-learn's digits as images)


def canonical_dataset_name(name: str) -> str:
    """The registered spelling of a dataset name given in any case."""
    by_lower = {n.lower(): n for n in DATASETS}
    if name.lower() not in by_lower:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return by_lower[name.lower()]


# Carving val/test from train (pipeline.splits): by a hash of each id (stable as images are added)
# or
# stratified (exact fractions); auto: hash for --data folders and CSVs, stratified for named
# datasets.
CARVINGS = ("auto", "hash", "stratified")
# --augment: the recipe of the --views of each train image (pipeline.features.views).
AUGMENTATIONS = ("crop-flip",)
# auto: bf16 where the device computes it natively, fp16 on other CUDA GPUs, fp32 otherwise
# (`pipeline.devices.auto_precision`), checked against fp32 on the first images
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORE_DTYPES = ("float32", "float16")
# cpu: PIL in the workers, JPEGs reduced by DCT scaling to >= 2x the resize; exact: PIL, full size;
# device: torchvision.io (nvjpeg on CUDA), full size.
DECODERS = ("cpu", "exact", "device")
ON_MISMATCH = ("rebuild", "refuse")
# Under torchrun: the final cache as a virtual dataset over the ranks' part files, or one copied
# file.
ASSEMBLIES = ("virtual", "copy")

# ------------------------------------------------------------------------- transferability

# `pipeline rank`'s scores, higher better for each; the last two need the cached logits (`--logits`)
FEATURE_SCORES = ("logme", "hscore", "ncm_loo", "knn_loo")
LOGIT_SCORES = ("leep", "nce")
TRANSFER_SCORES = (*FEATURE_SCORES, *LOGIT_SCORES)

# -------------------------------------------------------------------------------------- heads

# The head kinds are registered classes (`pipeline.heads.kinds`); the default one is named here so
# the config can say it without importing the head stage. torch: the same choices as logreg on every
# cache measured, 1.9-9.1x faster (docs/performance.md).
DEFAULT_HEAD = "torch"
DEFAULT_K_GRID = (1, 3, 5, 10, 20, 50, 100, 200)  # the knn head's k values
# `auto`: each head kind's own default (standardize for the linear heads, l2 for the cosine ones);
# `center-l2` subtracts the training mean before the L2 normalisation (SimpleShot's CL2N).
PREPROCESSING = ("standardize", "l2", "center-l2", "none")
HEAD_PREPROCESSING = ("auto", *PREPROCESSING)
COSINE_PREPROCESSING = ("l2", "center-l2")
CLASS_WEIGHTS = ("none", "balanced")
CALIBRATIONS = (
    "none",
    "temperature",
)  # temperature: one T fitted on val by NLL (pipeline.heads.posthoc)
# --logit-adjust auto: the TAU values tried on val (Menon et al. use 1).
LOGIT_ADJUST_GRID = tuple(0.25 * i for i in range(9))  # 0, 0.25, ..., 2
# --imbalance-ratio: which class keeps the most rows: a seeded order, or the most frequent first.
IMBALANCE_ORDERS = ("seeded", "frequency")
# Frequency groups of the test metrics, by train images per class: many > 100, few < 20, medium
# between.
FREQUENCY_GROUPS = {"many": (101, None), "medium": (20, 100), "few": (0, 19)}
SOLVERS = ("lbfgs", "adam", "sgd")
# `auto`: lbfgs when the rows fit in memory, adam when the head streams them from the file.
HEAD_SOLVERS = ("auto", *SOLVERS)
JOBLIB_BACKENDS = ("loky", "threading", "multiprocessing", "dask")
# --select: the validation metric of each rule. `*-1se` take the strongest regularisation within one
# standard error of the best score; `*-0.5se` the strongest regularisation reached from the best
# through settings all within half a standard error of it; `top1` and `balanced` the plain argmax
# (the published protocol); `logloss` the lowest validation log-loss; see `pipeline.heads.choice`.
SELECT_RULES = {
    "top1-1se": "top1",
    "balanced-1se": "balanced_accuracy",
    "top1-0.5se": "top1",
    "balanced-0.5se": "balanced_accuracy",
    "top1": "top1",
    "balanced": "balanced_accuracy",
    "logloss": "log_loss",
}
# The published linear-probe protocol's grid: 45 values log-spaced from 1e-6 to 1e5.
DEFAULT_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))
DEFAULT_GRID_TEXT = "45 log-spaced from 1e-6 to 1e5"
