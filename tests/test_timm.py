"""timm backbones (``--backbone timm:NAME``), offline: random or file weights, checked against
torchvision's implementation of the same network."""

import json
import os
import subprocess
import sys

import pytest
import timm  # the optional extra taps[timm]; `make install` installs it
import torch

from features.backbones import Backbone
from features.errors import UsageError
from features.forward import build_extractor
from pipeline.cli import main


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_resnet18_with_torchvision_weights_gives_torchvision_embeddings(torchvision_resnet18_file, suffix):
    tv, folder = torchvision_resnet18_file
    tm = Backbone("timm:resnet18", weights=str(folder / f"resnet18{suffix}"), image_size=64)
    x = torch.randn(3, 3, 64, 64)  # float input: the same normalised tensor reaches both graphs
    pairs = {"layer1": "stage2", "layer2": "stage3", "layer3": "stage4", "layer4": "stage5", "avgpool": "pooled"}
    for pooling in ("avg", "avgmax", "pyramid"):
        a = build_extractor(tv, [tv.tap(t) for t in pairs], torch.device("cpu"), pooling=pooling)(x)
        b = build_extractor(tm, [tm.tap(t) for t in pairs.values()], torch.device("cpu"), pooling=pooling)(x)
        for ta, tb in pairs.items():
            assert a[ta].shape == b[tb].shape
            torch.testing.assert_close(a[ta], b[tb], rtol=1e-4, atol=1e-5)


