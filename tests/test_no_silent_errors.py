"""Stale features, overwritten comparisons, foreign weights, lost decoders, claimed CV: refused or recorded."""

import json
import re
import shlex
import shutil

import numpy as np
import pytest
import torch

from features.backbones import Backbone
from features.catalog import feature_path
from features.datasets import load_dataset
from features.errors import TapsError
from features.extract import extract
from features.options import ExtractOptions
from features.shards import merge_shards
from features.store import FeatureFile
from pipeline.cli import main
from pipeline.compare import compare_taps
from pipeline.evaluate import fit_run
from pipeline.options import FitOptions
from pipeline.predict import predict_images
from pipeline.protocols import parse_protocol
from pipeline.runs import load_model, load_results

TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32"]
FIT = ["--clf", "logreg", "--grid", "0.1,1", "--device", "cpu", "--protocol", "per-class:5"]


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_fit_refuses_features_of_a_dataset_that_changed_and_names_the_command_that_fixes_it(
        tiny_flat, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_flat, data)
    common = ["--dataset", f"folder:{data}", *TINY, "--features-root", str(tmp_path / "fs")]
    code, _, _ = cli(capsys, "extract", *common, "--no-progress", "--workers", "0")
    assert code == 0
    shutil.copy(data / "circle" / "img_000.jpg", data / "circle" / "img_new.jpg")  # one image added
    code, _, err = cli(capsys, "fit", *common, *FIT, "--runs-root", str(tmp_path / "runs"))
    line = one_error_line(err)
    assert code == 1 and "was made from 30 samples, the dataset now has 31" in line
    command = re.search(r"rebuild it with `(taps extract [^`]+)`", line).group(1)
    assert command.endswith(" --force") and f"--features-root {tmp_path / 'fs'}" in command
    code, _, _ = cli(capsys, *shlex.split(command)[1:], "--no-progress", "--workers", "0")  # the fix works
    assert code == 0
    code, out, _ = cli(capsys, "fit", *common, *FIT, "--runs-root", str(tmp_path / "runs"))
    assert code == 0 and "fitted logreg" in out
    # Same number of images, other pixels: the fingerprint says so.
    (data / "square" / "img_001.jpg").write_bytes((data / "stripes" / "img_001.jpg").read_bytes() + b"\0" * 10)
    code, _, err = cli(capsys, "fit", *common, *FIT, "--runs-root", str(tmp_path / "runs"))
    assert code == 1 and "was made from other contents of the dataset" in one_error_line(err)


def test_every_preprocessing_has_its_own_file_and_messages_keep_whole_values(tiny_flat, tmp_path, capsys, cpu_run):
    RUN = cpu_run()
    preset, square = Backbone("resnet18", weights="none"), Backbone("resnet18", weights="none", image_size=224)
    assert preset.input_size == square.input_size == 224 and preset.transform_spec() != square.transform_spec()
    assert feature_path(tmp_path, "d", preset) != feature_path(tmp_path, "d", square)
    images = load_dataset(f"folder:{tiny_flat}")
    report = extract(images, Backbone("resnet18", weights="none", image_size=32), ["layer1"], out=tmp_path, **RUN)
    other = Backbone("resnet18", weights="none", image_size=40)
    with pytest.raises(TapsError) as caught:  # the same file forced on other preprocessing
        extract(images, other, ["layer1"], path=report.path, **RUN)
    assert f"was made with transform {FeatureFile(report.path).attrs['transform']}, not {other.transform_spec()};" \
        in str(caught.value)
    # fit with another --image-size does not fall back to this file
    code, _, err = cli(capsys, "fit", "--dataset", f"folder:{tiny_flat}", "--backbone", "resnet18", "--weights",
                       "none", "--image-size", "40", "--features-root", str(tmp_path), *FIT)
    assert code == 1 and "--image-size 40" in one_error_line(err) and "no feature file" in err
    # the file the other settings made is named, so that the flags to fit it by are easy to find
    assert f"other settings made {report.path.relative_to(tmp_path)}: pass the flags they were made with" in err
    code, _, err = cli(capsys, "fit", "--features", str(report.path), "--image-size", "40", *FIT,
                       "--runs-root", str(tmp_path / "runs"))
    assert code == 1 and "was made with transform resize=32 crop=32" in one_error_line(err)


