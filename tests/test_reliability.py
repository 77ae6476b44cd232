"""Faults: bad images, interruption, corrupt or busy files, bad arguments, untrusted inputs."""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.backbones import Backbone
from features.datasets import folder_dataset, load_dataset
from features.errors import TapsError, UsageError
from features.extract import extract
from features.options import resolve_device
from features.store import FeatureFile, FeatureWriter
from pipeline.cli import main


def tiny_resnet():
    return Backbone("resnet18", weights="none", image_size=32)




@pytest.mark.slow
@pytest.mark.parametrize("loader", [{}, {"loader": "replicas", "workers": 2}], ids=["inline", "replicas"])
def test_bad_images_are_skipped_with_reasons_and_odd_ones_converted(messy, tmp_path, loader, cpu_run):
    RUN = cpu_run()
    images = folder_dataset(messy, max_pixels=1_000_000)
    assert len(images) == 8 + 6 + 4  # the .txt file is not a sample
    report = extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, **{**RUN, **loader})
    assert sorted(report.skipped) == ["bad/bomb.png", "bad/empty.jpg", "bad/notes.jpg", "bad/truncated.jpg"]
    assert report.skipped["bad/empty.jpg"] == "empty file" and "too large" in report.skipped["bad/bomb.png"]
    assert "truncated" in report.skipped["bad/truncated.jpg"].lower()
    f = FeatureFile(report.path)
    assert f.valid.sum() == 14 and f.errors == report.skipped and f.attrs["complete"]
    odd = [i for i, sid in enumerate(f.ids) if sid.startswith("odd/")]
    assert np.abs(f.read("avgpool")[odd]).sum(axis=1).min() > 0


