"""hf:REPO backbones: every hidden state a tap, proved equal to the transformers model called directly."""

import pytest
import torch
from conftest import QUIET
from transformers import AutoModel

from features.backbones import Backbone
from features.forward import build_extractor
from pipeline.cli import main


def test_hidden_state_taps_equal_the_models_own_hidden_states(tiny_hf_vit):
    bb = Backbone(f"hf:{tiny_hf_vit}")  # --weights auto: the folder's own weights
    assert list(bb.taps) == ["embeddings", "block0", "block1", "block2"] and bb.default_tap == "block2"
    taps = [bb.tap(t) for t in ("embeddings", "block1", "block2")]
    assert all(t.layout == "tokens" and t.prefix == 1 and t.shape == (64, 4, 4) for t in taps)
    reference = AutoModel.from_pretrained(tiny_hf_vit).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        states = reference(pixel_values=x, output_hidden_states=True).hidden_states
        for pooling, pick in (("cls", lambda s: s[:, 0]), ("avg", lambda s: s[:, 1:].mean(1))):
            out = build_extractor(bb, taps, torch.device("cpu"), pooling=pooling)(x)
            for tap, state in zip(taps, (states[0], states[2], states[3]), strict=True):
                torch.testing.assert_close(out[tap.name], pick(state), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_hf_extracts_and_fits_end_to_end_and_refuses_a_repo_it_cannot_get(tiny_hf_vit, tiny_flat, tmp_path, capsys):
    data = ["--dataset", f"folder:{tiny_flat}", "--backbone", f"hf:{tiny_hf_vit}",
            "--features-root", str(tmp_path / "fs")]
    assert main(["extract", *data, "--taps", "block0,block2", *QUIET]) == 0
    assert main(["fit", *data, "--tap", "block2", "--clf", "logreg", "--grid", "1", "--device", "cpu",
                 "--protocol", "per-class:5", "--runs-root", str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    assert main(["list", "taps", "hf:no-such-owner/no-such-model"]) == 1  # not cached, no internet here
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "of hf:no-such-owner/no-such-model are not cached and could not be downloaded" in err[0]


@pytest.mark.slow
def test_a_local_folder_keeps_a_card_until_it_is_saved_again(tiny_hf_vit, tmp_path):
    """`hf:FOLDER` answers its taps from a card (no transformers import, a fraction of a second), keyed
    by the folder it names from here and stamped by its files: a folder saved again is resolved again."""
    import os
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "model"
    shutil.copytree(tiny_hf_vit, folder)
    probe = ("import sys; from pipeline.cli import main; main(['list', 'taps', sys.argv[1]]); "
             "print('transformers' in sys.modules)")
    env = {**os.environ, "TAPS_CACHE": str(tmp_path / "cache")}

    def listing(name: str, cwd=None) -> list[str]:
        proc = subprocess.run([sys.executable, "-c", probe, name], capture_output=True, text=True, env=env, cwd=cwd,
                              check=True)
        return proc.stdout.strip().splitlines()

    first, second = listing(f"hf:{folder}"), listing(f"hf:{folder}")
    assert first[-1] == "True" and second[-1] == "False" and first[:-1] == second[:-1]
    assert any(line.startswith("block2 ") for line in second)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"num_hidden_layers": 3',
                                                                                      '"num_hidden_layers": 2'))
    again = listing(f"hf:{folder}")  # saved again: another model, resolved afresh
    assert again[-1] == "True" and not any(line.startswith("block2 ") for line in again)
    elsewhere = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_hf_vit, elsewhere)
    assert listing("hf:model", cwd=elsewhere.parent)[-1] == "True"  # the same name from another folder
    shallower = listing("hf:model", cwd=folder.parent)  # the same name, another folder (2 blocks): not that card
    assert shallower[-1] == "True" and not any(line.startswith("block2 ") for line in shallower)