def test_timm_taps_come_from_feature_info_and_list_their_dimensions(capsys):
    bb = Backbone("timm:resnet18", weights="none", image_size=64)
    model = timm.create_model("resnet18", pretrained=False)
    assert [t for t in bb.taps if t.startswith("stage")] == [f"stage{i + 1}" for i in range(len(model.feature_info))]
    assert [bb.taps[f"stage{i + 1}"].shape[0] for i in range(5)] == [f["num_chs"] for f in model.feature_info]
    assert bb.default_tap == "pooled" and bb.taps["pooled"].shape == (512,) and bb.taps["logits"].shape == (1000,)
    assert main(["list", "taps", "timm:resnet18", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    header = next(line.split() for line in out.splitlines() if line.startswith("tap"))
    row = next(line.split() for line in out.splitlines() if line.startswith("stage3"))
    columns = dict(zip(header[4:], row[3:], strict=True))  # the pooling columns after tap, node, output shape
    assert row[2] == "128x8x8" and columns == {"avg": "128", "max": "128", "avgmax": "256", "pyramid": "640",
                                                "gem": "128", "avgstd": "256", "cls": "-"}  # no class token


def test_timm_preprocessing_is_its_pretrained_config(photo):
    bb = Backbone("timm:resnet18", weights="auto")  # resolving the name needs no download
    config = timm.data.resolve_model_data_config(timm.create_model("resnet18", pretrained=False))
    img = photo(300, 200, 4)
    ours, theirs = bb.transform()(img), timm.data.create_transform(**config)(img)
    assert ours.shape == theirs.shape == (3, 224, 224)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert bb.weights.spec == f"timm:resnet18.{timm.models.get_pretrained_cfg('resnet18').tag}"
    assert "interpolation=bicubic" in bb.transform_spec()


def test_a_timm_card_for_hub_weights_needs_their_checkpoint_in_the_hugging_face_cache(hf_cache):
    """Hub weights are carded once timm's checkpoint is cached (the build that downloads it comes first),
    and the card stops answering when that file goes."""
    tag = timm.models.get_pretrained_cfg("resnet18").tag

    def resnet():
        return Backbone("timm:resnet18", weights=tag, image_size=64)

    want = resnet().resolve_taps(["stage3"])
    assert resnet().card is None  # not cached: no card
    checkpoint = hf_cache(f"timm/resnet18.{tag}", "model.safetensors")
    assert resnet().resolve_taps(["stage3"]) == want
    again = resnet()
    assert again.card is not None and again.weights.spec == f"timm:resnet18.{tag}"
    assert again.resolve_taps(["stage3"]) == want and again.spec_args() == ("timm:resnet18", tag, 64)
    again.check_weights()  # from the card: the checkpoint is there (building from this empty file would fail)
    checkpoint.unlink()
    assert resnet().card is None


def test_a_timm_model_registered_in_the_process_is_a_backbone_although_the_kept_names_lack_it():
    """A notebook that registers its own timm model: the names kept per machine do not list it, timm does."""
    from features.models.names import source_names

    assert "taps_test_net" not in source_names("timm").names  # kept now, without it

    @timm.models.register_model
    def taps_test_net(pretrained=False, **kwargs):
        return timm.create_model("resnet18", pretrained=pretrained, **kwargs)

    bb = Backbone("timm:taps_test_net", weights="none", image_size=32)
    assert bb.taps["stage5"].shape == (512, 1, 1)


def test_unknown_timm_names_and_unfit_weights_are_one_line(torchvision_resnet18_file):
    with pytest.raises(UsageError, match=r"unknown backbone .timm:resnet81.; did you mean timm:resnet18"):
        Backbone("timm:resnet81", weights="none")
    with pytest.raises(UsageError, match="unknown backbone source 'tim'"):
        Backbone("tim:resnet18")
    _, folder = torchvision_resnet18_file
    with pytest.raises(UsageError, match="does not fit timm:resnet34"):
        Backbone("timm:resnet34", weights=str(folder / "resnet18.pth")).build()


@pytest.mark.slow
def test_pretrained_timm_weights_offline_are_one_line_naming_the_fix(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--backbone", "timm:resnet18",
                           "--features-root", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "weights timm:resnet18." in proc.stderr and "pass --weights FILE (.safetensors or .pth)" in proc.stderr


@pytest.mark.slow
def test_without_a_network_missing_timm_weights_fail_at_once_without_retries(tmp_path):
    """No HF_HUB_OFFLINE: the hub (here an address that refuses connections) is probed once, briefly,
    instead of a minute of retries and their messages."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--backbone", "timm:resnet18",
                           "--features-root", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "(the hub cannot be reached from here)" in proc.stderr


@pytest.mark.slow
def test_compare_predict_across_a_torchvision_and_a_timm_backbone(tiny_flat, tmp_path, capsys):
    common = ["--dataset", f"folder:{tiny_flat}", "--weights", "none", "--image-size", "32",
              "--features-root", str(tmp_path / "fs")]
    assert main(["compare", *common, "--backbone", "resnet18,timm:resnet18", "--taps", "all", "--clf", "logreg",
                 "--protocol", "per-class:5", "--runs-root", str(tmp_path / "runs"), "--no-progress", "--workers", "0",
                 "--device", "cpu"]) == 0
    folder = next((tmp_path / "runs").rglob("compare.json")).parent
    rows = json.loads((folder / "compare.json").read_text())["rows"]
    assert {r["backbone"] for r in rows} == {"resnet18", "timm:resnet18"}
    assert [r["tap"] for r in rows if r["backbone"] == "timm:resnet18"] == \
        ["stage1", "stage2", "stage3", "stage4", "stage5", "pooled", "logits"]
    assert ":" not in str(folder) and not list((tmp_path / "fs").rglob("*:*"))  # names safe on every OS
    run = next(p.parent for p in (tmp_path / "runs").rglob("results.json") if "timm_resnet18__pooled" in str(p))
    capsys.readouterr()
    image = str(next(tiny_flat.glob("circle/*.jpg")))
    assert main(["predict", "--run", str(run), image]) == 0
    label = capsys.readouterr().out.splitlines()[0].split("\t")[1]
    assert label in ("circle", "square", "stripes")


def _raw_outputs(model, modules: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each module returns on ``x`` (forward hooks), before any pooling."""
    seen = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
             for name, m in modules.items()]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.slow
def test_vit_blocks_from_one_pass_equal_separate_passes_and_hand_pooled_tokens():
    from features.pooling import POOLINGS

    bb = Backbone("timm:vit_tiny_patch16_224", weights="none")
    blocks = ["block2", "block5", "block11"]
    taps = [bb.tap(t) for t in blocks + ["pooled"]]
    assert all(t.layout == "tokens" and t.prefix == 1 and t.shape == (192, 14, 14) for t in taps[:3])
    x = torch.randn(2, 3, 224, 224)
    model = bb.build()
    raw = _raw_outputs(model, {t: model.blocks[int(t[5:])] for t in blocks}, x)
    for pooling in POOLINGS:
        together = build_extractor(bb, taps, torch.device("cpu"), pooling=pooling)(x)
        for tap in taps:  # one pass over several blocks gives what a pass per block gives
            alone = build_extractor(bb, [tap], torch.device("cpu"), pooling=pooling)(x)[tap.name]
            torch.testing.assert_close(together[tap.name], alone, rtol=1e-5, atol=1e-5)
            assert together[tap.name].shape == (2, bb.dim(tap.name, pooling))  # what `taps list taps` prints
        if pooling in ("cls", "avg"):
            for t in blocks:  # the class token; the mean of the 196 patch tokens
                expected = raw[t][:, 0] if pooling == "cls" else raw[t][:, 1:].mean(1)
                torch.testing.assert_close(together[t], expected, rtol=1e-4, atol=1e-5)
        if pooling == "pyramid":  # the patch tokens laid out on their 14 x 14 grid, then pooled
            grid = raw["block5"][:, 1:].reshape(2, 14, 14, 192).permute(0, 3, 1, 2)
            cells = torch.nn.functional.adaptive_avg_pool2d(grid, 2).flatten(1)
            torch.testing.assert_close(together["block5"], torch.cat([grid.mean((2, 3)), cells], 1),
                                       rtol=1e-4, atol=1e-5)


def test_torchvision_transformers_pool_over_the_right_axes():
    swin = Backbone("swin_t", weights="none")
    tap = swin.tap("block7")
    assert tap.layout == "nhwc" and tap.shape == (768, 7, 7)
    x = torch.randn(1, 3, 224, 224)
    model = swin.build()
    raw = _raw_outputs(model, {"block7": model.features[7]}, x)["block7"]  # (1, 7, 7, 768): channels last
    out = build_extractor(swin, [tap], torch.device("cpu"), pooling="avg")(x)["block7"]
    torch.testing.assert_close(out, raw.mean((1, 2)), rtol=1e-4, atol=1e-5)
    vit = Backbone("vit_b_16", weights="none")
    assert [vit.taps[f"block{i}"].layout for i in (0, 11)] == ["tokens", "tokens"] and vit.taps["block0"].prefix == 1
    assert "block11" in [t.name for t in vit.resolve_taps(["all"])]


@pytest.mark.slow
def test_timm_shards_and_replica_workers_write_a_single_runs_file(tiny_folder, tmp_path):
    import numpy as np

    from features.datasets import load_dataset
    from features.extract import extract
    from features.shards import merge_shards
    from features.store import FeatureFile

    images = load_dataset(f"folder:{tiny_folder}")
    bb = Backbone("timm:resnet18", weights="none", image_size=32)
    run = dict(device="cpu", precision="fp32", progress=False, batch_size=8)
    single = FeatureFile(extract(images, bb, ["stage3", "pooled"], out=tmp_path / "one", workers=0, **run).path)
    shards = [extract(images, bb, ["stage3", "pooled"], out=tmp_path / "two", shard=(i, 2), workers=0, **run).path
              for i in range(2)]
    merged = FeatureFile(merge_shards(shards))
    replicas = FeatureFile(extract(images, bb, ["stage3", "pooled"], out=tmp_path / "rep", loader="replicas",
                                   workers=2, **run).path)  # each replica process rebuilds timm:resnet18
    assert ":" not in merged.path.name and merged.attrs["backbone"] == "timm:resnet18"
    for other in (merged, replicas):
        for tap in ("stage3", "pooled"):
            np.testing.assert_allclose(single.read(tap), other.read(tap), rtol=1e-5, atol=1e-5)


def test_image_size_builds_a_timm_transformer_for_that_size():
    vit = Backbone("timm:vit_tiny_patch16_224", weights="none", image_size=112)
    assert vit.taps["block3"].shape == (192, 7, 7) and vit.input_size == 112  # a 7 x 7 grid of 16-px patches
    out = build_extractor(vit, [vit.tap("block3")], torch.device("cpu"), pooling="pyramid")(torch.randn(1, 3, 112, 112))
    assert out["block3"].shape == (1, vit.dim("block3", "pyramid")) == (1, 5 * 192)


@pytest.mark.slow
def test_timm_swin_stages_are_channels_last_and_pooled_over_their_grid():
    swin = Backbone("timm:swin_tiny_patch4_window7_224", weights="none")
    tap = swin.tap("stage4")
    assert tap.layout == "nhwc" and tap.shape == (768, 7, 7)
    x = torch.randn(1, 3, 224, 224)
    model = swin.build()
    raw = _raw_outputs(model, {"stage4": model.layers[3]}, x)["stage4"]  # (1, 7, 7, 768)
    out = build_extractor(swin, [tap], torch.device("cpu"), pooling="avgmax")(x)["stage4"]
    torch.testing.assert_close(out, torch.cat([raw.mean((1, 2)), raw.amax((1, 2))], 1), rtol=1e-4, atol=1e-5)


def test_timm_efficientnets_tap_every_block_with_the_stage_ends_under_feature_infos_names():
    bb = Backbone("timm:tf_efficientnet_lite0", weights="none", image_size=64)
    blocks = [t for t in bb.taps if t.startswith("block")]
    assert len(blocks) == 16 and list(bb.taps)[0] == "stem" and list(bb.taps)[-3:] == ["head", "pooled", "logits"]
    model = bb.build()
    # the stage ends keep the node names timm's feature_info gives (files made before every block was a tap)
    assert {f"block{m.split('.')[1]}": m for m in (i["module"] for i in model.feature_info)}.items() <= \
        {t.name: t.node for t in bb.taps.values()}.items()
    assert bb.tap("block3").node == "blocks.3" and bb.tap("block3.1").node == "blocks.3.1"
    assert bb.dim("head", "avg") == bb.dim("pooled") == 1280  # pooled is head's global average
