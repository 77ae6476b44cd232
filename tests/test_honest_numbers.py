"""Numbers a user can defend on the inputs they really have: repeated rows, byte-identical images,
label spellings, reruns with other settings and files edited in place are refused or handled, and
the tool says which."""

import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
import warnings

import h5py
import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from features.backbones import Backbone
from features.datasets import load_dataset
from features.errors import TapsError, UsageError
from features.extract import extract
from features.store import FeatureFile
from pipeline.api import copies as api_copies
from pipeline.cli import main
from pipeline.nearcopies import near_copies
from pipeline.protocols import make_split, parse_protocol
from pipeline.report import format_table
from pipeline.selection import SelectedClassifier, training_folds

TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32"]
QUIET = ["--no-progress", "--workers", "0", "--device", "cpu"]
FIT = ["--clf", "logreg", "--grid", "1", "--device", "cpu"]


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _csv(path, rows, header="path,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_repeated_csv_rows_are_refused_or_kept_once(csv_world, capsys):
    root, rows = csv_world
    twice = _csv(root / "twice.csv", rows + rows[:2])
    with pytest.raises(UsageError, match=r"lists 2 image file\(s\) more than once \(2 repeats; e\.g\. img_000\.jpg "
                                         r"\(line 2, line 8\).*pass --duplicates first"):
        load_dataset(f"csv:{twice}")
    with pytest.warns(UserWarning, match="kept the first of 4 occurrences of 2 image file"):
        images = load_dataset(f"csv:{twice}", duplicates="first")
    assert len(images) == 6 and len(set(images.ids)) == 6
    fs = root / "fs"
    code, out, _ = cli(capsys, "extract", "--dataset", f"csv:{twice}", "--duplicates", "first", *TINY, *QUIET,
                       "--features-root", fs)
    assert code == 0 and "6 images in 2 classes (a 3, b 3)" in out
    ids = FeatureFile(out.strip().splitlines()[-1]).ids
    assert len(ids) == len(set(ids)) == 6
    # fit reads the dataset the same way, and the command it suggests keeps --duplicates first
    code, out, err = cli(capsys, "fit", "--dataset", f"csv:{twice}", "--duplicates", "first", *TINY, *FIT,
                         "--protocol", "fraction:0.5", "--features-root", fs, "--runs-root", root / "runs")
    assert code == 0, err


def test_csv_labels_are_stripped_and_ambiguous_ones_refused(csv_world):
    root, rows = csv_world
    spaced = [r.replace(",a", ",a ") if i % 2 else r for i, r in enumerate(rows)]
    images = load_dataset(f"csv:{_csv(root / 'spaced.csv', spaced)}")
    assert images.classes == ["a", "b"] and np.bincount(images.labels).tolist() == [3, 3]
    numbers = [r.replace(",a", ",1").replace(",b", ",2") for r in rows]
    numbers[1] = numbers[1].replace(",1", ",1.0")
    with pytest.raises(UsageError, match=r"writes one number as 2 labels: '1' \(line 2\) and '1\.0' \(line 3\)"):
        load_dataset(f"csv:{_csv(root / 'numbers.csv', numbers)}")
    empty = rows[:3] + [rows[3].split(",")[0] + ",  "] + rows[4:]
    with pytest.raises(UsageError, match=r"line 5 has an empty label in column 'label'"):
        load_dataset(f"csv:{_csv(root / 'empty.csv', empty)}")


def test_a_csv_a_windows_tool_wrote_reads_its_backslashed_paths(csv_world):
    root, rows = csv_world  # rows: a/img_000.jpg,a ... under root/images
    windows = root / "windows.csv"
    windows.write_bytes(("path,label\r\n" + "\r\n".join(r.replace("/", "\\") for r in rows) + "\r\n").encode())
    images = load_dataset(f"csv:{windows}")
    assert images.ids == load_dataset(f"csv:{_csv(root / 'plain.csv', rows)}").ids == \
        [f"images/{r.split(',')[0]}" for r in rows]
    drive = _csv(root / "drive.csv", [r"C:\photos\a.jpg,a", r"C:\photos\b.jpg,b"])
    with pytest.raises(UsageError, match=r"\(first: 'C:\\\\photos\\\\a.jpg'\); write the paths relative to the "
                                         r"CSV's folder: this is a Windows drive path"):
        load_dataset(f"csv:{drive}")


def test_a_csv_finds_accented_file_names_in_the_other_unicode_form(csv_world):
    """A CSV spells ``café.jpg`` composed; the file came from a Mac, which names it decomposed: one name
    to Unicode, two byte strings to the file system. Read (was: skipped as missing)."""
    root, rows = csv_world
    for i, form in enumerate(("NFD", "NFC")):  # a file named each way, each listed the other way
        (root / "images" / "a" / f"img_00{i}.jpg").rename(root / "images" / "a" / unicodedata.normalize(form, f"café{i}.jpg"))
    listed = [f"a/{unicodedata.normalize('NFC' if i == 0 else 'NFD', f'café{i}.jpg')},a" for i in range(2)] + rows[2:]
    images = load_dataset(f"csv:{_csv(root / 'accents.csv', listed)}")
    assert all(p.is_file() for p in images.paths) and len(images) == 6
    assert images.ids[:2] == [f"images/a/{unicodedata.normalize(form, f'café{i}.jpg')}" for i, form in enumerate(("NFD", "NFC"))]


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_a_csv_split_by_semicolons_tabs_or_bars_reads_as_a_comma_one(csv_world, delimiter):
    root, rows = csv_world  # spreadsheets where the comma is the decimal mark write ';'
    table = _csv(root / "other.csv", [r.replace(",", delimiter) for r in rows], header=f"path{delimiter}label")
    images, plain = load_dataset(f"csv:{table}"), load_dataset(f"csv:{_csv(root / 'plain.csv', rows)}")
    assert (images.ids, images.labels.tolist(), images.classes) == (plain.ids, plain.labels.tolist(), plain.classes)


def test_a_split_folder_is_never_a_class_and_an_empty_class_folder_is_named(tmp_path, image_folder):
    image_folder(tmp_path / "only" / "train", classes=("a", "b"), per_class=2)
    with pytest.warns(UserWarning, match="has only train/: its class folders are the classes, with no official split"):
        images = load_dataset(f"folder:{tmp_path / 'only'}")
    assert images.classes == ["a", "b"] and images.splits is None and images.ids[0] == "train/a/img_000.jpg"
    image_folder(tmp_path / "held" / "val", classes=("a", "b"), per_class=2)
    image_folder(tmp_path / "held" / "test", classes=("a", "b"), per_class=2)
    with pytest.raises(UsageError, match=r"has val/, test/ but no train/; add train/ beside them, or pass "
                                         r"folder:.*held/val to read one as the dataset"):
        load_dataset(f"folder:{tmp_path / 'held'}")
    image_folder(tmp_path / "gap", classes=("a", "b"), per_class=2)
    (tmp_path / "gap" / "c").mkdir()
    with pytest.warns(UserWarning, match=r"class folder\(s\) c hold no images and are left out"):
        assert load_dataset(f"folder:{tmp_path / 'gap'}").classes == ["a", "b"]


def _fit_official(tmp_path, image_folder, capsys, train: tuple, val: tuple) -> tuple[str, dict]:
    """Extract and fit a folder whose train/ and val/ hold these classes -> (fit's output, results.json)."""
    image_folder(tmp_path / "data" / "train", classes=train, per_class=6)
    image_folder(tmp_path / "data" / "val", classes=val, per_class=3, seed=1)
    common = ["--dataset", f"folder:{tmp_path / 'data'}", *TINY, "--features-root", tmp_path / "fs"]
    assert cli(capsys, "extract", *common, *QUIET)[0] == 0
    code, out, _ = cli(capsys, "fit", *common, *FIT, "--runs-root", tmp_path / "runs")
    assert code == 0
    return out, json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())