def test_a_fit_says_how_many_images_were_undecodable_and_info_names_them(image_folder, tmp_path, capsys):
    """They are in no split: the scores are over the rest, and the reader is told so."""
    root = tmp_path / "photos"
    image_folder(root, classes=("a", "b"), per_class=5)
    whole = (root / "a" / "img_000.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "b" / "notes.jpg").write_text("this is not an image")
    data = ["--dataset", f"folder:{root}", "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
            "--features-root", str(tmp_path / "fs")]
    assert main(["extract", *data, "--no-progress", "--workers", "0"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    skipped = FeatureFile(path).errors
    assert sorted(skipped) == ["a/truncated.jpg", "b/notes.jpg"]
    assert main(["fit", *data, "--clf", "logreg", "--protocol", "fraction:0.5", "--device", "cpu",
                 "--runs-root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert f"note: {len(skipped)} image(s) could not be decoded at extraction and are in no split" in out
    results = json.loads((Path(out.strip().splitlines()[-1]) / "results.json").read_text())
    assert results["undecodable"] == len(skipped)
    assert sum(results["per_seed"][0][k] for k in ("n_train", "n_test")) == len(FeatureFile(path).ids) - len(skipped)
    assert main(["info", path]) == 0
    info = capsys.readouterr().out
    assert "skipped images: 2" in info and f"  a/truncated.jpg: {skipped['a/truncated.jpg']}" in info


def test_on_error_fail_stops_with_the_file_name(messy, tmp_path, cpu_run):
    RUN = cpu_run()
    images = folder_dataset(messy, max_pixels=1_000_000)
    with pytest.raises(TapsError, match=r"cannot decode bad/\w+\.\w+"):
        extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, on_error="fail", **RUN)


_EXTRACT_ARGS = ["extract", "--backbone", "resnet18", "--weights", "none", "--image-size", "64", "--taps",
                 "layer1,logits", "--batch-size", "4", "--workers", "2", "--precision", "fp32", "--device", "cpu",
                 "--no-progress"]

# Runs the real CLI, but each batch write pauses and the 10th announces itself on stderr, so the test can
# signal the process mid-run however fast this machine extracts.
_SLOWED_CLI = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started where SIGINT is ignored
from features.store import FeatureWriter
from pipeline.cli import main
write, calls = FeatureWriter.write, []
def slow_write(self, *args, **kwargs):
    write(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 10:
        print("ten batches written", file=sys.stderr, flush=True)
    time.sleep(0.05)
FeatureWriter.write = slow_write
sys.exit(main(sys.argv[1:]))
"""


def _extract_cmd(root: Path, out: Path, loader: str, slowed: bool = False) -> list[str]:
    launcher = ["-c", _SLOWED_CLI] if slowed else ["-m", "pipeline"]
    return [sys.executable, *launcher, *_EXTRACT_ARGS, "--loader", loader, "--dataset", f"folder:{root}",
            "--features-root", str(out)]


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (not gone, not zombies)."""
    alive = set()
    for p in pids:
        try:  # a process may exit between any two reads of /proc
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive




@pytest.mark.slow
@pytest.mark.parametrize(("sig", "loader"), [(signal.SIGKILL, "inline"), (signal.SIGINT, "inline"),
                                             (signal.SIGKILL, "replicas"), (signal.SIGINT, "replicas")])
def test_killed_extract_resumes_to_identical_arrays(long_set, tmp_path, sig, loader):
    clean = subprocess.run(_extract_cmd(long_set, tmp_path / "clean", loader), capture_output=True, text=True,
                           check=True)
    clean_path = Path(clean.stdout.strip().splitlines()[-1])
    out = tmp_path / "killed"
    # Its own process group, as a terminal's.
    proc = subprocess.Popen(_extract_cmd(long_set, out, loader, slowed=True), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    target = out / clean_path.parent.name / clean_path.name
    before = []
    while (line := proc.stderr.readline()) and line != "ten batches written\n":
        before.append(line)
    assert line, f"extract ended before ten batches were written: {''.join(before)}"
    helpers = _children(proc.pid)
    assert len(helpers) >= (2 if loader == "replicas" else 0)
    if sig == signal.SIGINT:  # Ctrl-C reaches the whole group
        os.killpg(proc.pid, sig)
    else:  # kill -9 (or the OOM killer) hits the main process alone: its replicas must notice
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "rerun the same command to resume" in err
        assert "Traceback" not in err  # the replicas ignore Ctrl-C: the parent stops them
    for _ in range(100):  # replicas notice a killed parent within a second
        if not _alive(helpers):
            break
        time.sleep(0.1)
    assert not _alive(helpers), "no process of the run may outlive it"
    with h5py.File(target) as h5:
        done = h5["taps/logits"].attrs["rows_done"]
        assert 0 < done < 360 and not h5.attrs["complete"], "the kill must land mid-run"
    resumed = subprocess.run(_extract_cmd(long_set, out, loader), capture_output=True, text=True, check=True)
    assert "extracted" in resumed.stdout and ("s of start-up" in resumed.stdout) == (loader == "replicas")
    a, b = FeatureFile(clean_path), FeatureFile(target)
    assert b.attrs["complete"]
    for tap in ("layer1", "logits"):
        assert np.array_equal(a.read(tap), b.read(tap))


@pytest.mark.slow
def test_a_dead_replica_stops_the_run_in_one_line_and_the_rerun_resumes(long_set, tmp_path):
    proc = subprocess.Popen(_extract_cmd(long_set, tmp_path, "replicas", slowed=True), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while (line := proc.stderr.readline()) and line != "ten batches written\n":
        pass
    replicas = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(replicas) == 2
    os.kill(replicas[0], signal.SIGKILL)  # as the OOM killer would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "a replica process died" in err and "Traceback" not in err
    resumed = subprocess.run(_extract_cmd(long_set, tmp_path, "replicas"), capture_output=True, text=True, check=True)
    extracted = next(line for line in resumed.stdout.splitlines() if line.startswith("extracted"))
    done = int(extracted.split(": ")[1].split(" images")[0])
    assert 0 < done < 360  # only what the first run had not written
    assert FeatureFile(resumed.stdout.strip().splitlines()[-1]).attrs["complete"]


def test_second_writer_is_refused_while_the_first_holds_the_lock(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    path = tmp_path / "busy.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from features.files import exclusive_lock\n"
                               f"with exclusive_lock({str(path)!r}):\n print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TapsError, match="another taps process is writing"):
            extract(images, tiny_resnet(), ["avgpool"], path=path, **RUN)
    finally:
        holder.kill()
        holder.wait()
    assert extract(images, tiny_resnet(), ["avgpool"], path=path, **RUN).computed == ["avgpool"]
    # the lock goes with its holder: no empty .lock file is left beside the finished file, even after
    # a holder was killed (its stale file is taken over, then removed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.h5"]


def test_a_cut_short_file_is_refused_by_readers_and_repaired_by_extract(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    report = extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, **RUN)
    clean = FeatureFile(report.path).read("avgpool")
    data = report.path.read_bytes()
    report.path.write_bytes(data[: len(data) // 3])
    with pytest.raises(TapsError, match="was cut short while it was written .* rerun the same `taps extract` "
                                        "command to repair it"):
        FeatureFile(report.path)
    with pytest.warns(UserWarning, match="rows of tap avgpool .* were not on disk intact"):
        again = extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, **RUN)
    assert again.computed == ["avgpool"] and np.array_equal(FeatureFile(report.path).read("avgpool"), clean)
    report.path.write_bytes(b"not an HDF5 file at all" * 100)
    with pytest.raises(TapsError, match="is not an HDF5 file; pass --force to replace it, or --features-root"):
        extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, **RUN)
    with pytest.raises(TapsError, match="is not an HDF5 file; pass a feature file that `taps extract` wrote"):
        FeatureFile(report.path)


def _file_size_limit(limit: int):
    """For a child process: writes past ``limit`` bytes fail with EFBIG, as on a full disk (not root-only)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_write_that_fails_mid_run_is_one_line_and_the_rerun_recomputes_what_did_not_reach_the_disk(
        long_set, tmp_path):
    """A real failed flush (the OS refuses the write), not a mocked one: HDF5's dirty cache must not
    reach the disk later (at close or exit, where it crashed the interpreter) and put a progress
    marker there without its data."""
    clean = subprocess.run(_extract_cmd(long_set, tmp_path / "clean", "inline"), capture_output=True, text=True,
                           check=True)
    clean_path = Path(clean.stdout.strip().splitlines()[-1])
    out = tmp_path / "full"
    target = out / clean_path.parent.name / clean_path.name
    # The logits tap is two HDF5 chunks of about 1 MB: the second one no longer fits.
    limit = clean_path.stat().st_size - 500_000
    failed = subprocess.run(_extract_cmd(long_set, out, "inline"), capture_output=True, text=True,
                            preexec_fn=_file_size_limit(limit))
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert f"could not write {target} (File too large); rerun the same command" in failed.stderr
    with pytest.raises(TapsError, match="was cut short while it was written .* rerun the same `taps extract` command "
                                        "to repair it"):
        FeatureFile(target)  # HDF5 had counted the bytes the OS refused
    resumed = subprocess.run(_extract_cmd(long_set, out, "inline"), capture_output=True, text=True, check=True)
    recomputed = int(resumed.stdout.split("for 360 samples: ")[1].split(" images")[0])
    assert 0 < recomputed < 360  # the blocks that reached the disk were kept
    a, b = FeatureFile(clean_path), FeatureFile(target)
    assert b.attrs["complete"] and np.array_equal(a.valid, b.valid)
    for tap in ("layer1", "logits"):
        assert np.array_equal(a.read(tap), b.read(tap))


def test_disk_full_is_one_line_and_resume_equals_an_uninterrupted_run(tiny_flat, tmp_path, monkeypatch, cpu_run):
    """ENOSPC at the third block's flush, with every later flush failing too until space is freed."""
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    clean = FeatureFile(extract(images, tiny_resnet(), ["layer1", "avgpool"], out=tmp_path / "clean", **RUN).path)
    real_flush, calls, full = h5py.File.flush, [], [True]

    def flush(self):
        calls.append(1)
        if full[0] and len(calls) >= 6:  # the creation and ensure flushes, then two per block
            raise RuntimeError("Unable to synchronously flush file (file write failed: time = Tue Dec  1 19:12:10 "
                               "2026\n, errno = 28, error message = 'No space left on device')")
        return real_flush(self)

    monkeypatch.setattr(h5py.File, "flush", flush)
    with pytest.raises(TapsError, match=r"^disk full while writing .*; free space and rerun the same command"):
        extract(images, tiny_resnet(), ["layer1", "avgpool"], out=tmp_path / "full", **RUN)
    full[0] = False
    report = extract(images, tiny_resnet(), ["layer1", "avgpool"], out=tmp_path / "full", **RUN)
    resumed = FeatureFile(report.path)
    assert report.images >= 30 - 8 and resumed.attrs["complete"]
    for tap in ("layer1", "avgpool"):
        X = resumed.read(tap)
        assert np.array_equal(X, clean.read(tap))
        assert np.abs(X[resumed.valid]).sum(axis=1).min() > 0  # no zero row is marked valid


@pytest.mark.slow
def test_a_block_whose_data_did_not_reach_the_disk_is_refused_then_recomputed(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    report = extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, **RUN)
    clean = FeatureFile(report.path).read("avgpool")
    with h5py.File(report.path, "r+") as h5:  # as a lost write leaves it: the marker says done, the data is fill
        h5["taps/avgpool"][8:12] = 0.0
    with pytest.raises(TapsError, match=r"tap avgpool in .*: rows 8-11 are not what was written .* rerun the same "
                                        r"`taps extract` command to recompute them"):
        FeatureFile(report.path).read("avgpool")
    fit = subprocess.run([sys.executable, "-m", "pipeline", "fit", "--features", str(report.path), "--tap", "avgpool",
                          "--protocol", "per-class:5", "--runs-root", str(tmp_path / "runs")], capture_output=True, text=True)
    assert fit.returncode == 1 and "rows 8-11 are not what was written" in fit.stderr
    assert fit.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()
    with pytest.warns(UserWarning, match="22 rows of tap avgpool .* were not on disk intact"):
        again = extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, **RUN)
    assert again.computed == ["avgpool"] and again.images == 30 - 8
    assert np.array_equal(FeatureFile(report.path).read("avgpool"), clean)


def test_a_disk_too_small_for_the_new_taps_is_refused_before_any_work(tiny_flat, tmp_path, monkeypatch, cpu_run):
    RUN = cpu_run()
    import shutil

    images = load_dataset(f"folder:{tiny_flat}")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 ** 9, used=10 ** 9 - 1000, free=1000))
    with pytest.raises(TapsError, match=r"not enough disk space for the new taps of .*: about 0\.1 MiB needed, "
                                        r"0\.0 MiB free in .*; free space or write to another disk \(--features-root, --runs-root\)"):
        extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, **RUN)
    with h5py.File(next(tmp_path.rglob("*.h5"))) as h5:
        assert list(h5["taps"]) == []  # nothing was computed or allocated


def test_environment_errors_are_usage_errors(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no class subfolders"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(UsageError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'empty'}")


def test_nan_features_and_single_class_training_are_reported(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run()
    from pipeline.evaluate import fit_run
    from pipeline.options import FitOptions
    from pipeline.protocols import parse_protocol

    images = load_dataset(f"folder:{tiny_flat}")
    report = extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, **RUN)
    X = FeatureFile(report.path).read("avgpool")
    X[3, 0], X[7, 1] = np.nan, np.inf
    writer = FeatureWriter(report.path, {}, None, None, None, None)  # rewritten through the store, checksums too
    for lo in range(0, 30, 4):
        writer.write(lo, min(lo + 4, 30), {"avgpool": X[lo:lo + 4]}, {})
    writer.finish(["avgpool"])
    writer.close()
    with pytest.raises(TapsError, match="tap avgpool .* 2 rows with NaN or inf"):
        fit_run(FeatureFile(report.path), "avgpool", "avg", FitOptions(device="cpu"), parse_protocol("per-class:5"),
                runs_root=tmp_path / "runs")


def test_weights_files_load_with_weights_only(tmp_path):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    bb = Backbone("resnet18", weights=str(path))
    with pytest.raises(UsageError, match=r"evil.pth holds more than tensors .* weights_only=True, which refuses code"):
        bb.build()


# ---------------------------------------------------------------- the store, property-based

def _rows(start: int, stop: int, dim: int) -> np.ndarray:
    i = np.arange(start, stop, dtype=np.float32)[:, None]
    return np.sin(i * np.arange(1, dim + 1, dtype=np.float32))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 9),
       runs=st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=0, max_size=6))
def test_interrupted_writes_always_end_in_the_clean_arrays(tmp_path_factory, n, batch, runs):
    """Runs of a few batches each, some torn (data written, progress not), then a final run to the end."""
    path = tmp_path_factory.mktemp("prop") / "f.h5"
    dim = 3
    header = {"backbone": "b", "weights": "w", "transform": "t", "dataset": "d", "dataset_fingerprint": "x",
              "n_samples": n, "batch_size": batch, "image_size": 8}

    def open_writer():
        w = FeatureWriter(path, header, np.zeros(n, int), ["c"], [str(i) for i in range(n)], None)
        w.ensure_tap("t", dim, {"tap": "t", "node": "t", "pooling": "none", "precision": "fp32"})
        return w

    for batches, torn in runs + [(10 ** 6, False)]:
        w = open_writer()
        start = w.rows_done("t")
        for k in range(batches):
            lo = start + k * batch
            if lo >= n:
                break
            hi = min(lo + batch, n)
            if torn and k == batches - 1:
                w.h5["taps/t"][lo:hi] = _rows(lo, hi, dim)  # killed before rows_done moved
                break
            w.write(lo, hi, {"t": _rows(lo, hi, dim)}, {})
        w.finish(["t"])
        w.close()
    f = FeatureFile(path)
    assert f.attrs["complete"]
    assert np.array_equal(f.read("t"), _rows(0, n, dim))


def test_unwritable_output_is_a_usage_error(tiny_flat, tmp_path, monkeypatch, cpu_run):
    """Root ignores file modes, so the refusal is simulated where the writer opens the file."""
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(FeatureWriter, "__init__", denied)
    with pytest.raises(UsageError, match="cannot write .* pass --features-root to a writable folder"):
        extract(images, tiny_resnet(), ["avgpool"], out=tmp_path, **RUN)
