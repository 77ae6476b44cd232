"""The command line: last line is the path, errors are one line with the right exit code."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd)


def test_extract_prints_the_feature_file_last(tiny_flat, tmp_path, capsys):
    code = main(["extract", "--dataset", f"folder:{tiny_flat}", "--backbone", "resnet18", "--weights", "none",
                 "--image-size", "32", "--taps", "layer1,avgpool", "--workers", "0", "--no-progress",
                 "--features-root", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and Path(out[-1]).is_file() and re.search(r"/resnet18__none__32px-[0-9a-f]{8}\.h5$", out[-1])
    assert out[0].startswith("read folder-") and out[0].endswith(": 30 images in 3 classes (circle 10, square 10, "
                                                                 "stripes 10)")
    assert "extracted layer1, avgpool for 30 samples" in out[1]


def test_usage_errors_are_one_line_exit_2(capsys):
    for args, needle in ([["extract", "--dataset", "nope"], "unknown dataset 'nope'"],
                         [["extract", "--backbone", "resnet19"], "unknown backbone"],
                         [["list", "taps", "resnet18", "--bogus"], "unrecognized arguments"],
                         [["extract", "--pool", "median"],
                          "--pool: invalid choice: 'median' (choose from 'avg', 'max', 'avgmax', 'pyramid', 'gem', 'avgstd', 'cls')"],
                         [["compare", "--loader", "fast"], "--loader: invalid choice: 'fast'"],
                         [["bench", "--runtimes", "tensorrt"],
                          "unknown runtime 'tensorrt'; choose from onnxruntime, openvino or none"],
                         [["extract", "--batch-size", "0"], "--batch-size must be at least 1, not 0"]):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse's refusals end the process
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


@pytest.mark.slow
def test_a_usage_error_ends_the_process_with_exit_2():
    proc = run("extract", "--pool", "median")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "invalid choice: 'median'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_list_taps_shows_dimensions():
    proc = run("list", "taps", "resnet18")
    assert proc.returncode == 0
    header = next(l.split() for l in proc.stdout.splitlines() if l.startswith("tap"))
    row = next(l.split() for l in proc.stdout.splitlines() if l.startswith("layer3"))
    assert row[2] == "256x14x14" and dict(zip(header[4:], row[3:], strict=True)) == {
        "avg": "256", "max": "256", "avgmax": "512", "pyramid": "1280", "gem": "256", "avgstd": "512",
        "cls": "-"}  # no class token


def test_every_subcommand_parses():
    from pipeline.cli import COMMANDS, build_parser

    parser = build_parser()
    for argv in (["fit", "--clf", "linear", "--tap", "pooled", "--runs-root", "r"],
                 ["compare", "--backbone", "resnet18,mobilenet_v2", "--taps", "all", "--runs-root", "r"],
                 ["predict", "--run", "r", "a.jpg"], ["info", "f.h5"], ["list", "taps", "vgg16"]):
        assert parser.parse_args(argv).func.__module__ == f"pipeline.app.{COMMANDS[argv[0]]}"  # its own module


def test_out_keeps_working_under_its_old_meanings_with_a_note(capsys):
    """--out named the feature folder in extract and the runs folder in fit and compare; each now has its
    own name, and the old spelling still lands in the right place."""
    from pipeline.cli import build_parser

    assert build_parser().parse_args(["fit", "--out", "r"]).runs_root == "r"
    assert "--out is now spelled --runs-root" in capsys.readouterr().err
    assert build_parser().parse_args(["compare", "--out", "r"]).runs_root == "r"
    assert build_parser().parse_args(["extract", "--out", "f"]).features_root == "f"
    assert "--out is now spelled --features-root" in capsys.readouterr().err
    assert build_parser().parse_args(["fit", "--runs-root", "r"]).runs_root == "r" and not capsys.readouterr().err


@pytest.mark.slow
def test_fit_without_features_names_the_extract_command(tmp_path):
    proc = run("fit", "--dataset", "digits", "--features-root", str(tmp_path))
    assert proc.returncode == 1 and "run `taps extract --dataset digits --backbone mobilenet_v2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # fused and auto fits name the extraction of every tap they read
    for tap, taps in (("block14+pooled", "--taps block14,pooled"), ("auto", "--taps all")):
        proc = run("fit", "--dataset", "digits", "--tap", tap, "--features-root", str(tmp_path))
        assert proc.returncode == 1 and taps in proc.stderr, proc.stderr


def test_an_unexpected_error_is_one_line_naming_debug(monkeypatch, capsys):
    import features.datasets

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody planned for\nsecond line")

    monkeypatch.setattr(features.datasets, "load_dataset", broken)
    assert main(["extract", "--weights", "none", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == ("taps extract: error: unexpected RuntimeError (something nobody planned for); rerun with --debug "
                   "for the traceback\n")
    with pytest.raises(RuntimeError, match="nobody planned"):
        main(["extract", "--weights", "none", "--debug"])


def test_every_command_accepts_no_progress_and_bars_stay_out_of_logs(tiny_flat, tmp_path, capsys, monkeypatch):
    from pipeline.cli import build_parser

    parser = build_parser()
    for argv in (["fit"], ["info", "f.h5"], ["list", "datasets"], ["merge", "a.h5"], ["predict", "--run", "r", "a"],
                 ["bench"], ["extract"], ["compare"]):
        assert parser.parse_args([*argv, "--no-progress"]).progress is False
    # progress left on, but stderr is not a terminal (a log file, a pipe): no bar, no carriage returns
    assert main(["extract", "--dataset", f"folder:{tiny_flat}", "--backbone", "resnet18", "--weights", "none",
                 "--image-size", "32", "--workers", "0", "--features-root", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "img/s]" not in err
    # instead, a plain line every TAPS_PROGRESS_EVERY seconds (here: every block); none with --no-progress
    monkeypatch.setenv("TAPS_PROGRESS_EVERY", "0")
    args = ["extract", "--dataset", f"folder:{tiny_flat}", "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--workers", "0", "--batch-size", "8", "--features-root", str(tmp_path / "again")]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resnet18 avgpool: ")]
    assert lines[-1].startswith("resnet18 avgpool: 30/30 (100%) img, ") and len(lines) == 4  # 4 blocks of 8
    assert main([*args, "--force", "--no-progress"]) == 0 and "avgpool: " not in capsys.readouterr().err


LIGHT = """import sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted({"torch", "torchvision", "timm", "sklearn"} & set(sys.modules)))"""


@pytest.mark.parametrize("argv", [["--help"], ["extract", "--help"], ["extract", "--bogus"], ["merge", "--help"], ["list", "datasets"],
                                  ["info", "FILE"], ["fti"], ["fit", "--bogus"], ["fit", "--help"],
                                  ["compare", "--bogus"], ["predict", "--bogus"], ["fit", "--features", "no.h5"],
                                  ["compare", "--dataset", "folder:/nonexistent"]])
def test_help_listing_info_and_argument_errors_import_no_torch_or_sklearn(argv, tiny_features):
    """Start-up: these answer in a fraction of a second because they never import the heavy libraries
    (a command's arguments are only built when that command runs; torch only where a tensor is made)."""
    argv = [str(tiny_features[1].path) if a == "FILE" else a for a in argv]
    proc = subprocess.run([sys.executable, "-c", LIGHT, *argv], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_backbone_names_are_kept_so_listing_them_or_a_misspelt_one_imports_no_library(tmp_path):
    """The first listing imports torchvision and timm and keeps what they list; then `list backbones` and an
    unknown --backbone answer from the kept names (the closest ones suggested) in a fraction of a second."""
    env = {**os.environ, "TAPS_CACHE": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", LIGHT, *argv], capture_output=True, text=True, env=env)
            for argv in (["list", "backbones"], ["list", "backbones"], ["extract", "--backbone", "resnet19"],
                         ["list", "taps", "timm:resnet81"])]
    first, second = (run.stdout.strip().splitlines() for run in runs[:2])
    assert first[:-1] == second[:-1] and "resnet18" in first[0].split() and first[1].startswith("timm:NAME")
    assert "'torchvision'" in first[-1] and "'timm'" in first[-1] and second[-1] == "[]"
    for run, want in zip(runs[2:], ("unknown backbone 'resnet19'; did you mean resnet18",
                                    "unknown backbone 'timm:resnet81'; did you mean timm:resnet18"), strict=True):
        assert want in run.stderr and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_a_misspelt_weights_name_of_a_model_used_before_imports_no_library(tmp_path):
    """The first resolution of a model keeps its weights' names; a later misspelt --weights for it is
    refused from them, with the source's own line, in a fraction of a second."""
    env = {**os.environ, "TAPS_CACHE": str(tmp_path)}
    argv = ["extract", "--dataset", "digits", "--backbone", "resnet18", "--weights", "IMAGENET1K_V9"]
    first, second = (subprocess.run([sys.executable, "-c", LIGHT, *argv], capture_output=True, text=True, env=env)
                     for _ in range(2))
    want = "unknown weights 'IMAGENET1K_V9' for resnet18; valid: auto, DEFAULT, none, FILE.pth, IMAGENET1K_V1"
    assert want in first.stderr and "'torchvision'" in first.stdout, first.stdout + first.stderr
    assert want in second.stderr and second.stdout.strip() == "[]", second.stdout + second.stderr


@pytest.mark.parametrize("clf,by,torch_expected", [("logreg", "file", False), ("logreg", "dataset", False),
                                                    ("knn", "file", True)])
def test_a_fit_imports_torch_only_for_a_head_that_computes_with_it(clf, by, torch_expected, tiny_flat, tiny_features,
                                                                   tmp_path):
    """scikit-learn's solver fits without torch (over a second of start-up saved), also when the feature
    file is found from the dataset and backbone (named by the backbone's card); the kNN probe uses it. A
    reused run imports neither."""
    _, features, root = tiny_features
    found = ["--features", str(features.path)] if by == "file" else [
        "--dataset", f"folder:{tiny_flat}", "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
        "--features-root", str(root)]
    argv = ["fit", *found, "--tap", "avgpool", "--clf", clf, "--solver", "sklearn", "--protocol", "fraction:0.5",
            "--runs-root", str(tmp_path), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", LIGHT, *argv], capture_output=True, text=True)
    imported = proc.stdout.strip().splitlines()[-1]
    assert "'sklearn'" in imported and ("'torch'" in imported) == torch_expected, proc.stdout + proc.stderr
    again = subprocess.run([sys.executable, "-c", LIGHT, *argv], capture_output=True, text=True).stdout
    assert again.startswith(f"reused {clf}") and again.strip().splitlines()[-1] == "[]", again  # neither, reused


def test_the_help_of_each_family_is_written_by_its_records(capsys):
    """A new precision, loader, decoder, classifier or tap selector is one record: its name and summary reach
    the help without an edit to the CLI."""
    from features.decoders import DECODER_REGISTRY
    from features.loaders import LOADER_REGISTRY
    from features.precisions import PRECISION_REGISTRY
    from pipeline.classifiers import CLASSIFIER_REGISTRY
    from pipeline.tapselectors import SELECTOR_REGISTRY

    def flat(text: str) -> str:  # argparse wraps the help, at hyphens too
        return "".join(text.split())

    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return flat(capsys.readouterr().out)

    extract = help_of("extract")
    for record in PRECISION_REGISTRY.values():
        assert flat(f"{record.name}: {record.summary}") in extract
    for record in LOADER_REGISTRY.values():
        assert (flat(f"{record.name}: {record.summary}") in extract) is not record.remote  # remote: --engine's
        assert flat(f"{record.workers} ({record.name})") in extract
    for record in DECODER_REGISTRY.values():
        assert flat(f"{record.name}: {record.description}") in extract
    fit = help_of("fit")
    for alias, record in CLASSIFIER_REGISTRY.items():
        assert alias == record.name or flat(f"{alias} is an alias of {record.name}") in fit
    for record in SELECTOR_REGISTRY.values():
        assert flat(f"{record.name}: {record.summary}") in fit


def test_predict_for_scripts_reads_folders_writes_one_record_per_image_and_says_when_images_failed(
        world, tiny_flat, tmp_path, capsys):
    run = str(world["run"])
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_flat / "circle", folder / "circle")
    (folder / "circle" / ".hidden.jpg").write_bytes(b"skipped: hidden")
    (folder / "notes.txt").write_text("not an image type: skipped, and counted")
    with pytest.warns(UserWarning, match=r"^1 file\(s\) in the folders given are not images by their extension and "
                                         r"are left out \(\.txt 1, e\.g\. notes\.txt\)"):
        assert main(["predict", "--run", run, str(folder), "--format", "json", "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]  # stdout: records only, the run path on stderr
    assert [r["path"] for r in records] == sorted(str(p) for p in (folder / "circle").glob("img_*.jpg"))
    assert all(len(r["top"]) == 2 and r["top"][0]["probability"] >= r["top"][1]["probability"]
               and r["top"][0]["label"] == r["label"] for r in records)
    assert f"classified {len(records)} of {len(records)} images with {run}" in err
    assert main(["predict", "--run", run, str(folder), "--format", "csv"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["label"] for r in rows] == [r["label"] for r in records] and rows[0]["kind"] == "probability"
    (folder / "circle" / "zz_broken.jpg").write_bytes(b"not a jpeg")  # one unreadable image: exit 1 unless allowed
    assert main(["predict", "--run", run, str(folder)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].startswith(f"{folder / 'circle' / 'zz_broken.jpg'}\tERROR\t")
    assert "1 of 11 images could not be read" in err and "--allow-failures" in err
    assert main(["predict", "--run", run, str(folder), "--allow-failures"]) == 0
    assert main(["predict", "--run", run, str(tmp_path / "missing.jpg")]) == 1  # nothing readable
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--run", run, str(tmp_path / "empty")]) == 2  # no image files at all
    assert "no image files in" in capsys.readouterr().err


def test_track_mlflow_logs_each_fit_and_a_compare_as_a_parent_with_one_run_per_row(world, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    fit = ["fit", *world["data"], "--clf", "logreg", "--device", "cpu", "--protocol", "per-class:5", "--seeds", "2",
           "--runs-root", str(tmp_path / "runs"), "--track", f"mlflow:{store}"]
    assert main(fit) == 0
    out = capsys.readouterr().out
    assert "tracked as MLflow run" in out
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(Path(out.splitlines()[-1]).parent.name)  # the dataset's name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["clf"] == "logreg" and run.data.params["tap"] == "avgpool"
    assert 0 <= run.data.metrics["mean_per_class_accuracy_mean"] <= 1
    assert len(client.get_metric_history(run.info.run_id, "accuracy")) == 2  # one point per seed
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"results.json", "confusion.png"}
    compare = ["compare", *world["data"], "--taps", "layer4,avgpool", "--clf", "logreg", "--device", "cpu",
               "--protocol", "per-class:5", "--no-progress", "--workers", "0", "--runs-root", str(tmp_path / "runs"),
               "--track", f"mlflow:{store}"]
    assert main(compare) == 0
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name.startswith("compare__"))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and {r.data.params["tap"] for r in children} == {"layer4", "avgpool"}
    assert "compare.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    capsys.readouterr()
    for bad, code in (("bogus:x", 2), ("mlflow:http://127.0.0.1:9", 1)):  # refused before the fit, not after it
        assert main([*fit[:-3], str(tmp_path / "runs3"), "--track", bad]) == code
        assert not (tmp_path / "runs3").exists()
    assert "the MLflow tracking server http://127.0.0.1:9 cannot be reached from here" in capsys.readouterr().err