def test_classes_without_a_test_image_are_named_beside_the_metrics_they_are_left_out_of(tmp_path, image_folder,
                                                                                         capsys):
    out, results = _fit_official(tmp_path, image_folder, capsys, ("a", "b", "c"), ("a", "b"))  # no c to test
    assert "note: 1 of 3 classes have no test image (in some seed's split): c; mean per-class " \
        "accuracy averages the classes that have" in out
    assert results["untested_classes"] == ["c"] and results["untrained_classes"] == []
    # 3 test images in each of the 2 tested classes: one image is 1/6 of the metric, and the note says so
    assert results["fewest_test_images"] == {"class": "a", "images": 3, "classes_tested": 2}
    assert "note: class 'a' has 3 test image(s) (seed 0); each moves mean per-class accuracy by 16.67 points" in out


def test_classes_with_test_images_but_none_to_train_on_are_named(tmp_path, image_folder, capsys):
    """An official split whose val/ holds a class that train/ lacks: the classifier can never predict it,
    so its test images are errors that no tap or classifier can mend, and the notes say so."""
    out, results = _fit_official(tmp_path, image_folder, capsys, ("a", "b"), ("a", "b", "c"))
    assert "note: 1 of 3 classes have test images but no training image (in some seed's split): c; " \
        "the classifier cannot predict them" in out
    assert results["untrained_classes"] == ["c"] and results["untested_classes"] == []
    per_class = (next((tmp_path / "runs").rglob("per_class.csv")).read_text())
    assert re.search(r"^c,0(\.0+)?,", per_class, re.M)  # scored as it is: recall 0, in the mean


def test_classes_spelt_two_ways_are_kept_apart_with_a_warning(csv_world, image_folder, tmp_path):
    """``A`` and ``a``, ``golden_retriever`` and ``golden retriever``: separate classes as written (EMNIST's
    letters are), but named in a warning, since more often they are one class spelt twice."""
    root, rows = csv_world
    cased = [r.replace(",a", ",A") if i % 2 else r for i, r in enumerate(rows)]
    with pytest.warns(UserWarning, match=r"classes 'A' and 'a' differ only in case or spacing \(1 such group\)"):
        images = load_dataset(f"csv:{_csv(root / 'cased.csv', cased)}")
    assert images.classes == ["A", "a", "b"]
    image_folder(tmp_path / "dogs", classes=("golden_retriever", "golden retriever", "pug"), per_class=2)
    with pytest.warns(UserWarning, match=r"classes 'golden retriever' and 'golden_retriever' differ only"):
        assert len(load_dataset(f"folder:{tmp_path / 'dogs'}").classes) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one spelling per class: no warning
        load_dataset(f"csv:{_csv(root / 'plain.csv', rows)}")


def test_a_class_written_in_two_unicode_forms_is_one_class(csv_world, image_folder, tmp_path):
    """``café`` composed and decomposed (macOS writes file names decomposed) are one text to Unicode:
    read as one class, with a warning; they were two classes that looked the same. A name written one
    way keeps its spelling, so its dataset's feature files stay valid."""
    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    root, rows = csv_world
    mixed = [r.replace(",a", f",{decomposed if i % 2 else composed}") for i, r in enumerate(rows)]
    with pytest.warns(UserWarning, match="class 'café' is written in two Unicode forms"):
        images = load_dataset(f"csv:{_csv(root / 'forms.csv', mixed)}")
    assert images.classes == ["b", composed] and np.bincount(images.labels).tolist() == [
        sum(r.endswith(",b") for r in rows), sum(r.endswith(",a") for r in rows)]
    image_folder(tmp_path / "cafes", classes=(composed, decomposed, "tea"), per_class=2)
    with pytest.warns(UserWarning, match="read as one class"):
        folder = load_dataset(f"folder:{tmp_path / 'cafes'}")
    assert folder.classes == [composed, "tea"] and np.bincount(folder.labels).tolist() == [4, 2]
    image_folder(tmp_path / "one_way", classes=(decomposed, "tea"), per_class=2)  # as macOS wrote it, alone
    assert load_dataset(f"folder:{tmp_path / 'one_way'}").classes == [decomposed, "tea"]  # names kept: files too


