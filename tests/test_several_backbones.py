"""Taps of several backbones in one answer: tap sets across feature files, --tap auto across them,
per-backbone weights, and predict through every backbone of a run."""

import json
from pathlib import Path

import numpy as np
import pytest

from features.errors import TapsError
from features.joined import JoinedFeatures
from features.store import FeatureFile
from pipeline.cli import main
from pipeline.predict import predict_images
from pipeline.runs import load_model, load_results

TWO_BACKBONES = ["--backbone", "resnet18,mobilenet_v2", "--weights", "none", "--image-size", "32"]
FIT = ["--clf", "logreg", "--grid", "1", "--device", "cpu", "--protocol", "per-class:5"]


def _run(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_a_tap_set_across_backbones_is_the_files_columns_side_by_side(two_backbones, tmp_path, capsys):
    data, root = two_backbones
    files = {FeatureFile(p).attrs["backbone"]: FeatureFile(p) for p in (root / "fs").rglob("*.h5")}
    assert main(["fit", *data, *TWO_BACKBONES, *FIT, "--tap", "mobilenet_v2/block3+resnet18/avgpool",
                 "--runs-root", str(tmp_path)]) == 0
    run = _run(capsys)
    results = load_results(run)
    assert results.features.tap == "mobilenet_v2/block3+resnet18/avgpool"
    assert results.features.dim == files["mobilenet_v2"].taps["block3"].dim + 512
    assert results.features.backbone == "resnet18+mobilenet_v2"
    X = np.hstack([files["mobilenet_v2"].read("block3", "avg"), files["resnet18"].read("avgpool", "avg")])
    model = load_model(run, results)
    # predict runs each backbone over the images and gives what the model says of their stored rows
    flat = files["resnet18"]
    rows = [0, 11, 25]
    images = [str(data[1].split(":", 1)[1] + "/" + flat.ids[i]) for i in rows]
    predicted = [p.label for p in predict_images(run, images, device="cpu", weights="none")]
    assert predicted == [flat.classes[int(c)] for c in model.predict(X[rows])]


def test_tap_auto_chooses_across_every_tap_of_every_backbone_inside_cv(two_backbones, tmp_path, capsys):
    data, _ = two_backbones
    assert main(["fit", *data, *TWO_BACKBONES, *FIT, "--tap", "auto", "--seeds", "2", "--runs-root", str(tmp_path)]) == 0
    results = load_results(_run(capsys))
    assert results.settings["candidates"] == ["mobilenet_v2/block3", "mobilenet_v2/pooled", "resnet18/layer2",
                                              "resnet18/avgpool"]
    assert all(set(s.taps) <= set(results.settings["candidates"]) for s in results.per_seed)
    # without --tap: each backbone's standard embedding, fused
    assert main(["fit", *data, *TWO_BACKBONES, *FIT, "--runs-root", str(tmp_path)]) == 0
    assert load_results(_run(capsys)).features.tap == "resnet18/avgpool+mobilenet_v2/pooled"


@pytest.mark.parametrize("tap, message", [
    ("avgpool", "tap 'avgpool' does not name its backbone; with several backbones write BACKBONE/TAP"),
    ("vgg16/fc7", "tap 'vgg16/fc7' names backbone 'vgg16', which is not one of resnet18, mobilenet_v2"),
    ("resnet18/avgpol", "unknown tap 'avgpol' for resnet18; did you mean avgpool?"),
])
def test_a_cross_backbone_tap_that_names_no_backbone_or_a_wrong_one_is_one_line(two_backbones, tmp_path, capsys,
                                                                               tap, message):
    data, _ = two_backbones
    assert main(["fit", *data, *TWO_BACKBONES, *FIT, "--tap", tap, "--runs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_weights_per_backbone(two_backbones, tmp_path, capsys):
    data, _ = two_backbones
    bad = ["--backbone", "resnet18,mobilenet_v2", "--weights", "none,none,none", "--image-size", "32"]
    assert main(["fit", *data, *bad, *FIT, "--runs-root", str(tmp_path)]) == 2
    assert "--weights has 3 values for 2 backbones" in capsys.readouterr().err
    # one value per backbone, in order: IMAGENET1K_V1 is a torchvision name, refused for the timm backbone
    mixed = ["--backbone", "mobilenet_v2,timm:resnet18", "--weights", "none,IMAGENET1K_V1"]
    assert main(["fit", *data, *mixed, *FIT, "--runs-root", str(tmp_path)]) == 2
    assert "unknown weights 'IMAGENET1K_V1' for timm:resnet18" in capsys.readouterr().err


def test_files_of_other_samples_are_not_joined(two_backbones, split_features, tiny_features):
    _, root = two_backbones
    mine = FeatureFile(next((root / "fs").rglob("mobilenet_v2*.h5")))
    with pytest.raises(TapsError, match="do not describe the same samples: their dataset differ"):
        JoinedFeatures([mine, split_features[1]])
    joined = JoinedFeatures([mine, tiny_features[1]])  # the same images, extracted apart: the same samples
    assert joined.valid.all() and sorted(joined.taps)[0] == "mobilenet_v2/block3"
    with pytest.raises(TapsError, match="two feature files of the same backbone"):
        JoinedFeatures([tiny_features[1], FeatureFile(next((root / "fs").rglob("resnet18*.h5")))])


def test_compare_puts_cross_backbone_sets_and_auto_beside_each_backbones_rows(two_backbones, tmp_path, capsys):
    data, _ = two_backbones
    singles = ["resnet18/layer2", "resnet18/avgpool", "mobilenet_v2/block3", "mobilenet_v2/pooled"]
    assert main(["compare", *data, *TWO_BACKBONES, *FIT, "--seeds", "2", "--fuse", "--no-progress", "--workers", "0",
                 "--taps", ",".join([*singles, "resnet18/avgpool+mobilenet_v2/pooled"]),
                 "--runs-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data_json = json.loads(next(tmp_path.rglob("compare.json")).read_text())
    rows = data_json["rows"]
    across = [r for r in rows if r["backbone"] == "resnet18+mobilenet_v2"]
    assert [r["tap"] for r in across] == ["resnet18/avgpool+mobilenet_v2/pooled", "auto"]
    assert {r["tap"] for r in rows if r["depth"] is not None} == {"layer2", "avgpool", "block3", "pooled"}
    for r in across:  # each against the best single tap of either backbone, on the same test samples
        best = r["gain_over_best_single"]
        assert f"{best['backbone']}/{best['tap']}" in singles
        assert f"{r['backbone']} logreg {r['tap']}" in out and f" against {best['backbone']}/{best['tap']}: " in out
        members = r["taps"].split(";")[0].split("+")
        assert sum(r["shares"][m] for m in members) == pytest.approx(1, abs=1e-3)
        assert sum(v for k, v in r["shares"].items() if "/" not in k) == pytest.approx(1, abs=1e-3)
    assert set(across[1]["taps"].replace(";", "+").split("+")) <= set(singles)  # auto chose among every single
    assert "share of the seed-0 model's squared weights: resnet18 " in out


def test_compare_score_ranks_the_taps_of_every_backbone_in_one_list(two_backbones, tmp_path, capsys):
    data, _ = two_backbones
    assert main(["compare", *data, *TWO_BACKBONES, "--score", "--taps", "all", "--no-progress", "--workers", "0",
                 "--device", "cpu", "--runs-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    ranked = [line.split() for line in lines[header + 1:-2]]
    assert {r[1] for r in ranked} == {"resnet18", "mobilenet_v2"} and [r[0] for r in ranked] == \
        [str(i + 1) for i in range(len(ranked))]
    scores = [float(r[4]) for r in ranked]
    assert scores == sorted(scores, reverse=True) and "taps of resnet18, mobilenet_v2" in lines[-2]
    saved = json.loads((Path(lines[-1]) / "score.json").read_text())  # the ranking is kept beside a compare's
    assert [(r["backbone"], r["tap"]) for r in saved["ranking"]] == [(r[1], r[2]) for r in ranked]
    assert (Path(lines[-1]) / "score.csv").read_text().startswith("rank,backbone,tap,dim,logme")


def test_extract_writes_one_file_per_backbone_with_each_backbones_taps(tiny_flat, tmp_path, capsys):
    data = ["--dataset", f"folder:{tiny_flat}", "--features-root", str(tmp_path / "fs")]
    quiet = ["--no-progress", "--workers", "0", "--device", "cpu"]
    assert main(["fit", *data, *TWO_BACKBONES, *FIT, "--runs-root", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err  # no files yet: the one command that makes both
    assert "taps extract --dataset" in err and "--backbone resnet18,mobilenet_v2 --weights none" in err
    assert main(["extract", *data, *TWO_BACKBONES, "--taps", "resnet18/layer1,mobilenet_v2/block2,logits",
                 *quiet]) == 0
    paths = capsys.readouterr().out.strip().splitlines()[-3::2]
    files = {FeatureFile(p).attrs["backbone"]: sorted(FeatureFile(p).taps) for p in paths}
    assert files == {"resnet18": ["layer1", "logits"], "mobilenet_v2": ["block2", "logits"]}
    assert main(["extract", *data, *TWO_BACKBONES, "--taps", "vgg16/fc7", *quiet]) == 2
    assert "names backbone 'vgg16', which is not one of resnet18, mobilenet_v2" in capsys.readouterr().err


def test_compare_fuse_with_one_tap_per_backbone_fuses_across_them_only(two_backbones, tmp_path, capsys):
    data, _ = two_backbones
    assert main(["compare", *data, *TWO_BACKBONES, *FIT, "--fuse", "--no-progress", "--workers", "0",
                 "--taps", "resnet18/avgpool,mobilenet_v2/pooled", "--runs-root", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.rglob("compare.json")).read_text())["rows"]
    assert [(r["backbone"], r["tap"]) for r in rows] == [("resnet18", "avgpool"), ("mobilenet_v2", "pooled"),
                                                         ("resnet18+mobilenet_v2", "auto")]


def test_compare_finds_every_checkpoint_before_reading_the_dataset_or_extracting(tiny_flat, tmp_path, capsys):
    """The second backbone's weights are not cached (no internet here): refused before the first backbone
    extracts anything, and before the dataset is read."""
    args = ["compare", "--dataset", f"folder:{tiny_flat}", "--backbone", "resnet18,openclip:ViT-B-32/openai",
            "--weights", "none,auto", "--image-size", "64", "--taps", "resnet18/avgpool", "--no-progress",
            "--features-root", str(tmp_path / "fs"), "--runs-root", str(tmp_path / "runs")]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "openclip:ViT-B-32/openai are not cached and could not be downloaded" in err and "read " not in out
    assert not (tmp_path / "fs").exists() and not (tmp_path / "runs").exists()


def test_a_shot_curve_names_each_backbones_rows_and_a_set_across_them_once(two_backbones, tmp_path, capsys):
    data, _ = two_backbones
    assert main(["compare", *data, *TWO_BACKBONES, *FIT, "--no-progress", "--workers", "0", "--shots", "1,all",
                 "--tries", "2", "--taps", "mobilenet_v2/pooled,resnet18/avgpool+mobilenet_v2/pooled",
                 "--runs-root", str(tmp_path)]) == 0
    points = json.loads(next(tmp_path.rglob("shots.json")).read_text())["points"]
    assert {(p["row"], p["backbone"]) for p in points} == {  # the set's members are rows too
        ("mobilenet_v2 pooled", "mobilenet_v2"), ("resnet18 avgpool", "resnet18"),
        ("resnet18/avgpool+mobilenet_v2/pooled", "resnet18+mobilenet_v2")}
    assert capsys.readouterr().out.count("resnet18+mobilenet_v2 resnet18/avgpool") == 0


def test_fit_table_columns_line_up_for_a_set_named_across_backbones(two_backbones, tmp_path, capsys):
    data, _ = two_backbones
    assert main(["fit", *data, *TWO_BACKBONES, *FIT, "--seeds", "2", "--grid", "0.000123",
                 "--tap", "mobilenet_v2/block3+resnet18/avgpool", "--runs-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("tap "))
    head, row = lines[header], lines[header + 1]
    assert row.startswith("mobilenet_v2/block3+resnet18/avgpool ") and " 0.000123, 0.000123 " in row  # one C a seed
    assert len(head) == len(row)
    for name in ("dim", "mean/class", "top-5", "fit s"):  # each header ends where its value does
        end = head.index(name) + len(name)
        assert row[end - 1] != " " and (end == len(row) or row[end] == " "), (name, head, row)