@pytest.mark.slow
def test_each_comparison_setting_gets_its_own_folder_and_is_recorded(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    options, protocol = FitOptions(clf="logreg", grid=[1.0], device="cpu"), parse_protocol("per-class:5")
    weights = tmp_path / "other.pth"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.save(_resnet18_state(), weights)
    folders = []
    for bb in (Backbone("resnet18", weights="none", image_size=32), Backbone("resnet18", weights="none", image_size=40),
               Backbone("resnet18", weights=str(weights), image_size=32)):
        folder, _ = compare_taps(images, [bb], ["layer1"], options, protocol,
                                 extract_options=ExtractOptions(out=tmp_path / "fs", **RUN), runs_root=tmp_path / "runs",
                                 log=lambda *_: None)
        folders.append(folder)
        made_from = json.loads((folder / "compare.json").read_text())["settings"]["features"][0]
        assert made_from["weights"] == bb.weights.spec and made_from["transform"] == bb.transform_spec()
        assert made_from["image_size"] == bb.input_size and made_from["precision"] == ["fp32"]
    assert len(set(folders)) == 3  # none overwrote another


def _resnet18_state() -> dict:
    from torchvision.models import resnet18

    return resnet18(weights=None).state_dict()


def test_predict_takes_a_local_weights_file_by_path_and_checks_its_sha256(tiny_flat, tmp_path, capsys):
    mine, other = tmp_path / "mine.pth", tmp_path / "other.pth"
    for seed, path in ((1, mine), (2, other)):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            torch.save(_resnet18_state(), path)
    common = ["--dataset", f"folder:{tiny_flat}", "--backbone", "resnet18", "--weights", str(mine), "--image-size",
              "32", "--features-root", str(tmp_path / "fs")]
    assert cli(capsys, "extract", *common, "--no-progress", "--workers", "0")[0] == 0
    code, out, _ = cli(capsys, "fit", *common, *FIT, "--runs-root", str(tmp_path / "runs"))
    run = out.strip().splitlines()[-1]
    assert code == 0 and load_results(run).features.weights_sha256 is not None
    image = str(sorted(tiny_flat.glob("square/*.jpg"))[0])
    code, _, err = cli(capsys, "predict", "--run", run, image)
    assert code == 2 and "came from the local weights file mine.pth" in one_error_line(err)
    code, _, err = cli(capsys, "predict", "--run", run, "--weights", str(other), image)
    assert code == 1 and f"weights file {other} (SHA-256" in one_error_line(err) and "is not the file" in err
    code, out, err = cli(capsys, "predict", "--run", run, "--weights", str(mine), image)
    assert code == 0 and out.splitlines()[0].startswith(f"{image}\t") and "probability=" in out
    code, _, err = cli(capsys, "predict", "--run", run, "--weights", "IMAGENET1K_V1", image)
    assert code == 2 and "pass --weights PATH to mine.pth, the file this run's features came from" in \
        one_error_line(err)


@pytest.mark.parametrize("decode", ["pil", "simplejpeg", "torchvision"])
def test_predict_decodes_as_the_training_features_were_decoded(tiny_flat, tmp_path, decode, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    features = FeatureFile(extract(images, bb, ["avgpool"], out=tmp_path, decode=decode, **RUN).path)
    run_dir, results, _ = fit_run(features, "avgpool", "avg", FitOptions(clf="logreg", grid=[1.0], device="cpu"),
                                  parse_protocol("per-class:5"), runs_root=tmp_path / "runs")
    assert results.features.decode == decode
    preds = predict_images(run_dir, [str(tiny_flat / i) for i in images.ids], device="cpu")
    expected = load_model(run_dir, results).predict_proba(features.read("avgpool")).max(axis=1)
    assert np.allclose([p.confidence for p in preds], expected, rtol=0, atol=1e-6)


def test_merged_shards_keep_every_tap_attribute(tiny_folder, tmp_path, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_folder}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    single = FeatureFile(extract(images, bb, ["layer1", "avgpool"], out=tmp_path / "one", decode="pil", **RUN).path)
    shards = [extract(images, bb, ["layer1", "avgpool"], out=tmp_path / "sh", decode="pil", shard=(i, 2), **RUN).path
              for i in range(2)]
    merged = FeatureFile(merge_shards(shards))
    drop = {"created"}
    assert {k: v for k, v in merged.attrs.items() if k not in drop} == \
        {k: v for k, v in single.attrs.items() if k not in drop}
    assert merged.taps == single.taps and merged.taps["avgpool"].decode == "pil"
    for tap in ("layer1", "avgpool"):  # shards batch differently: equal up to float rounding
        np.testing.assert_allclose(merged.read(tap), single.read(tap), rtol=1e-5, atol=1e-5)
    # a shard made another way (here: decoded by simplejpeg) is refused, not merged under the first's settings
    odd = extract(images, bb, ["layer1", "avgpool"], out=tmp_path / "odd", decode="simplejpeg", shard=(1, 2), **RUN)
    with pytest.raises(TapsError, match=r"made tap avgpool with decode simplejpeg, but .*shard0of2.h5 with decode pil; "
                                        r"rerun the odd shard's extract"):
        merge_shards([shards[0], odd.path], tmp_path / "mixed.h5")


def test_results_record_the_folds_really_used_and_impossible_cv_is_refused(tiny_flat, tmp_path, capsys):
    common = ["--dataset", f"folder:{tiny_flat}", *TINY, "--features-root", str(tmp_path / "fs")]
    assert cli(capsys, "extract", *common, "--no-progress", "--workers", "0")[0] == 0
    fit = ["fit", *common, "--clf", "logreg", "--device", "cpu", "--runs-root", str(tmp_path / "runs")]
    code, out, _ = cli(capsys, *fit, "--grid", "0.1,1", "--protocol", "per-class:6", "--folds", "50")
    assert code == 0 and "C by 6-fold CV (asked for 50; the smallest class has 6 training images)" in out
    per_seed = load_results(out.strip().splitlines()[-1]).per_seed[0]
    assert per_seed.cv_folds == 6 and len(per_seed.cv_accuracy) == 2
    code, _, err = cli(capsys, *fit, "--grid", "0.1,1", "--protocol", "per-class:1")
    line = one_error_line(err)
    assert code == 1 and "needs at least 2 training images in every class, but the smallest class has 1" in line
    code, out, _ = cli(capsys, *fit, "--grid", "0.5", "--protocol", "per-class:1")
    assert code == 0 and "C by fixed C=0.5 (one grid value, no selection)" in out
    results = load_results(out.strip().splitlines()[-1])
    assert results.per_seed[0].cv_folds == 1 and results.per_seed[0].cv_accuracy is None