def test_a_csv_in_another_encoding_names_the_line_and_reads_with_encoding(csv_world, tmp_path):
    root, rows = csv_world
    latin = root / "latin.csv"
    latin.write_bytes(("path,label\n" + "\n".join(rows[:3] + [r.replace(",b", ",bé") for r in rows[3:]]) + "\n")
                      .encode("latin-1"))
    with pytest.raises(UsageError, match=r"is not utf-8-sig \(byte 0xe9 on line 5\); pass --encoding"):
        load_dataset(f"csv:{latin}")
    assert load_dataset(f"csv:{latin}", encoding="latin-1").classes == ["a", "bé"]


def test_byte_identical_images_stay_on_one_side_of_every_split(copies, tmp_path, capsys):
    fs = tmp_path / "fs"
    data = ["--dataset", f"folder:{copies}", *TINY, "--features-root", fs]
    assert cli(capsys, "extract", *data, *QUIET)[0] == 0
    features = FeatureFile(next(fs.rglob("*.h5")))
    groups = features.duplicate_groups()
    assert (groups != np.arange(len(groups))).sum() == 2  # two copies, each grouped with its original
    labels = np.asarray(features.labels)
    tested_twice = 0  # a/img_000.jpg and a/copy_of_000.jpg both on the test side: one test image
    for protocol in ("per-class:4", "fraction:0.5"):
        for seed in range(5):
            train, test = make_split(parse_protocol(protocol), labels, None, seed, groups=groups)
            assert not set(groups[train]) & set(groups[test]), (protocol, seed)
            once = len(set(zip(groups[test].tolist(), labels[test].tolist(), strict=True)))
            assert once == len(test)  # each image once per class it is filed under
            copy_tested = groups[0] in groups[test]
            assert len(train) + len(test) == len(groups) - copy_tested
            tested_twice += copy_tested
    assert tested_twice  # the seeds drew it on the test side at least once
    code, out, _ = cli(capsys, "fit", *data, *FIT, "--protocol", "per-class:4", "--seeds", "2",
                       "--runs-root", tmp_path / "runs")
    assert code == 0 and "2 group(s) of byte-identical images (4 images) in the file, 1 of them under two or more " \
        "classes (a wrong label or overlapping classes)" in out  # a/img_001.jpg is also b/copy_of_a001.jpg
    results = json.loads((tmp_path / "runs").rglob("results.json").__next__().read_text())
    assert results["duplicates"] == {"checked": True, "groups": 2, "images": 4, "mixed_labels": 1, "test_copies_once": 1}
    assert "1 test image(s) repeating another under its class, scored once (seed 0)" in out


def test_without_duplicates_the_splits_are_unchanged():
    labels = np.repeat(np.arange(4), 10)
    for protocol in ("per-class:3", "fraction:0.4"):
        plain = make_split(parse_protocol(protocol), labels, None, 3)
        grouped = make_split(parse_protocol(protocol), labels, None, 3, groups=np.arange(40))
        assert all((a == b).all() for a, b in zip(plain, grouped, strict=True))


def test_cross_validation_keeps_an_images_copies_in_one_fold():
    """Copies split across CV folds let a memorising head score well on labels it cannot learn, so
    the CV picked the weakest regularisation (on ants/bees with half the training photos filed
    twice: C=100 for block7, 6 points below the clean folder's 81.7)."""
    rng = np.random.default_rng(0)
    X0, y0 = rng.normal(size=(60, 40)), rng.integers(0, 2, 60)  # labels no feature explains
    X, y, copies = np.vstack([X0, X0]), np.concatenate([y0, y0]), np.tile(np.arange(60), 2)
    for fold_train, fold_val in training_folds(y, 3, random_state=0, copies=copies):
        assert not set(copies[fold_train]) & set(copies[fold_val])
    head = LogisticRegression(max_iter=2000)
    leaky = SelectedClassifier(head, grid=[1e-4, 1e4]).fit(X, y)
    kept = SelectedClassifier(head, grid=[1e-4, 1e4]).fit(X, y, copies=copies)
    assert leaky.cv_scores_[1] > 0.75 and leaky.chosen_ == 1e4  # the copies recognised, not classified
    assert kept.cv_scores_.max() < 0.7 and kept.selection_ == "3-fold CV (copies of an image in one fold)"
    # without copies (or with none repeated) the folds are StratifiedKFold's, as before
    plain = SelectedClassifier(head, grid=[1e-4, 1e4]).fit(X0, y0, copies=np.arange(60))
    assert plain.selection_ == "3-fold CV"
    assert np.allclose(plain.cv_scores_, SelectedClassifier(head, grid=[1e-4, 1e4]).fit(X0, y0).cv_scores_)
    assert all((a == b).all() for fa, fb in zip(training_folds(y0, 3, random_state=1, copies=np.arange(60)),
                                                 StratifiedKFold(3, shuffle=True, random_state=1).split(X0, y0),
                                                 strict=True) for a, b in zip(fa, fb, strict=True))


