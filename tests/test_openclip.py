"""openclip:ARCH/PRETRAINED backbones: wiring proved by equivalence with open_clip itself (random weights)."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import QUIET

from features.backbones import Backbone
from features.forward import build_extractor
from pipeline.cli import main


def _reference(arch: str, image_size: int | None = None):
    """open_clip's own model with the weights taps builds for --weights none (seed 0, the pretrained
    config's activation)."""
    torch.manual_seed(0)
    return open_clip.create_model(arch, pretrained=None, force_quick_gelu=True, force_image_size=image_size).eval()


@pytest.mark.slow
def test_embed_is_encode_image_pooled_is_before_the_projection_and_blocks_are_the_resblocks():
    bb = Backbone("openclip:ViT-B-32/openai", weights="none", image_size=64)
    taps = [bb.tap(t) for t in ("block3", "pooled", "embed")]
    assert taps[0].layout == "tokens" and taps[0].prefix == 1 and taps[0].shape == (768, 2, 2)
    assert [t.shape for t in taps[1:]] == [(768,), (512,)] and bb.default_tap == "embed"
    reference = _reference("ViT-B-32", 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = build_extractor(bb, taps, torch.device("cpu"), pooling="cls")(x)
        torch.testing.assert_close(out["embed"], reference.encode_image(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["pooled"] @ reference.visual.proj, out["embed"], rtol=1e-4, atol=1e-5)
        seen = {}
        hook = reference.visual.transformer.resblocks[3].register_forward_hook(lambda m, i, o: seen.update(o=o))
        reference.encode_image(x)
        hook.remove()
    torch.testing.assert_close(out["block3"], seen["o"][:, 0], rtol=1e-4, atol=1e-5)  # its class token


def test_openclip_taps_list_offline_and_missing_weights_or_names_are_one_line(capsys):
    assert main(["list", "taps", "openclip:ViT-B-32/openai"]) == 0  # no weights needed to list
    out = capsys.readouterr().out
    assert "standard embedding: embed" in out and any(line.split()[:2] == ["embed", "projection"]
                                                      for line in out.splitlines())
    assert main(["list", "taps", "openclip:ViT-B-32/nonsense"]) == 2
    assert "open_clip has no weights 'nonsense' for ViT-B-32" in capsys.readouterr().err
    assert main(["list", "taps", "openclip:ViT-Q-99"]) == 2
    assert main(["list", "backbones"]) == 0 and "openclip:ARCH/PRETRAINED" in capsys.readouterr().out


@pytest.mark.slow
def test_openclip_extracts_and_fits_end_to_end_and_refuses_weights_it_cannot_get(tiny_flat, tmp_path, capsys):
    data = ["--dataset", f"folder:{tiny_flat}", "--backbone", "openclip:ViT-B-32/openai", "--image-size", "64",
            "--features-root", str(tmp_path / "fs")]
    assert main(["extract", *data, "--weights", "none", "--taps", "block5,embed", *QUIET]) == 0
    assert main(["fit", *data, "--weights", "none", "--tap", "embed", "--clf", "logreg", "--grid", "1",
                 "--device", "cpu", "--protocol", "per-class:5", "--runs-root", str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    assert main(["extract", *data, *QUIET]) == 1  # the openai weights: not cached, no internet here
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openclip:ViT-B-32/openai are not cached and could not be downloaded" in err[0]


def test_an_openclip_card_for_hub_weights_needs_the_checkpoint_open_clip_downloads(hf_cache):
    """open_clip's ViT-B-32/openai comes from its hub entry's default file (safetensors first): carded once
    that is in the Hugging Face cache, not before, and not trusted once it goes."""
    def clip():
        return Backbone("openclip:ViT-B-32/openai", image_size=64)

    want = clip().resolve_taps(["block3"])
    assert clip().card is None
    checkpoint = hf_cache("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors")
    clip().resolve_taps(["block3"])
    again = clip()
    assert again.card is not None and again.resolve_taps(["block3"]) == want
    assert again.weights.spec == "openclip:ViT-B-32/openai"
    again.check_weights()  # from the card: building from this empty file would fail
    checkpoint.unlink()
    assert clip().card is None


def test_the_zero_shot_classifier_is_open_clips_for_the_same_names_and_templates():
    from features.models.openclip_source import OpenClipSource

    names, templates = ["circle", "square", "striped cloth"], ["a photo of a {}.", "a drawing of a {}."]
    ours = OpenClipSource("openclip:ViT-B-32/openai", "none", 64).text_classifier(names, templates)
    reference = _reference("ViT-B-32", 64)
    with torch.inference_mode():
        expected = open_clip.build_zero_shot_classifier(reference, open_clip.get_tokenizer("ViT-B-32"), names, templates)
    assert ours.shape == (512, 3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compare_puts_a_zero_shot_row_beside_the_probes_on_the_same_splits(tiny_flat, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {}.\na picture of the {}.\n")
    data = ["--dataset", f"folder:{tiny_flat}", "--backbone", "openclip:ViT-B-32/openai", "--weights", "none",
            "--image-size", "64", "--features-root", str(tmp_path / "fs"), "--runs-root", str(tmp_path / "runs")]
    assert main(["compare", *data, "--taps", "block5,embed", "--clf", "logreg,zeroshot", "--prompts", str(prompts),
                 "--protocol", "per-class:5", "--seeds", "2", *QUIET]) == 0
    out = capsys.readouterr().out
    rows = json.loads((Path(out.strip().splitlines()[-1]) / "compare.json").read_text())["rows"]
    assert [(r["clf"], r["tap"]) for r in rows] == [("logreg", "block5"), ("logreg", "embed"), ("zeroshot", "embed")]
    zero = rows[-1]
    assert zero["split_digests"] == rows[0]["split_digests"] and zero["interval_low"] <= zero["interval_high"]
    assert zero["best"] or "vs_best" in zero  # tested against the best row like any other
    run = Path(zero["run"])
    assert json.loads((run / "results.json").read_text())["settings"]["prompts"]  # the templates are in its identity
    image = str(next(tiny_flat.glob("circle/*.jpg")))
    assert main(["predict", "--run", str(run), image, "--weights", "none"]) == 0
    assert "\tprobability=" in capsys.readouterr().out
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder here\n")
    assert main(["compare", *data, "--taps", "embed", "--clf", "zeroshot", "--prompts", str(bad), *QUIET]) == 2
    assert main(["compare", *data, "--taps", "block5", "--clf", "zeroshot", *QUIET]) == 2
    assert "add it to --taps" in capsys.readouterr().err


@pytest.mark.slow
def test_a_cnn_tower_gives_its_stages_and_embed_is_encode_image():
    bb = Backbone("openclip:RN50/openai", weights="none", image_size=64)
    assert list(bb.taps) == ["stem", "layer1", "layer2", "layer3", "layer4", "embed"] and bb.default_tap == "embed"
    taps = [bb.tap(t) for t in ("layer4", "embed")]
    reference = _reference("RN50", 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = build_extractor(bb, taps, torch.device("cpu"), pooling="avg")(x)
        torch.testing.assert_close(out["embed"], reference.encode_image(x), rtol=1e-4, atol=1e-5)
        v = reference.visual
        stem = v.avgpool(v.act3(v.bn3(v.conv3(v.act2(v.bn2(v.conv2(v.act1(v.bn1(v.conv1(x))))))))))
        layer4 = v.layer4(v.layer3(v.layer2(v.layer1(stem))))
    torch.testing.assert_close(out["layer4"], layer4.mean((2, 3)), rtol=1e-4, atol=1e-5)
