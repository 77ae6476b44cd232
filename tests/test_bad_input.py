"""Bad input, tried as a new user would: every case is one line on stderr, no traceback, exit 2 for
usage errors and 1 for the rest, and nothing started or half-written before the refusal."""

import json
import os
import shutil

import pytest

from pipeline.cli import main

TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32"]
QUIET = ["--no-progress", "--workers", "0", "--device", "cpu"]




def cases(w: dict) -> list[tuple[list[str], int, str]]:
    root, data, run = w["root"], w["data"], w["run"]
    fit = ["fit", *data, "--clf", "logreg", "--device", "cpu", "--runs-root", str(root / "runs2")]
    csv = ["extract", *TINY, *QUIET, "--features-root", str(root / "csvfs"), "--dataset"]
    return [
        (["extract", "--backbone", "vit_b_16", "--weights", "none", "--taps", "permute"], 2,
         "tap 'permute' of vit_b_16 outputs 196x768 tokens, which taps does not pool; choose from: block0, block1"),
        (["extract", "--runtime", "onnxruntime", "--precision", "bf16"], 2,
         "--runtime onnxruntime runs the forward on the CPU in fp32 or int8; drop --device, --gpus-per-worker and --precision"),
        (["extract", "--runtime", "openvino", "--precision", "fp16"], 2,
         "--runtime openvino runs the forward on the CPU in fp32, bf16 or int8; drop --device"),
        (["extract", "--backbone", "resnet18", "--weights", "none", "--taps", "layer1,avgpool", "--pool", "cls"], 2,
         "--pool cls takes a transformer's class token, but layer1 of resnet18 is a feature map"),
        (["extract", "--backbone", "vgg16", "--weights", "none", "--image-size", "17"], 2,
         "vgg16 cannot take 17px images"),
        (["list", "taps", "vit_b_16", "--image-size", "96"], 2, "it takes --image-size 224 only"),
        (["extract", "--image-size", "-5"], 2, "--image-size must be a positive number of pixels, not -5"),
        (["extract", *data[:2], *TINY, "--features-root", str(root / "afile")], 2, "is a file, in the way of that folder"),
        ([*fit, "--preprocess", "pca:5000", "--grid", "1", "--protocol", "per-class:5"], 2,
         "--preprocess pca:5000 asks for more components than this fit can have: at most 15"),
        ([*fit, "--protocol", "fraction:0.05"], 2, "fraction:0.05 leaves training split smaller than the 3 classes"),
        ([*fit, "--protocol", "fraction:0.95"], 2, "fraction:0.95 leaves test split smaller than the 3 classes"),
        ([*fit, "--grid", "nan"], 2, "--grid values must be positive numbers, not nan"),
        ([*fit, "--clf", "linear", "--hidden", "-3"], 2, "--hidden must be 0 (a linear head) or more, not -3"),
        ([*fit, "--protocol", "per-class:1", "--grid", "0.1,1"], 1, "needs at least 2 training images in every class"),
        ([*csv, f"csv:{root / 'short.csv'}"], 2, "line 3 has fewer cells than the header (1 of 2); fix that row"),
        ([*csv, f"csv:{root / 'one.csv'}"], 2, "has one column (path); it needs an image path and a label per row"),
        ([*csv, f"csv:{root / 'swapped.csv'}"], 2, "no value of column 'label'"),
        (["predict", "--run", str(run), "/dev/zero"], 2, "/dev/zero is not a regular file; pass image files"),
        (["predict", "--run", str(run), str(root / "ok.csv")], 1, "none of the 1 images could be read"),
        (["info", str(root / "ok.csv")], 1, "is not an HDF5 file; pass a feature file that `taps extract` wrote"),
        (["info", str(root)], 1, "is a folder; pass a feature file (.h5) inside it"),
        # /proc refuses new files; root passes the permission check, so the write's own error is named
        (["export", str(next(w["fs"].rglob("*.h5"))), "--taps", "avgpool", "--out", "/proc/taps/x.npz"],
         *((1, "cannot write /proc/taps/x.npz (") if os.geteuid() == 0 else (2, "--out /proc/taps is not writable"))),
        (["fit", "--features", str(next(w["fs"].rglob("*.h5"))), "--runs-root", "/proc/taps/runs"],
         *((1, "cannot use /proc/taps (") if os.geteuid() == 0 else (2, "--runs-root /proc/taps/runs is not writable"))),
        (["list", "taps"], 2, "`taps list taps` needs a backbone name"),
        (["bench", "--rounds", "0", "--out", str(root / "bench")], 2, "--rounds must be at least 1, not 0"),
        (["bench", "--data-root", str(root / "nothing"), "--out", str(root / "bench")], 2,
         "has no caltech101/101_ObjectCategories; pass the folder that holds caltech101/, or leave --data-root out"),
        (["extract", *data, *TINY, "--engine", "ray", "--ray-address", "127.0.0.1:9", "--features-root",
          str(root / "cmpfs")], 1, "--ray-address 127.0.0.1:9: no Ray cluster answers there; start one"),
        (["merge", str(root / "missing.shard0of2.h5")], 2, "shard file"),
        (["compare", *data, "--protocol", "per-class:40", "--features-root", str(root / "cmpfs")], 2,
         "per-class:40 needs more than 40 images in every class"),
        (["fit", "--features", str(next(w["fs"].rglob("*.h5"))), "--tap", "avgpol", "--runs-root", str(root / "runs2")], 2,
         "did you mean avgpool? (it has: avgpool; if avgpol is a tap of its backbone, `taps extract ... --taps avgpol` adds it)"),
        ([*fit, "--tap", "avgpool+avgpool"], 2, "tap set 'avgpool+avgpool' names a tap twice; name each tap once"),
        ([*fit, "--tap", "auto+avgpool"], 2, "'auto' chooses the whole set; pass --tap auto alone"),
        ([*fit, "--tap", "layer1+"], 2, "bad tap set 'layer1+': write taps joined by '+'"),
        ([*fit, "--tap", "auto"], 2, "--tap auto chooses among the file's taps, but"),
        ([*fit, "--tap", "auto", "--select-threshold", "2"], 2, "--select-threshold is a CV-accuracy gain between 0"),
        (["compare", *data, "--taps", "avgpool", "--fuse", "--features-root", str(root / "cmpfs")], 2,
         "--fuse (or auto) chooses among the compared taps; compare at least two"),
        (["compare", *data, "--clf", "logreg,knn", "--grid", "1", "--features-root", str(root / "cmpfs")], 2,
         "--grid is one classifier's grid"),
        (["compare", *data, "--clf", "logreg,forest", "--features-root", str(root / "cmpfs")], 2,
         "unknown classifier 'forest'"),
        ([*csv, f"csv:{root / 'twice.csv'}"], 2, "lists 1 image file(s) more than once (1 repeats; e.g. img_000.jpg "
                                                 "(line 2, line 8)); remove the repeats, or pass --duplicates first"),
        ([*csv, f"csv:{root / 'numbers.csv'}"], 2, "writes one number as 2 labels: '1' (line 2) and '1.0' (line 5)"),
        ([*csv, f"csv:{root / 'nolabel.csv'}"], 2, "line 4 has an empty label in column 'label'; label that row"),
        ([*csv, f"csv:{root / 'latin.csv'}"], 2, "is not utf-8-sig (byte 0xe9 on line 6); pass --encoding"),
        ([*csv, f"folder:{root / 'ok.csv'}"], 2, "is a CSV file, not a folder; pass folder:PATH to an ImageFolder "
                                                 "tree or csv:"),
        ([*fit, "--pool", "maxx"], 2, "argument --pool: invalid choice: 'maxx'"),
        ([*fit, "--tap", "avgpol"], 2, "unknown tap 'avgpol' for resnet18; did you mean avgpool?"),
        ([*fit, "--clf", "knn", "--grid", "2.5"], 2, "--grid for knn is n_neighbors, a whole number, not 2.5"),
        (["fit", "--datset", "digits"], 2, "taps fit: error: unrecognized arguments: --datset digits; did you mean "
                                          "--dataset?"),
        # no prefix matching: compare has no --features, and taking it for --features-root would run on the default
        (["compare", "--features", "file.h5"], 2, "unrecognized arguments: --features file.h5; did you mean "
                                                  "--features-root?"),
        (["extract", *data, *QUIET, "--image-size", "100000"], 2, "64 images of 100000x100000 px need about"),
        (["extract", *data, *QUIET, "--decode", "pil"], 1, "was made with decode simplejpeg, but this run resolves "
                                                          "to decode pil; rerun with --decode simplejpeg to use it"),
    ]