def test_a_fit_over_copies_says_its_folds_kept_them_together(copies, tmp_path, capsys):
    data = ["--dataset", f"folder:{copies}", *TINY, "--features-root", tmp_path / "fs"]
    assert cli(capsys, "extract", *data, *QUIET, "--taps", "layer3,layer4,avgpool")[0] == 0
    fit = ["fit", *data, "--clf", "logreg", "--device", "cpu", "--protocol", "fraction:0.5", "--tap", "auto",
           "--calibrate", "--runs-root", tmp_path / "runs"]
    code, out, err = cli(capsys, *fit)
    assert code == 0, err
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["settings"]["cv_copies"] == "one fold"  # a run from before the folds kept them is not reused
    assert results["per_seed"][0]["selection"].endswith("(copies of an image in one fold)")
    code, out, _ = cli(capsys, *fit)
    assert code == 0 and "reused" in out


def test_near_copies_are_found_whatever_the_scale_and_only_they():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 64)).astype(np.float32)
    train, test = np.arange(200), np.arange(200, 300)
    X[[210, 250]] = X[[3, 120]] + rng.normal(0, 0.01, (2, 64))  # two test images all but training ones
    for scaled in (X, 1000 * X + 50):  # scale-free: the tap's own nearest-neighbour distances are the yardstick
        rows, partners = near_copies(scaled, train, test)
        assert rows.tolist() == [210, 250] and partners.tolist() == [3, 120]
    groups = {"a": (0, 32), "b": (32, 64)}
    fused = np.hstack([X[:, :32], 1e6 * rng.normal(size=(300, 32)).astype(np.float32)])  # a loud tap of noise
    assert near_copies(fused, train, test, groups=groups)[0].size == 0  # each tap weighs alike: not a copy
    fused[:, 32:][[210, 250]] = fused[:, 32:][[3, 120]]
    assert near_copies(fused, train, test, groups=groups)[0].tolist() == [210, 250]


def test_a_fit_names_test_images_with_a_near_copy_in_training(tmp_path, scene_folder, capsys):
    """A copy with other bytes (re-encoded, or filed under another class too) escapes the digests;
    the fit names it and its accuracy without it."""
    root = tmp_path / "split"
    scene_folder(root / "train", per_class=8, seed=1)
    scene_folder(root / "val", per_class=4, seed=2)
    Image.open(root / "train" / "red" / "img_000.jpg").save(root / "val" / "red" / "resaved.png")
    Image.open(root / "train" / "green" / "img_001.jpg").save(root / "val" / "blue" / "mislabelled.jpg", quality=70)
    data = ["--dataset", f"folder:{root}", *TINY, "--features-root", tmp_path / "fs"]
    assert cli(capsys, "extract", *data, *QUIET, "--taps", "layer3,avgpool")[0] == 0
    for tap in ("avgpool", "layer3+avgpool"):
        code, out, _ = cli(capsys, "fit", *data, *FIT, "--tap", tap, "--runs-root", tmp_path / "runs")
        assert code == 0 and f"2 test image(s) (seed 0) have a near-copy in training by {tap} (" in out
        assert "1 of them filed under another class, e.g. val/blue/mislabelled.jpg ~ train/green/img_001.jpg" in out
        assert "without them" in out
        near = json.loads(next((tmp_path / "runs").rglob(f"*__{tap}__*/results.json")).read_text())["near_copies"]
        assert near["test_images"] == 2 and near["across_classes"] == 1
        assert sorted(near["examples"]) == [["val/blue/mislabelled.jpg", "train/green/img_001.jpg"],
                                            ["val/red/resaved.png", "train/red/img_000.jpg"]]
    code, out, _ = cli(capsys, "compare", *data, *QUIET, "--taps", "layer3,avgpool", "--clf", "knn,logreg",
                       "--runs-root", tmp_path / "runs")  # the notes of the best row, whose tap it names
    best = next(r for r in json.loads(next((tmp_path / "runs").rglob("compare.json")).read_text())["rows"]
                if r["best"])
    assert code == 0 and f"have a near-copy in training by {best['tap']} (" in out
    assert f"(with: {100 * best['metrics']['mean_per_class_accuracy']['mean']:.1f})" in out  # its score, 1 seed
    h5 = next((tmp_path / "fs").rglob("*.h5"))
    code, out, _ = cli(capsys, "info", h5, "--copies", "avgpool")  # the whole dataset's, to clean it
    assert code == 0 and "0 group(s) of byte-identical images, 2 pair(s) of near-copies by avgpool" in out
    assert re.search(r"train/green/img_001\.jpg ~ \(0\.\d{3}\) val/blue/mislabelled\.jpg  \[classes blue, green\]", out)
    assert re.search(r"train/red/img_000\.jpg ~ \(0\.\d{3}\) val/red/resaved\.png\n", out)


def test_info_lists_byte_identical_images_and_their_classes(copies, tmp_path, capsys):
    fs = tmp_path / "fs"
    assert cli(capsys, "extract", "--dataset", f"folder:{copies}", *TINY, *QUIET, "--features-root", fs)[0] == 0
    h5 = next(fs.rglob("*.h5"))
    assert sorted(map(tuple, (c["ids"] for c in api_copies(h5)))) == [("a/copy_of_000.jpg", "a/img_000.jpg"),
                                                                     ("a/img_001.jpg", "b/copy_of_a001.jpg")]
    code, out, _ = cli(capsys, "info", h5, "--copies")
    assert code == 0 and "copies: 2 group(s) of byte-identical images, 1 under two or more classes" in out
    assert "  a/copy_of_000.jpg = a/img_000.jpg\n" in out and "a/img_001.jpg = b/copy_of_a001.jpg  [classes a, b]" in out


