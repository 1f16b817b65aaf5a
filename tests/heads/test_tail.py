"""Cut points and the tail head: an exact torch.fx split, fine-tuning only the tail and the head on
cached activations, choices on val only, saved/loaded/exported heads that agree, one-line
refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import cli, predict, read_features
from pipeline.backbones import backbone, catalog, split
from pipeline.config import HeadConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.features import stage
from pipeline.heads import choice, protocol
from pipeline.heads.kinds import tail
from pipeline.heads.saved import load_head

from helpers import make_folder, tiny

FAST = dict(lr_grid=(1e-3,), weight_decay=(1e-4, 0.05), epochs=2, progress=False, bootstrap=0)


@pytest.fixture(scope="module")
def cut_cache(tmp_path_factory):
    """resnet18 at 32 px with its layer3 output cached (256 x 2 x 2 per image)."""
    tmp = tmp_path_factory.mktemp("cut")
    data = make_folder(
        tmp / "data", classes=("cat", "dog", "owl"), per_class=8, splits=("train", "val", "test")
    )
    cfg = tiny(data=str(data), cut="layer3", out=str(tmp / "c.h5"))
    stage.run(cfg)
    return tmp, data, cfg.out


@pytest.mark.parametrize(
    ("name", "cut", "size"),
    [
        ("resnet18", "layer3", 64),
        pytest.param("convnext_tiny", "features.5", 64, marks=pytest.mark.slow),
        pytest.param("vit_b_16", None, 224, marks=pytest.mark.slow),
    ],
)
def test_the_split_is_exact_trunk_then_tail_is_the_whole_model(name, cut, size):
    if name == "vit_b_16":  # the last-but-one encoder block
        cut = "encoder.layers.encoder_layer_10"
    model = backbone.build(backbone.describe(name, "none", 0, size), progress=False)
    parts = split.of_extractor(model.body, model.root, cut, name)
    x = torch.randn(2, 3, size, size)
    assert split.check_exact(model.body, parts, x) <= 1e-5
    # The halves hold the model's own parameters: nothing copied, nothing trained yet.
    own = {id(p) for p in model.body.parameters()}
    assert all(id(p) in own for p in (*parts.trunk.parameters(), *parts.tail.parameters()))


def test_a_cut_inside_a_residual_block_is_refused_in_one_line():
    model = backbone.build(backbone.describe("resnet18", "none", 0, 32), progress=False)
    with pytest.raises(ConfigError, match=r"does not split cleanly at 'layer3.1.conv1': after it"):
        split.of_extractor(model.body, model.root, "layer3.1.conv1", "resnet18")


def test_backbones_cuts_lists_stage_ends_with_their_bytes(capsys):
    rows = catalog.cuts("resnet50")
    assert [r["module"] for r in rows] == ["layer3", "layer2", "layer1"]  # layer4: nothing after
    assert rows[0]["shape"] == (1024, 14, 14) and rows[0]["bytes"] == 2 * 1024 * 14 * 14
    assert rows[0]["splits"] == "yes" and 14e6 < rows[0]["tail_parameters"] < 16e6
    assert cli.main(["backbones", "resnet18", "--cuts"]) == 0
    assert "layer3  256x14x14" in capsys.readouterr().out
    assert cli.main(["backbones", "--cuts"]) == 2


def test_the_cut_is_stored_in_float16_and_equals_the_module_output(cut_cache, capsys):
    _, _, out = cut_cache
    assert cli.main(["info", str(out)]) == 0
    assert "cut:layer3: its whole output, flattened, float16" in capsys.readouterr().out
    rows = read_features(out, layer="cut:layer3", dtype=np.float32)
    assert rows["train"].X.shape[1] == 256 * 2 * 2
    model = backbone.build(backbone.describe("resnet18", "none", 0, 32), progress=False)
    parts = split.of_extractor(model.body, model.root, "layer3", "resnet18")
    features = read_features(out)["train"].X
    # The stored cut through the pretrained tail gives the stored features, to float16 rounding.
    with torch.no_grad():
        x = torch.from_numpy(rows["train"].X).reshape(-1, 256, 2, 2)
        again = parts.tail(x).numpy()
    np.testing.assert_allclose(again, features, rtol=0, atol=2e-2 * np.abs(features).max())


def test_tail_trains_only_the_tail_and_head_and_chooses_on_val(cut_cache, monkeypatch):
    tmp, _, out = cut_cache
    events, bases = [], []
    real_rows, real_choose, real_base = tail.TailSource._rows, choice.choose, tail.pretrained_tail

    def rows(self, *splits):
        events.append(("rows", splits))
        return real_rows(self, *splits)

    def choose(curve, rule):
        events.append(("choose", len(curve)))
        return real_choose(curve, rule)

    def base(*args):
        bases.append(real_base(*args))
        return bases[-1]

    monkeypatch.setattr(tail.TailSource, "_rows", rows)
    monkeypatch.setattr(choice, "choose", choose)
    monkeypatch.setattr(tail, "pretrained_tail", base)
    cfg = HeadConfig(features=str(out), head="tail", out=str(tmp / "tail"), **FAST)
    result = protocol.run(cfg)
    first_test = events.index(("rows", ("test",)))
    assert ("choose", 2) in events[:first_test] and all(
        "test" not in e[1] for e in events[:first_test] if e[0] == "rows"
    ), events
    assert result["protocol"]["trained_on"] == "train+val" and result["chosen"]["param"] == (
        "candidate"
    )
    # The pretrained tail the run started from is untouched; the saved tail moved away from it.
    fresh = real_base(
        result["cache"]["fingerprint"], result["cache"]["features_config"], "layer3"
    ).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in bases[0].state_dict().items())
    head = load_head(tmp / "tail")
    saved = {k.removeprefix("tail."): v for k, v in head.arrays.items() if k.startswith("tail.")}
    assert set(saved) == set(fresh) and set(head.arrays) - {f"tail.{k}" for k in fresh} == {
        "head.weight",
        "head.bias",
    }
    moved = [k for k, v in fresh.items() if v.dtype.is_floating_point and k.endswith("weight")]
    assert any(not np.allclose(saved[k], fresh[k].numpy()) for k in moved)
    meta = json.loads((tmp / "tail" / "head.json").read_text())
    assert (meta["model"], meta["cut"], meta["shape"]) == ("tail", "layer3", [256, 2, 2])


@pytest.mark.slow
def test_a_tail_head_saved_loaded_predicted_and_exported_agrees(cut_cache):
    tmp, data, out = cut_cache
    folder = tmp / "tail-agree"
    protocol.run(HeadConfig(features=str(out), head="tail", out=str(folder), **FAST))
    head = load_head(folder)
    test = read_features(out, layer="cut:layer3", dtype=np.float32)["test"]
    with np.load(folder / "predictions.npz") as saved:
        np.testing.assert_array_equal(head.predict_proba(test.X).argmax(1), saved["y_pred"])
    with torch.no_grad():
        module = head.to_module()(torch.from_numpy(test.X)).numpy()
    np.testing.assert_allclose(module, head.predict_proba(test.X), atol=1e-5)
    # predict runs the trunk on the images: the same probabilities as the head on the cached cut,
    # to the cut's float16 rounding.
    done = predict.predict(folder, data / "test", tmp / "p.csv", force=True)
    by_id = {i.split("/", 1)[1]: k for k, i in enumerate(test.ids)}
    cached = head.predict_proba(test.X)[[by_id[i] for i in done["ids"]]]
    np.testing.assert_allclose(done["proba"], cached, atol=2e-2)
    exported = tmp / "tail.pt2"
    assert cli.main(["export", "--head", str(folder), "--out", str(exported)]) == 0
    import torchvision.transforms.functional as F
    from PIL import Image

    from pipeline import load_export

    program = load_export(exported).module()
    crops = []
    for sample_id in done["ids"]:
        image = F.resize(Image.open(data / "test" / sample_id).convert("RGB"), 37, antialias=True)
        crops.append(F.pil_to_tensor(F.center_crop(image, 32)))
    proba = program(torch.stack(crops)).detach().numpy()
    np.testing.assert_allclose(proba, done["proba"], atol=1e-4)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"shots": 2}, r"--shots is not supported by the tail head"),
        ({"hidden": (8,)}, r"--hidden is a setting of the mlp head; the tail head does not use it"),
        ({"lr": 0.1}, r"--lr \(its candidates are --lr-grid\) is not supported by the tail head"),
        ({"max_memory": "1KB"}, r"--max-memory \(it streams its cut in blocks of 64 MiB"),
        ({"lr_grid": (2.0,)}, r"--lr-grid 2 is not allowed"),
        ({"layer": "layer3"}, r"--layer layer3 is not a cut"),
    ],
)
def test_tail_settings_are_refused_in_one_line(cut_cache, settings, message):
    tmp, _, out = cut_cache
    cfg = dict(features=str(out), head="tail", out=str(tmp / "refused")) | FAST | settings
    with pytest.raises(ConfigError, match=message):
        protocol.run(HeadConfig(**cfg))


def test_tail_on_a_cache_without_a_cut_or_split_inside_a_block_is_one_line(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=6)
    plain = tiny(data=str(data), out=str(tmp_path / "plain.h5"))
    stage.run(plain)
    args = ["head", plain.out, "--head", "tail", "--out", str(tmp_path / "r"), "--epochs", "1"]
    assert cli.main(args) == 2
    assert "--head tail trains on a cut stored by `pipeline features --cut MODULE`" in (
        capsys.readouterr().err
    )
    # A cut the tail could not split at is refused before any image is read.
    inner = ["features", "--data", str(data), "--backbone", "resnet18", "--weights", "none"]
    inner += ["--image-size", "32", "--cut", "layer3.1.conv1", "--out", str(tmp_path / "in.h5")]
    assert cli.main(inner) == 2
    assert "--cut layer3.1.conv1: resnet18 does not split cleanly at 'layer3.1.conv1'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "in.h5").exists()
    for bad, message in (
        ("", "--cut '' is not one module path"),
        ("layer3,layer4", "--cut 'layer3,layer4' is not one module path"),
    ):
        assert cli.main([*inner[:-4], "--cut", bad, "--out", str(tmp_path / "in.h5")]) == 2
        assert message in capsys.readouterr().err
    assert cli.main([*inner[:-4], "--layers", "cut:layer3", "--out", str(tmp_path / "in.h5")]) == 2
    assert "a module's whole output is stored with --cut MODULE" in capsys.readouterr().err
    args = ["head", plain.out, "--head", "tail", "--layer", "cut:layer2"]
    assert cli.main([*args, "--out", str(tmp_path / "r2")]) == 2
    assert "rebuild it with `pipeline features --cut layer2`" in capsys.readouterr().err


def test_a_saved_tail_head_naming_another_backbone_is_refused(cut_cache):
    tmp, _, out = cut_cache
    folder = tmp / "tail-hostile"
    protocol.run(HeadConfig(features=str(out), head="tail", out=str(folder), **FAST))
    meta_path = folder / "head.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"backbone": "resnet34"}))
    with pytest.raises(CacheError, match=r"malformed: head.npz has no array 'tail.layer4.2.conv1"):
        load_head(folder)
    meta_path.write_text(json.dumps(meta | {"backbone": "no_such_net"}))
    with pytest.raises(CacheError, match=r"names backbone 'no_such_net' cut at 'layer3'"):
        load_head(folder)
    meta_path.write_text(json.dumps(meta | {"crop_size": "big"}))
    with pytest.raises(CacheError, match=r"a saved tail head needs backbone, cut"):
        load_head(folder)


@pytest.mark.slow
def test_mlp_and_tail_train_on_the_cached_views_weighing_each_view_one_third(tmp_path, monkeypatch):
    from pipeline.heads.kinds import mlp

    data = make_folder(
        tmp_path / "data", classes=("cat", "dog"), per_class=6, splits=("train", "val", "test")
    )
    cfg = tiny(data=str(data), views=2, cut="layer3", out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    seen = {}
    real_mlp, real_tail = mlp.train, tail.train

    def spy_mlp(cfg, candidate, X, y, n_classes, sample_weight=None, val=None, stop_at=None):
        seen.setdefault("mlp", (len(X), np.unique(sample_weight).tolist()))
        return real_mlp(cfg, candidate, X, y, n_classes, sample_weight, val, stop_at)

    def spy_tail(cfg, base, dim, n_classes, candidate, rows, val=None, **kwargs):
        seen.setdefault("tail", [(len(r), np.unique(r.weights).tolist()) for r in rows])
        return real_tail(cfg, base, dim, n_classes, candidate, rows, val, **kwargs)

    monkeypatch.setattr(mlp, "train", spy_mlp)
    monkeypatch.setattr(tail, "train", spy_tail)
    small = dict(hidden=(8,), dropout=(0.0,), weight_decay=(1e-4,), epochs=2)
    common = dict(features=cfg.out, views=True, progress=False, bootstrap=0)
    for head, settings in (("mlp", small), ("tail", FAST)):
        run = HeadConfig(head=head, out=str(tmp_path / head), **(settings | common))
        result = protocol.run(run)
        assert "2 augmented views each (every view weighs 1/3)" in result["protocol"]["trained_on"]
    assert seen["mlp"] == (12 * 3, [pytest.approx(1 / 3)])  # 12 train images and 24 views
    assert seen["tail"] == [(12, [pytest.approx(1 / 3)]), (24, [pytest.approx(1 / 3)])]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"shape": [256, 1, 4]}, r"shape \[256, 1, 4\] and n_features 1024 are not the cut's"),
        ({"cache_fingerprint": "resnet34"}, r"is not the backbone and cut of its cache"),
        ({"crop_size": 64}, r"crop_size 64 is not its cache's crop size 32"),
        ("float16", r"tail.layer4.0.conv1.weight in head.npz is float16, the tail holds float32"),
        ("variance", r"holds a negative variance"),
    ],
)
def test_a_saved_tail_head_must_match_what_it_describes(cut_cache, tmp_path, edit, message):
    import shutil

    folder = tmp_path / "head"
    shutil.copytree(_trained_tail(cut_cache), folder)
    meta = json.loads((folder / "head.json").read_text())
    if isinstance(edit, dict):
        if "cache_fingerprint" in edit:
            edit = {"cache_fingerprint": meta["cache_fingerprint"] | {"backbone": "resnet34"}}
        (folder / "head.json").write_text(json.dumps(meta | edit))
    else:
        with np.load(folder / "head.npz") as z:
            arrays = dict(z)
        if edit == "float16":
            key = "tail.layer4.0.conv1.weight"
            arrays[key] = arrays[key].astype(np.float16)
        else:
            arrays["tail.layer4.0.bn1.running_var"][0] = -1.0
        np.savez(folder / "head.npz", **arrays)
    with pytest.raises(CacheError, match=message):
        load_head(folder)


_TRAINED: dict = {}


def _trained_tail(cut_cache):
    """One tail head on the module's cut cache, trained once for the tests that tamper with it."""
    tmp, _, out = cut_cache
    if "tail" not in _TRAINED:
        folder = tmp / "tail-once"
        protocol.run(HeadConfig(features=str(out), head="tail", out=str(folder), **FAST))
        _TRAINED["tail"] = folder
    return _TRAINED["tail"]


def test_nan_in_the_cut_rows_is_one_line_before_any_score(tmp_path, capsys):
    import h5py

    from pipeline.cache import schema

    data = make_folder(tmp_path / "data", per_class=6)
    cfg = tiny(data=str(data), cut="layer3", out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    with h5py.File(cfg.out, "r+") as f:  # a NaN written as if by the writer: its row CRC matches
        cut = f["layers"]["cut:layer3"]
        row = cut[-1:].copy()
        row[0, 0] = np.nan
        cut[-1:] = row
        layers = {k: f["layers"][k][-1:] for k in f["layers"]}
        f["row_crc"][-1:] = schema.row_crc(f["features"][-1:], None, layers)
    args = ["head", cfg.out, "--head", "tail", "--epochs", "1", "--lr-grid", "0.001"]
    assert cli.main([*args, "--weight-decay", "0.0001", "--out", str(tmp_path / "r")]) == 2
    assert "has NaN or infinite values in 1 rows of its cut" in capsys.readouterr().err