def test_every_bad_input_is_one_line_with_the_right_exit_code(world, capsys):
    for args, code, message in cases(world):
        try:
            got = main(args)
        except SystemExit as exc:  # argparse's own refusals end the process, as on the command line
            got = exc.code
        out, err = capsys.readouterr()
        assert (got, err.count("\n")) == (code, 1) and message in err and "Traceback" not in err, (args, err)
    assert not any((world["root"] / d).exists() for d in ("cmpfs", "runs2", "bench"))  # nothing started
    assert not list(world["root"].glob("csvfs/**/*.h5"))  # refused CSVs wrote no feature file


def test_csv_with_a_bom_reads_its_columns_by_name(world, capsys):
    root = world["root"]
    args = ["extract", *TINY, *QUIET, "--features-root", str(root / "bomfs"), "--image-column", "path",
            "--label-column", "label"]
    assert main([*args, "--dataset", f"csv:{root / 'bom.csv'}"]) == 0
    assert "extracted avgpool for 6 samples" in capsys.readouterr().out


def test_an_edited_results_json_is_one_line(world, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    results = json.loads((run / "results.json").read_text())
    del results["model"]
    (run / "results.json").write_text(json.dumps(results))
    assert main(["predict", "--run", str(run), world["image"]]) == 1
    assert "lacks model.file, model.sha256 (edited or from another tool)" in capsys.readouterr().err


def test_edited_weights_in_results_json_are_named_as_such(world, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    results = json.loads((run / "results.json").read_text())
    results["features"]["weights"] = "IMAGENET1K_V1"  # the run was made with --weights none at 32 px
    (run / "results.json").write_text(json.dumps(results))
    assert main(["predict", "--run", str(run), world["image"]]) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records weights IMAGENET1K_V1, but its feature file" in err
    assert "was made with none: the record was edited; rerun `taps fit --force`" in err


def test_every_image_skipped_is_refused_before_fitting(world, capsys):
    root = world["root"]
    data = ["--dataset", f"folder:{root / 'broken'}", *TINY, "--features-root", str(root / "brokenfs")]
    assert main(["extract", *data, *QUIET]) == 0
    capsys.readouterr()
    assert main(["fit", *data, "--device", "cpu", "--runs-root", str(root / "brokenruns")]) == 1
    assert "every image of" in capsys.readouterr().err and not (root / "brokenruns").exists()


def test_folders_skip_hidden_files_and_empty_classes_and_refuse_links_outside(tmp_path, image_folder):
    from features.datasets import load_dataset
    from features.errors import UsageError

    image_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    (tmp_path / "d" / "a" / ".hidden.jpg").write_bytes(b"junk")
    (tmp_path / "d" / "a" / "._img_000.jpg").write_bytes(b"macOS resource fork")
    (tmp_path / "d" / "empty").mkdir()
    images = load_dataset(f"folder:{tmp_path / 'd'}")
    assert images.classes == ["a", "b"] and len(images) == 4
    image_folder(tmp_path / "elsewhere", classes=("c",), per_class=1)
    (tmp_path / "d" / "c").symlink_to(tmp_path / "elsewhere" / "c")
    with pytest.raises(UsageError, match="links outside .* pass --allow-outside-root"):
        load_dataset(f"folder:{tmp_path / 'd'}")
    assert len(load_dataset(f"folder:{tmp_path / 'd'}", allow_outside=True)) == 5


def test_a_subset_as_large_as_the_dataset_is_the_dataset(tiny_flat):
    from features.datasets import load_dataset

    full = load_dataset(f"folder:{tiny_flat}")
    assert load_dataset(f"folder:{tiny_flat}", subset_spec="1000").name == full.name
    assert load_dataset(f"folder:{tiny_flat}", subset_spec="10").name == f"{full.name}-n10"