def test_a_split_without_copies_has_no_near_copies(tiny_folder, tmp_path, capsys):
    data = ["--dataset", f"folder:{tiny_folder}", *TINY, "--features-root", tmp_path / "fs"]
    assert cli(capsys, "extract", *data, *QUIET)[0] == 0
    code, out, _ = cli(capsys, "fit", *data, *FIT, "--runs-root", tmp_path / "runs")
    assert code == 0 and "near-copy" not in out
    near = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())["near_copies"]
    assert near == {"checked": True, "ratio": 0.1, "test_images": 0, "across_classes": 0, "examples": []}


def test_official_split_drops_test_images_whose_bytes_are_in_training(tmp_path, image_folder, capsys):
    root = tmp_path / "split"
    image_folder(root / "train", classes=("a", "b"), per_class=6, seed=1)
    image_folder(root / "val", classes=("a", "b"), per_class=3, seed=2)
    shutil.copy(root / "train" / "a" / "img_000.jpg", root / "val" / "a" / "leak.jpg")
    shutil.copy(root / "val" / "b" / "img_000.jpg", root / "val" / "b" / "again.jpg")  # tested once, not twice
    fs = tmp_path / "fs"
    assert cli(capsys, "extract", "--dataset", f"folder:{root}", *TINY, *QUIET, "--features-root", fs)[0] == 0
    features = FeatureFile(next(fs.rglob("*.h5")))
    train, test = make_split(parse_protocol("official"), features.labels, features.split, 0,
                             groups=features.duplicate_groups())
    assert len(train) == 12 and len(test) == 6 and "val/a/leak.jpg" not in [features.ids[i] for i in test]
    assert sum(features.ids[i] in ("val/b/again.jpg", "val/b/img_000.jpg") for i in test) == 1
    code, out, _ = cli(capsys, "fit", "--dataset", f"folder:{root}", *TINY, *FIT, "--features-root", fs,
                       "--runs-root", tmp_path / "runs")  # the fit says how many test images it left out
    assert code == 0 and "1 test image(s) left out: their bytes are also in training" in out
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["duplicates"] == {"checked": True, "groups": 2, "images": 4, "mixed_labels": 0,
                                     "test_copies_dropped": 1, "test_copies_once": 1}


def test_a_rerun_with_other_settings_is_refused_and_auto_keeps_the_files_settings(tiny_flat, tmp_path, capsys):
    fs = tmp_path / "fs"
    data = ["--dataset", f"folder:{tiny_flat}", *TINY, "--features-root", fs, *QUIET]
    assert cli(capsys, "extract", *data, "--taps", "layer1", "--decode", "pil")[0] == 0
    code, _, err = cli(capsys, "extract", *data, "--taps", "layer1", "--decode", "simplejpeg")
    assert code == 1 and err.count("\n") == 1
    assert "tap layer1 in" in err and "was made with decode pil, but this run resolves to decode simplejpeg; " \
        "rerun with --decode pil to use it, or pass --force" in err
    code, out, _ = cli(capsys, "extract", *data, "--taps", "layer1,layer2")  # auto adopts pil
    assert code == 0 and "reused layer1" in out
    assert FeatureFile(out.strip().splitlines()[-1]).taps["layer2"].decode == "pil"
    # a tap added with another decoder on purpose is kept, but not fused with the others
    assert cli(capsys, "extract", *data, "--taps", "layer3", "--decode", "simplejpeg")[0] == 0
    code, _, err = cli(capsys, "fit", *data[:-len(QUIET)], *FIT, "--tap", "layer1+layer3",
                       "--protocol", "per-class:5", "--runs-root", tmp_path / "runs")
    # the precision is auto's choice on this CPU (fp32, or bf16 where it has bf16 kernels)
    assert code == 2 and re.search(r"were made differently \(layer1: precision (fp32|bf16), decode pil, runtime torch; "
                                   r"layer3: precision \1, decode simplejpeg", err), err
    assert not (tmp_path / "runs").exists()


def test_an_edit_that_keeps_the_size_is_detected(tiny_flat, tmp_path, capsys):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_flat, data_dir)
    common = ["--dataset", f"folder:{data_dir}", *TINY, "--features-root", tmp_path / "fs"]
    fit = ["fit", *common, *FIT, "--protocol", "per-class:5", "--runs-root", tmp_path / "runs"]
    assert cli(capsys, "extract", *common, *QUIET)[0] == 0
    assert cli(capsys, *fit)[0] == 0
    target = data_dir / "square" / "img_001.jpg"
    before = target.stat()
    edited = bytearray(target.read_bytes())
    edited[-10] ^= 0xFF  # same size, other bytes
    target.write_bytes(bytes(edited))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert target.stat().st_size == before.st_size
    code, _, err = cli(capsys, *fit)
    assert code == 1 and "was made from other contents of the dataset" in err
    # --verify-content compares bytes and names the image, even where the times were put back
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert cli(capsys, *fit)[0] == 0  # sizes and times as recorded: the fingerprint cannot tell
    code, _, err = cli(capsys, *fit, "--verify-content")
    assert code == 1 and "1 image(s) changed since (first: square/img_001.jpg)" in err


