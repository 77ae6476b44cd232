"""The simplejpeg decoder (the CPU default) against PIL's path: same pixels before resizing,
the same draft scale, the preset's tensor resize, and every odd file handed back to PIL."""

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image, ImageOps

from features.backbones import Backbone
from features.datasets import BadImage, FileImageSet, open_image
from features.models.preprocess import Preprocess, UInt8Crop, turned_tensor
from features.turbojpeg import decode_crop, draft_scale, sample_pixels

CROP = Backbone("mobilenet_v2", weights="none").pixel_transform()
MIN_SIDE = CROP.resize_size[0]


def save(img: Image.Image, path, **options):
    img.save(path, **options)
    return path


@pytest.mark.parametrize("size,options", [
    ((300, 240), {}),                                   # Caltech-like, no draft
    ((1100, 700), {}),                                  # draft 1/2 (3/8 would also cover the target)
    ((1300, 1000), {"subsampling": 0}),                 # draft 1/4, 4:4:4 chroma
    ((3900, 3800), {"progressive": True}),              # draft 1/8, progressive
    ((401, 333), {"subsampling": 1, "quality": 60}),    # odd sizes, 4:2:2
])
def test_decoded_pixels_equal_pils_at_the_same_draft_scale(tmp_path, size, options, photo):
    path = save(photo(*size, seed=size[0]), tmp_path / "x.jpg", **options)
    pil = np.asarray(open_image(path, MIN_SIDE))
    scale = draft_scale(*size, MIN_SIDE)
    turbo = simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB", min_width=-(-size[0] // scale),
                                   min_height=-(-size[1] // scale))
    assert turbo.shape == pil.shape and pil.shape[:2] == (-(-size[1] // scale), -(-size[0] // scale))
    assert np.array_equal(turbo, pil)
    assert scale == {300: 1, 1100: 2, 1300: 4, 3900: 8, 401: 1}[size[0]]


@pytest.mark.parametrize("size", [(300, 240), (240, 300), (1100, 700), (232, 232), (180, 90)])
def test_crops_match_the_pil_path_to_a_grey_level_or_two(tmp_path, size, photo):
    path = save(photo(*size, seed=3), tmp_path / "x.jpg", quality=92)
    fast = decode_crop(path, CROP, MIN_SIDE, None)
    reference = CROP(open_image(path, MIN_SIDE))
    assert fast.shape == reference.shape == (224, 224, 3) and fast.dtype == np.uint8
    diff = np.abs(fast.astype(int) - reference.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5


def test_grey_jpegs_become_rgb_like_pils(tmp_path, photo):
    path = save(photo(260, 240, seed=4).convert("L"), tmp_path / "grey.jpg")
    fast = decode_crop(path, CROP, MIN_SIDE, None)
    assert fast is not None and np.array_equal(fast[..., 0], fast[..., 2])
    assert np.abs(fast.astype(int) - CROP(open_image(path, MIN_SIDE)).astype(int)).max() <= 3


def test_odd_files_go_back_to_pil_with_its_reasons(tmp_path, photo):
    img = photo(120, 100, seed=5)
    files = {
        "png": save(img, tmp_path / "a.png"),
        "cmyk": save(img.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "broken": tmp_path / "broken.jpg",
        "truncated": tmp_path / "truncated.jpg",
        "missing": tmp_path / "missing.jpg",
        "huge": save(photo(200, 150, seed=5), tmp_path / "huge.jpg"),  # over the set's pixel bound
    }
    files["broken"].write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    full = save(img, tmp_path / "full.jpg").read_bytes()
    files["truncated"].write_bytes(full[: len(full) // 2])
    for name, path in files.items():
        assert decode_crop(path, CROP, MIN_SIDE, 20_000) is None, name
    images = FileImageSet("odd", tmp_path, list(files.values()), ["x"], [0] * len(files), max_pixels=20_000)
    for i, name in enumerate(files):
        outcomes = []
        for decode in ("simplejpeg", "pil"):
            try:
                outcomes.append(sample_pixels(images, i, CROP, MIN_SIDE, decode))
            except BadImage as exc:
                outcomes.append(str(exc))
        assert type(outcomes[0]) is type(outcomes[1]), name
        if isinstance(outcomes[0], str):
            assert outcomes[0] == outcomes[1] and name in ("broken", "truncated", "missing", "huge"), name
        else:
            assert np.array_equal(outcomes[0], outcomes[1]), name  # the very same PIL path


def test_tensor_resize_is_the_presets_tensor_path(photo):
    """UInt8Crop.tensor is ImageClassification's resize and crop on a uint8 tensor, HWC out."""
    bb = Backbone("mobilenet_v2", weights="none")
    chw = torch.from_numpy(np.array(photo(310, 250, seed=6))).permute(2, 0, 1)
    ours = CROP.tensor(chw).permute(2, 0, 1).float() / 255
    preset = bb.transform()
    reference = (preset(chw) * torch.tensor(preset.std)[:, None, None]) + torch.tensor(preset.mean)[:, None, None]
    assert (ours - reference).abs().max() < 1.5 / 255  # uint8 kernel against float: rounding only


@pytest.mark.parametrize("size", [(300, 240), (1100, 700)])  # full size, and PIL's draft scale 1/2
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_pils_exif_transpose(tmp_path, size, orientation, photo):
    """Both CPU decoders turn (and mirror) the pixels as PIL's ``ImageOps.exif_transpose`` does."""
    tag = Image.Exif()
    tag[0x0112] = orientation
    path = save(photo(*size, seed=orientation), tmp_path / "x.jpg", exif=tag, quality=92)
    with Image.open(path) as img:
        img.draft("RGB", (img.width // draft_scale(*size, MIN_SIDE), img.height // draft_scale(*size, MIN_SIDE)))
        as_stored = img.convert("RGB")
    reference = CROP(ImageOps.exif_transpose(as_stored.copy()) if orientation > 1 else as_stored)
    assert np.array_equal(CROP(open_image(path, MIN_SIDE)), reference)
    diff = np.abs(decode_crop(path, CROP, MIN_SIDE, None).astype(int) - reference.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5
    if orientation > 1:  # the reference is not the stored picture itself
        assert np.abs(CROP(as_stored).astype(int) - reference.astype(int)).mean() > 5


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoded_tensors_turn_as_pils_exif_transpose(orientation, photo):
    """The on-device decoder's turn (nvJPEG does not turn; torchvision's own turning is CPU-only) gives
    PIL's pixels for every orientation, whatever the tensor's device."""
    tag = Image.Exif()
    tag[0x0112] = orientation
    stored = photo(30, 20, seed=orientation)
    stored.info["exif"] = tag.tobytes()
    reference = np.asarray(ImageOps.exif_transpose(stored))
    turned = turned_tensor(torch.from_numpy(np.array(stored)).permute(2, 0, 1), orientation)
    assert np.array_equal(turned.permute(1, 2, 0).numpy(), reference)


@pytest.mark.parametrize("interpolation,crop", [("bilinear", (224,)), ("bilinear", (200, 160)), ("bicubic", (224,))])
def test_a_crop_turned_after_the_resize_is_the_crop_of_the_image_turned_first(interpolation, crop, photo):
    """Decoders resize a turned photo as stored and turn only its crop: the same pixels for flips (and
    for bicubic presets, which turn first), within one grey level for bilinear transposes."""
    transform = UInt8Crop(Preprocess((256,), crop, interpolation, True, (0.5,) * 3, (0.5,) * 3))
    for size in ((500, 333), (299, 301)):
        stored = torch.from_numpy(np.array(photo(*size, seed=size[0]))).permute(2, 0, 1)  # CHW over HWC memory
        for orientation in range(1, 9):
            first = turned_tensor(stored, orientation).permute(1, 2, 0).contiguous().permute(2, 0, 1)
            diff = (transform.tensor(stored, orientation).int() - transform.tensor(first).int()).abs()
            assert diff.max() <= (1 if interpolation == "bilinear" and orientation >= 5 else 0), (size, orientation)
