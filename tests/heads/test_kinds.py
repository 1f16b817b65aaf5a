"""Head kinds are registered classes: a kind defined here, in the test, goes through the protocol,
saving, loading, `predict` and `export` without a line of the package changed. That is the proof
that a new head is one file."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline import load_export, predict
from pipeline.config import FeaturesConfig, HeadConfig
from pipeline.errors import ConfigError
from pipeline.features import stage
from pipeline.heads import kinds, protocol
from pipeline.heads.kinds import HeadKind, register
from pipeline.heads.saved import load_head
from pipeline.heads.trained import TrainedHead

from helpers import make_folder


@dataclass
class PrototypeFit:
    """One fit of the toy kind: the class means, and the temperature it is scored at."""

    value: float
    means: np.ndarray  # (K, D)
    param = "temperature"
    status = "exact"
    n_iter = 0
    converged = True

    def log_proba(self, Z: np.ndarray) -> np.ndarray:
        return _log_softmax(-((Z[:, None, :] - self.means[None]) ** 2).sum(-1) / self.value)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class EuclideanPrototypes(HeadKind):
    """A toy kind: softmax of minus the squared distance to each class mean over T, T chosen on
    val."""

    name = "prototypes"
    setting = "temperature"
    model = "prototypes"
    setting_keys = ("temperature",)

    def grid(self, cfg):
        return [0.5, 2.0, 8.0]

    def solver(self, cfg, streaming):
        return "exact (class means)"

    def fit_grid(
        self, cfg, X, y, n_classes, grid, tick=lambda n: None, init=None, sample_weight=None
    ):
        tick(len(grid))
        means = np.stack([X[y == c].mean(axis=0) for c in range(n_classes)]).astype(np.float32)
        return [PrototypeFit(T, means) for T in grid]

    def trained(self, fit, prep, classes, adjustment):
        return TrainedHead(self, prep, classes, {"means": fit.means}, {"temperature": fit.value})

    def array_shapes(self, meta):
        return {"means": (len(meta["classes"]), meta["n_features"])}

    def n_features(self, arrays):
        return arrays["means"].shape[1]

    def log_proba(self, head, Z):
        return PrototypeFit(head.settings["temperature"], head.arrays["means"]).log_proba(Z)

    def module(self, head):
        import torch

        class Prototypes(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("means", torch.tensor(head.arrays["means"]))
                self.temperature = float(head.settings["temperature"])

            def forward(self, z: torch.Tensor) -> torch.Tensor:
                distance = ((z[:, None, :] - self.means[None]) ** 2).sum(dim=-1)  # (B, K)
                return torch.softmax(-distance / self.temperature, dim=1)

        return Prototypes()


@pytest.fixture
def prototypes():
    register(EuclideanPrototypes)
    yield kinds.get("prototypes")
    kinds.unregister("prototypes")


def test_a_kind_defined_outside_the_package_runs_through_every_stage(prototypes, tmp_path):
    data = make_folder(
        tmp_path / "data", classes=("cat", "dog", "owl"), per_class=6, splits=("train", "test")
    )
    cache = tmp_path / "c.h5"
    stage.run(
        FeaturesConfig(
            data=str(data),
            backbone="resnet18",
            weights="none",
            image_size=32,
            workers=0,
            batch_size=8,
            progress=False,
            out=str(cache),
        )
    )
    out = tmp_path / "run"
    result = protocol.run(
        HeadConfig(
            features=str(cache), head="prototypes", out=str(out), progress=False, bootstrap=0
        )
    )
    assert [row["temperature"] for row in result["curve"]] == [0.5, 2.0, 8.0]
    assert (
        result["final_fit"]["solver"] == "exact (class means)"
        and result["chosen"]["param"] == "temperature"
    )
    assert json.loads((out / "head.json").read_text())["model"] == "prototypes"

    head = load_head(out)
    assert (
        head.kind is prototypes and head.settings["temperature"] == result["chosen"]["temperature"]
    )
    done = predict.predict(out, data / "test", tmp_path / "p.csv")
    assert done["classified"] == 18
    exported = predict.export(out, tmp_path / "proto.pt2")
    import torch
    import torchvision.transforms.functional as F
    from PIL import Image

    extra = {"meta.json": ""}
    torch.export.load(str(exported), extra_files=extra)
    meta = json.loads(extra["meta.json"])
    assert (
        meta["format"] == "pipeline prototypes classifier (prototypes head), torch.export program"
    )
    crops = []
    for sample_id in done["ids"]:
        image = Image.open(data / "test" / sample_id).convert("RGB")
        mode = F.InterpolationMode(meta["interpolation"])
        image = F.resize(image, meta["resize_size"], interpolation=mode, antialias=True)
        crops.append(F.pil_to_tensor(F.center_crop(image, meta["crop_size"])))
    proba = load_export(exported).module()(torch.stack(crops)).detach().numpy()
    np.testing.assert_allclose(proba, done["proba"], atol=1e-4)


def test_a_kind_name_is_registered_once_and_unknown_kinds_are_listed(prototypes):
    class Other(EuclideanPrototypes):
        pass

    with pytest.raises(ValueError, match=r"a head kind named 'prototypes' is registered already"):
        register(Other)
    with pytest.raises(
        ConfigError,
        match=r"--head 'svm' is not allowed; choose one of: torch, logreg, knn, ncm, mlp, tail, "
        r"prototypes",
    ):
        kinds.validate(HeadConfig(features="x.h5", head="svm"))