def test_a_stale_file_names_what_changed_and_new_file_times_alone_keep_it(tmp_path, image_folder, capsys):
    image_folder(tmp_path / "images", classes=("a", "b"), per_class=6)
    table = tmp_path / "labels.csv"
    rows = [f"{c}/img_{i:03d}.jpg,{c}" for c in "ab" for i in range(6)]
    table.write_text("path,label\n" + "\n".join(rows) + "\n")
    common = ["--dataset", f"csv:{table}", *TINY, "--features-root", tmp_path / "fs"]
    fit = ["fit", *common, *FIT, "--protocol", "per-class:3", "--runs-root", tmp_path / "runs"]
    assert cli(capsys, "extract", *common, *QUIET)[0] == 0
    assert cli(capsys, *fit)[0] == 0

    def refused(edited_rows) -> str:
        table.write_text("path,label\n" + "\n".join(edited_rows) + "\n")
        code, _, err = cli(capsys, *fit)
        assert code == 1 and err.count("\n") == 1, err
        return err

    assert "other contents of the dataset: 1 image(s) relabelled (first: images/a/img_002.jpg, a -> b);" in \
        refused([r.replace("2.jpg,a", "2.jpg,b") for r in rows])
    assert "made from 12 samples, the dataset now has 11: 1 image(s) removed (first: images/b/img_005.jpg);" in \
        refused(rows[:-1])
    assert "the same images in another order" in refused(rows[::-1])
    table.write_text("path,label\n" + "\n".join(rows) + "\n")
    # A copy that did not keep the files' times is the same data: the bytes are compared, and it is used.
    for image in (tmp_path / "images").rglob("*.jpg"):
        os.utime(image, ns=(10**18, 10**18))
    with pytest.warns(UserWarning, match=r"other modification times .* but the same bytes \(all 12 compared\)"):
        code, out, _ = cli(capsys, *fit)
    assert code == 0 and out.startswith("reused logreg")  # the same file, so the same run
    with pytest.warns(UserWarning, match="the same bytes"):
        assert cli(capsys, "extract", *common, *QUIET, "--taps", "layer1")[0] == 0  # and extended
    target = tmp_path / "images" / "b" / "img_003.jpg"
    target.write_bytes(target.read_bytes()[:-2] + b"\0\0")
    code, _, err = cli(capsys, *fit)
    assert code == 1 and "1 image(s) changed since (first: images/b/img_003.jpg)" in err


def test_files_with_an_older_fingerprint_version_keep_working(tiny_flat, tmp_path, capsys):
    import h5py

    common = ["--dataset", f"folder:{tiny_flat}", *TINY, "--features-root", tmp_path / "fs"]
    assert cli(capsys, "extract", *common, *QUIET)[0] == 0
    path = next((tmp_path / "fs").rglob("*.h5"))
    with h5py.File(path, "r+") as h5:  # as files before fingerprint versions were recorded: sizes only
        del h5.attrs["fingerprint_version"]
        h5.attrs["dataset_fingerprint"] = load_dataset(f"folder:{tiny_flat}").fingerprint(1)
    assert FeatureFile(path).fingerprint_version == 1
    code, out, err = cli(capsys, "fit", *common, *FIT, "--protocol", "per-class:5", "--runs-root", tmp_path / "runs")
    assert code == 0, err
    assert cli(capsys, "extract", *common, *QUIET, "--taps", "layer2")[0] == 0  # and extend


def test_auto_protocol_on_a_train_only_subset_falls_back_and_says_so():
    with pytest.warns(UserWarning, match=r"split has only train \(no train and test sides\), so it uses fraction:0.5"):
        assert str(parse_protocol("auto", has_split=["train"] * 5)) == "fraction:0.5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert str(parse_protocol("auto", has_split=["train", "test"])) == "official"


def test_a_subset_larger_than_a_split_says_it_was_capped(tiny_folder):
    with pytest.warns(UserWarning, match=r"--subset asks for 9999 samples of split 'train' of .*, which has 18; "
                                         r"using all 18"):
        images = load_dataset(f"folder:{tiny_folder}", subset_spec="train:9999,val:2")
    assert len(images) == 20


def test_knn_records_the_k_it_used_and_refuses_fractions(tiny_flat, tmp_path, capsys):
    common = ["--dataset", f"folder:{tiny_flat}", *TINY, "--features-root", tmp_path / "fs"]
    assert cli(capsys, "extract", *common, *QUIET)[0] == 0
    code, out, err = cli(capsys, "fit", *common, "--clf", "knn", "--grid", "1000", "--device", "cpu",
                         "--protocol", "per-class:5", "--runs-root", tmp_path / "runs")
    assert code == 0, err
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["chosen"]["n_neighbors"] == [15.0]  # 3 classes x 5 training images
    code, _, err = cli(capsys, "fit", *common, "--clf", "knn", "--grid", "2.5", "--runs-root", tmp_path / "runs")
    assert code == 2 and "--grid for knn is n_neighbors, a whole number, not 2.5" in err


def test_an_interval_that_touches_zero_never_prints_minus_zero():
    row = {"backbone": "b", "clf": "logreg", "tap": "t", "taps": "t", "dim": 3, "pooling": "avg", "fit_seconds": 1,
           "accuracy_mean": 0.5, "accuracy_std": 0, "mean_per_class_accuracy_mean": 0.5,
           "mean_per_class_accuracy_std": 0, "vs_best": -0.012, "vs_best_low": -0.031, "vs_best_high": -0.0,
           "best": False, "tied": True}
    table = format_table([row], 1)
    assert "-1.2 [-3.1, 0.0]" in table and "-0.0" not in table
    row.update(vs_best_high=-0.0004, tied=False)
    assert "[-3.1, -0.04]" in format_table([row], 1)


@pytest.mark.slow
def test_output_into_a_closed_pipe_ends_quietly():
    taps = shutil.which("taps", path=os.path.dirname(sys.executable))
    proc = subprocess.Popen([taps, "list", "nodes", "vgg16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader went away, as `| head -1` does
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == b""


def test_a_full_disk_while_writing_a_run_leaves_no_run(tiny_flat, tmp_path, capsys, monkeypatch):
    import errno

    common = ["--dataset", f"folder:{tiny_flat}", *TINY, "--features-root", tmp_path / "fs"]
    assert cli(capsys, "extract", *common, *QUIET)[0] == 0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full)
    code, _, err = cli(capsys, "fit", *common, *FIT, "--protocol", "per-class:5", "--runs-root", tmp_path / "runs")
    assert code == 1 and err.count("\n") == 1 and "disk full while writing the run" in err
    assert "nothing of this run was kept" in err
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]


def test_fingerprint_versions_differ_only_in_what_stands_for_content(tiny_flat):
    images = load_dataset(f"folder:{tiny_flat}")
    prints = {v: images.fingerprint(v) for v in (1, 2, 3)}
    assert len(set(prints.values())) == 3 and images.fingerprint() == prints[2]
    with pytest.raises(TapsError, match="fingerprint version 9 is newer than this taps knows"):
        images.fingerprint(9)


def test_seeds_over_an_official_split_say_what_varies(tiny_folder, tmp_path, capsys):
    common = ["--dataset", f"folder:{tiny_folder}", *TINY, "--features-root", tmp_path / "fs"]
    assert cli(capsys, "extract", *common, *QUIET)[0] == 0
    code, out, _ = cli(capsys, "fit", *common, "--clf", "logreg", "--grid", "0.1,1", "--device", "cpu",
                       "--seeds", "2", "--runs-root", tmp_path / "runs")
    assert code == 0 and "note: ± over 2 seeds varies the CV folds only: the official split is the same" in out
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["seeds_vary"].startswith("the CV folds only")
    assert len({s["test_digest"] for s in results["per_seed"]}) == 1  # the same test rows for every seed


def test_tap_lists_sort_numbers_as_numbers():
    from features.store import natural_key

    assert sorted(["block10", "block2", "pooled", "block1", "block0"], key=natural_key) == \
        ["block0", "block1", "block2", "block10", "pooled"]


def test_a_folder_linking_one_file_twice_is_refused_or_kept_once(tmp_path, image_folder):
    root = tmp_path / "linked"
    image_folder(root, classes=("a", "b"), per_class=3)
    (root / "b" / "same_as_a0.jpg").symlink_to(root / "a" / "img_000.jpg")
    with pytest.raises(UsageError, match=r"links 1 image file\(s\) more than once .*a/img_000\.jpg, b/same_as_a0\.jpg"):
        load_dataset(f"folder:{root}")
    with pytest.warns(UserWarning, match="kept the first of 2 occurrences"):
        images = load_dataset(f"folder:{root}", duplicates="first")
    assert len(images) == 6 and "b/same_as_a0.jpg" not in images.ids


def _turned_photos(root, photo, image_folder):
    """Class ``phone``: a photo stored sideways with EXIF orientation 6 as PNG and JPEG, the same pixels as
    stored without the tag, and the picture a viewer shows (upright) without a tag; class ``other``: three
    images. Returns the upright pixels."""
    stored, tag = photo(56, 40, seed=7), Image.Exif()
    tag[0x0112] = 6  # a viewer turns it 90 degrees clockwise: a phone held upright
    (root / "phone").mkdir(parents=True)
    stored.save(root / "phone" / "stored.png")
    stored.save(root / "phone" / "turned.png", exif=tag)
    stored.save(root / "phone" / "turned.jpg", exif=tag, quality=95)
    upright = ImageOps.exif_transpose(Image.open(root / "phone" / "turned.png"))
    assert upright.size == (40, 56)  # the reference turn is PIL's, not taps'
    upright.save(root / "phone" / "upright.png")
    image_folder(root, classes=("other",), per_class=3)
    return np.asarray(upright)


@pytest.mark.parametrize("decode", ["simplejpeg", "pil", "torchvision"])
def test_photos_are_turned_as_their_exif_orientation_says(tmp_path, photo, image_folder, cpu_run, decode):
    """Every decoder sees a phone's sideways-stored photo as its viewer shows it, not as stored."""
    _turned_photos(tmp_path / "set", photo, image_folder)
    images = load_dataset(f"folder:{tmp_path / 'set'}")
    assert [images.ids[i] for i in images.turned()] == ["phone/turned.jpg", "phone/turned.png"]
    done = extract(images, Backbone("resnet18", weights="none", image_size=32), ["avgpool"], out=tmp_path / "f",
                   **cpu_run(decode=decode))
    f = FeatureFile(done.path)
    row = {i: f.read("avgpool")[f.ids.index(i)] for i in f.ids if i.startswith("phone/")}
    assert f.taps["avgpool"].orientation == "exif"
    assert np.array_equal(row["phone/turned.png"], row["phone/upright.png"])  # lossless: the same pixels
    sideways = np.linalg.norm(row["phone/stored.png"] - row["phone/upright.png"])
    assert np.linalg.norm(row["phone/turned.jpg"] - row["phone/upright.png"]) < 0.25 * sideways


def test_a_file_made_before_orientation_was_applied_is_refused_only_where_it_matters(tmp_path, photo, image_folder,
                                                                                      cpu_run, capsys):
    """Taps that hold turned photos as stored are not reused, added to or fitted on as if turned; a dataset
    without turned photos reuses them as before, and records that they hold what turning gives."""
    _turned_photos(tmp_path / "set", photo, image_folder)
    image_folder(tmp_path / "plain", classes=("a", "b"), per_class=3)
    net, run = Backbone("resnet18", weights="none", image_size=32), cpu_run()
    for name in ("set", "plain"):
        images = load_dataset(f"folder:{tmp_path / name}")
        done = extract(images, net, ["avgpool"], out=tmp_path / "f", **run)
        with h5py.File(done.path, "r+") as h5:  # as taps wrote it before it recorded the orientation
            del h5["taps/avgpool"].attrs["orientation"]
        assert FeatureFile(done.path).taps["avgpool"].orientation == "stored"
        if name == "plain":  # reused; its rows are what turning gives, which the file now records
            assert extract(images, net, ["avgpool"], out=tmp_path / "f", **run).reused == ["avgpool"]
            assert FeatureFile(done.path).taps["avgpool"].orientation == "exif"
            continue
        for taps in (["avgpool"], ["layer4"]):  # reused, or a tap added beside it
            with pytest.raises(TapsError, match=r"before taps turned images by their EXIF orientation, and 2 of these "
                                                r"images carry one .*pass --force"):
                extract(images, net, taps, out=tmp_path / "f", **run)
        code, _, err = cli(capsys, "fit", "--dataset", f"folder:{tmp_path / name}", *TINY, "--features-root",
                           tmp_path / "f", *FIT, "--runs-root", tmp_path / "runs")
        assert code == 1 and "2 of these images carry one (e.g. phone/turned.jpg)" in err and \
            "rebuild it with `taps extract --dataset folder:" in err and not (tmp_path / "runs").exists()
        rebuilt = extract(images, net, ["avgpool"], out=tmp_path / "f", force=True, **run)
        assert FeatureFile(rebuilt.path).taps["avgpool"].orientation == "exif"


def test_every_photo_in_a_class_folder_is_read_or_named(tmp_path, photo, image_folder, cpu_run):
    """Photos saved as .jfif (a browser's JPEG on Windows), AVIF or a phone's HEIC are read; other files in
    class folders are counted by extension in a warning instead of vanishing without a word."""
    import pillow_heif

    image_folder(tmp_path / "set", classes=("a", "b"), per_class=3)
    photo(48, 40, seed=1).save(tmp_path / "set" / "a" / "web.jfif", format="JPEG")
    pillow_heif.from_pillow(photo(48, 40, seed=2)).save(tmp_path / "set" / "a" / "phone.heic")
    photo(48, 40, seed=3).save(tmp_path / "set" / "b" / "shot.avif")
    for name in ("notes.txt", "scan.xyz", "Thumbs.db", ".hidden.txt"):
        (tmp_path / "set" / "b" / name).write_text("not an image")
    photo(48, 40, seed=4).save(tmp_path / "set" / "unsorted.jpg")  # beside the class folders: in no class
    (tmp_path / "set" / "README.txt").write_text("a dataset's notes")
    with pytest.warns(UserWarning) as caught:
        images = load_dataset(f"folder:{tmp_path / 'set'}")
    said = [str(w.message) for w in caught]
    assert any(re.match(r"2 file\(s\) in the class folders of .* are not images by their extension and are left out "
                        r"\(\.txt 1, \.xyz 1, e\.g\. notes\.txt\)", m) for m in said), said
    assert any(m.endswith(": 1 image(s) lie outside every class folder and are left out (e.g. unsorted.jpg); move "
                          "each into its class's folder") for m in said), said
    assert {"a/web.jfif", "a/phone.heic", "b/shot.avif"} <= set(images.ids) and len(images) == 9
    done = extract(images, Backbone("resnet18", weights="none", image_size=32), ["avgpool"], out=tmp_path / "f",
                   **cpu_run())
    assert done.skipped == {}
    # without pillow-heif, a HEIC photo is skipped with the reason and the fix, not dropped unsaid
    code = ("import sys; sys.modules['pillow_heif'] = None\n"
            "from features.datasets import BadImage, open_image\n"
            f"try:\n    open_image({str(tmp_path / 'set' / 'a' / 'phone.heic')!r})\n"
            "except BadImage as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "a HEIC/HEIF image, which needs pillow-heif: pip install 'taps[heif]'"


def test_torchvision_datasets_record_their_images_as_stored(tmp_path, cpu_run):
    """torchvision's own loaders do not turn photos by their EXIF orientation, and taps reads those datasets
    through them: their taps say so (not `exif`), and a rerun reuses them as they are."""
    from torchvision.datasets import FakeData

    from features.datasets import TorchvisionImageSet

    images = TorchvisionImageSet("fake", [("train", FakeData(12, (3, 32, 32), 2, random_offset=0))], ["a", "b"])
    net, run = Backbone("resnet18", weights="none", image_size=32), cpu_run()
    done = extract(images, net, ["avgpool"], out=tmp_path, **run)
    assert FeatureFile(done.path).taps["avgpool"].orientation == "stored"
    assert extract(images, net, ["avgpool"], out=tmp_path, **run).reused == ["avgpool"]
    assert FeatureFile(done.path).taps["avgpool"].orientation == "stored"


def test_predict_decodes_photos_as_the_runs_training_images_were(tmp_path, photo, image_folder, capsys):
    """A run made now turns a sideways-stored photo as its training images were turned; a run from before
    taps turned them (its results.json records no orientation) sees it as stored, as its features did."""
    from pipeline.predict import Predictor

    _turned_photos(tmp_path / "set", photo, image_folder)
    common = ["--dataset", f"folder:{tmp_path / 'set'}", *TINY, "--features-root", tmp_path / "fs"]
    assert cli(capsys, "extract", *common, *QUIET)[0] == 0
    assert cli(capsys, "fit", *common, *FIT, "--protocol", "fraction:0.5", "--runs-root", tmp_path / "runs")[0] == 0
    run = next((tmp_path / "runs").rglob("results.json")).parent
    phone = {name: str(tmp_path / "set" / "phone" / name) for name in ("turned.png", "upright.png", "stored.png")}

    def probabilities(image: str) -> list:
        (p,) = Predictor(run, device="cpu", top_k=2).predict([image])
        return sorted(p.top)

    assert probabilities(phone["turned.png"]) == probabilities(phone["upright.png"]) != \
        probabilities(phone["stored.png"])
    recorded = json.loads((run / "results.json").read_text())
    assert [t["orientation"] for t in recorded["features"]["taps"]] == ["exif"]
    for tap in recorded["features"]["taps"]:  # as a run from before wrote it
        del tap["orientation"]
    (run / "results.json").write_text(json.dumps(recorded))
    assert probabilities(phone["turned.png"]) == probabilities(phone["stored.png"])
