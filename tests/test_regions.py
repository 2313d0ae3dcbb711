"""Regions: validation, masks on attention grids, overlaps, labels, serialisation, layouts, the layout picture."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl import Control, Region, Regions
from attnctl.controls.regions import (
    PNG_KEY,
    area_matrix,
    box_coverage,
    grid_layout,
    load_layout,
    resize_mask,
    save_picture,
)
from attnctl.controls.regions.masks import Tube
from attnctl.errors import ConfigError


# -- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "", "box": (0, 0, 1, 1)}, "non-empty"),
        ({"prompt": "   ", "box": (0, 0, 1, 1)}, "non-empty"),
        ({"prompt": 3, "box": (0, 0, 1, 1)}, "non-empty"),
        ({"prompt": "a cat"}, "neither"),
        ({"prompt": "a cat", "box": (0, 0, 1, 1), "mask": np.ones((4, 4))}, "both"),
        ({"prompt": "a cat", "box": (0, 0, 1.5, 1)}, "outside"),
        ({"prompt": "a cat", "box": (-0.1, 0, 0.5, 1)}, "outside"),
        ({"prompt": "a cat", "box": (0.5, 0, 0.5, 1)}, "x0 < x1"),
        ({"prompt": "a cat", "box": (0.6, 0, 0.5, 1)}, "x0 < x1"),
        ({"prompt": "a cat", "box": (0, 0.7, 1, 0.2)}, "y0 < y1"),
        ({"prompt": "a cat", "box": (0, 0, 1)}, "(x0, y0, x1, y1)"),
        ({"prompt": "a cat", "box": (0, 0, float("nan"), 1)}, "finite"),
        ({"prompt": "a cat", "mask": [[0, 1], [1, 0]]}, "must be a PIL image"),
        ({"prompt": "a cat", "mask": 0.5}, "must be a PIL image"),
        ({"prompt": "a cat", "mask": np.ones(5)}, "2-D"),
        ({"prompt": "a cat", "mask": np.ones((4, 5, 3))}, "RGB"),
        ({"prompt": "a cat", "mask": torch.ones(2, 3, 4, 5)}, "2-D"),
        ({"prompt": "a cat", "mask": np.zeros((4, 4))}, "empty"),
        ({"prompt": "a cat", "mask": torch.zeros(4, 4, dtype=torch.bool)}, "empty"),
        ({"prompt": "a cat", "mask": np.full((4, 4), 1.5)}, "[0, 1]"),
        ({"prompt": "a cat", "mask": np.full((4, 4), -0.5)}, "[0, 1]"),
        ({"prompt": "a cat", "mask": np.full((4, 4), 2, dtype=np.int32)}, "0 and 1"),
        ({"prompt": "a cat", "mask": np.full((4, 4), np.nan)}, "NaN"),
        ({"prompt": "a cat", "mask": np.ones((0, 4))}, "no pixels"),
        ({"prompt": "a cat", "mask": "no/such/mask.png"}, "does not exist"),
        ({"prompt": "a cat", "box": (0, 0, 1, 1), "subject": 1}, "subject"),
    ],
)
def test_region_rejects_bad_input(kwargs, message):
    with pytest.raises(ConfigError) as info:
        Region(**kwargs)
    assert message in str(info.value)


def test_region_error_names_the_region():
    with pytest.raises(ConfigError, match="Region\\('a cat'\\)"):
        Region("a cat", box=(0, 0, 2, 1))


def test_mask_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ConfigError, match="not an image"):
        Region("a cat", mask=str(path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"regions": []}, "at least one"),
        ({"regions": Region("a", box=(0, 0, 1, 1))}, "list of Region"),
        ({"regions": "a cat"}, "list of Region"),
        ({"regions": [("a cat", (0, 0, 1, 1))]}, "regions[0]"),
        ({"base_ratio": 1.5}, "base_ratio"),
        ({"base_ratio": -0.1}, "base_ratio"),
        ({"base_ratio": True}, "base_ratio"),
        ({"isolate": "yes"}, "isolate"),
        ({"isolation_strength": 0}, "isolation_strength"),
        ({"isolation_strength": -1}, "isolation_strength"),
        ({"isolation_strength": float("nan")}, "isolation_strength"),
        ({"layers": "nonsense term"}, "spaces"),
        ({"steps": (0.5, 0.2)}, "steps"),
    ],
)
def test_regions_rejects_bad_input(kwargs, message):
    options = {"regions": [Region("a cat", box=(0, 0, 1, 1))], **kwargs}
    with pytest.raises(ConfigError) as info:
        Regions(**options)
    assert message in str(info.value)


def test_regions_accepts_dicts_and_infinite_strength_spellings():
    control = Regions([{"prompt": "a cat", "box": [0, 0, 0.5, 1]}], isolation_strength="inf")
    assert control.regions == (Region("a cat", box=(0, 0, 0.5, 1)),)
    assert control.isolation_strength == math.inf
    two = [Region("a", box=(0, 0, 0.5, 1)), Region("b", box=(0.5, 0, 1, 1))]
    assert Regions(two, isolate=True, isolation_strength=4).isolation_strength == 4.0


# -- masks --------------------------------------------------------------------------------------------------------
def test_every_mask_type_reads_the_same(tmp_path):
    array = np.zeros((8, 12), dtype=np.uint8)
    array[2:6, 3:9] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(array).save(path)
    expected = torch.from_numpy(array.astype(np.float32) / 255)
    variants = [
        array,
        array > 0,
        (array > 0).astype(np.int64),
        array.astype(np.float32) / 255,
        torch.from_numpy(array),
        torch.from_numpy(array > 0),
        torch.from_numpy(array.astype(np.float64) / 255)[None],
        torch.from_numpy(array.astype(np.float64) / 255)[..., None],
        Image.fromarray(array),
        Image.fromarray(array).convert("RGB"),
        str(path),
        path,
        # integer masks of only 0 and 1 are 0 / 1 masks, not 1/255 or 1/65535 of one
        (array > 0).astype(np.uint8),
        (array > 0).astype(np.uint16),
        torch.from_numpy((array > 0).astype(np.uint8)),
        Image.fromarray((array > 0).astype(np.uint8)),
        Image.fromarray((array > 0).astype(np.int32)),
        Image.fromarray(array > 0),
        Image.fromarray(array.astype(np.uint16) * 257),  # 16-bit, full scale
    ]
    for variant in variants:
        assert torch.equal(Region("a cat", mask=variant).shape, expected), type(variant)


def test_relative_mask_path_is_read_from_the_current_directory(tmp_path, monkeypatch):
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp_path / "m.png")
    monkeypatch.chdir(tmp_path)
    region = Region("a cat", mask="m.png")
    assert region.mask_path == "m.png" and float(region.shape.min()) == 1.0


def test_sixteen_bit_masks_keep_soft_values(tmp_path):
    soft = torch.linspace(0.01, 1, 64).reshape(8, 8)
    control = Regions([Region("a cat", mask=soft)]).with_mask_files(tmp_path)
    restored = control.regions[0].shape
    assert control.regions[0].mask_path.endswith("region_00.png")
    torch.testing.assert_close(restored, soft, atol=1 / 65535, rtol=0)


def test_region_keeps_a_private_copy_of_an_array():
    array = np.ones((4, 4), dtype=np.float32)
    region = Region("a cat", mask=array)
    array[:] = 0
    assert float(region.shape.min()) == 1.0


def test_area_matrix_is_exact_area_averaging():
    matrix = area_matrix(3, 2)  # cells of 1/3 onto cells of 1/2
    expected = torch.tensor([[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], dtype=torch.float64)
    torch.testing.assert_close(matrix, expected)
    assert torch.allclose(area_matrix(64, 16).sum(1), torch.ones(16, dtype=torch.float64))
    # integer ratios are plain average pooling
    mask = torch.rand(64, 96, generator=torch.Generator().manual_seed(0))
    pooled = torch.nn.functional.adaptive_avg_pool2d(mask[None, None].double(), (16, 24))[0, 0]
    torch.testing.assert_close(resize_mask(mask, (16, 24)), pooled)


def test_box_coverage_is_the_covered_fraction():
    coverage = box_coverage((0.25, 0.0, 0.625, 0.5), (2, 4))  # x cells of 1/4, y cells of 1/2
    expected = torch.tensor([[0, 1, 0.5, 0], [0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(coverage, expected)


def test_soft_masks_stay_soft_and_mass_is_preserved():
    mask = torch.rand(48, 32, generator=torch.Generator().manual_seed(1))
    for grid in ((6, 4), (5, 7), (1, 1), (48, 32), (96, 64)):
        resized = resize_mask(mask, grid)
        assert float(resized.min()) >= 0 and float(resized.max()) <= 1
        assert abs(float(resized.mean()) - float(mask.double().mean())) < 1e-9


def test_overlaps_are_normalised_per_cell():
    layout = grid_layout(((0.0, 0.0, 0.75, 1.0), (0.25, 0.0, 1.0, 1.0)), (1, 4))
    torch.testing.assert_close(layout.coverage, torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1.0]]))
    torch.testing.assert_close(layout.weights, torch.tensor([[1, 0.5, 0.5, 0], [0, 0.5, 0.5, 1.0]]))
    torch.testing.assert_close(layout.total, torch.ones(4))
    # ties go to the later region; cells below 1/2 are background
    assert layout.labels.tolist() == [1, 2, 2, 2]
    partial = grid_layout(((0.0, 0.0, 0.3, 1.0), (0.2, 0.0, 0.55, 1.0)), (1, 4))
    assert partial.labels.tolist() == [1, 2, 0, 0]  # cell 1: 0.2 vs 0.8; cell 2: 0.2 < 1/2
    assert not partial.binary


def test_non_square_grids_and_unet_levels():
    # a box over the left third of a 2:3 canvas at two UNet levels (16x24 and 8x12 token grids)
    for grid in ((16, 24), (8, 12)):
        layout = grid_layout(((0.0, 0.0, 1 / 3, 1.0),), grid)
        plane = layout.weights[0].reshape(grid)
        assert torch.all(plane[:, : grid[1] // 3] == 1) and torch.all(plane[:, grid[1] // 3 :] == 0)


# -- serialisation --------------------------------------------------------------------------------------------------
def test_to_dict_round_trip_with_boxes_and_mask_paths(tmp_path, monkeypatch):
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp_path / "m.png")
    monkeypatch.chdir(tmp_path)
    control = Regions(
        [Region("a cat", box=(0, 0, 0.5, 1)), Region("a dog", mask="m.png", subject=False)],
        base_ratio=0.3, isolate=True, layers="cross", steps=(0.0, 0.5),
    )
    data = control.to_dict()
    assert data["type"] == "regions"
    assert data["regions"] == [
        {"prompt": "a cat", "box": [0.0, 0.0, 0.5, 1.0], "subject": True},
        {"prompt": "a dog", "mask": "m.png", "subject": False},
    ]
    assert data["isolation_strength"] == "inf"
    rebuilt = Control.from_dict(json.loads(json.dumps(data)))
    assert rebuilt == control


def test_in_memory_masks_cannot_be_serialised():
    control = Regions([Region("a cat", mask=np.ones((4, 4)))])
    with pytest.raises(ConfigError, match="in-memory mask"):
        control.to_dict()


# -- layouts ----------------------------------------------------------------------------------------------------------
LAYOUT = {
    "base_ratio": 0.25,
    "isolate": True,
    "regions": [
        {"prompt": "a red circle", "box": [0.05, 0.25, 0.45, 0.75]},
        {"prompt": "a blue square", "mask": "square.png"},
    ],
}


def _square(directory):
    array = np.zeros((16, 16), dtype=np.uint8)
    array[4:12, 9:15] = 255
    Image.fromarray(array).save(os.path.join(directory, "square.png"))


def test_layout_from_json_and_toml(tmp_path, monkeypatch):
    _square(tmp_path)
    (tmp_path / "layout.json").write_text(json.dumps(LAYOUT))
    (tmp_path / "layout.toml").write_text(
        'base_ratio = 0.25\nisolate = true\n\n[[regions]]\nprompt = "a red circle"\nbox = [0.05, 0.25, 0.45, 0.75]\n\n'
        '[[regions]]\nprompt = "a blue square"\nmask = "square.png"\n'
    )
    monkeypatch.chdir("/")  # relative mask paths in a layout file are relative to the file
    from_json = Regions.from_layout(str(tmp_path / "layout.json"))
    from_toml = Regions.from_layout(tmp_path / "layout.toml")
    assert from_json == from_toml
    assert from_json.base_ratio == 0.25 and from_json.isolate
    assert from_json.regions[1].mask_path == str(tmp_path / "square.png")
    assert load_layout(tmp_path / "layout.json", base_ratio=0.5).base_ratio == 0.5
    # a bare list of regions, and to_dict output saved as a file, are layouts too
    assert Regions.from_layout([{"prompt": "a cat", "box": [0, 0, 1, 1]}]).regions[0].prompt == "a cat"
    saved = from_json.save_layout(tmp_path / "saved.json")
    assert Regions.from_layout(saved) == from_json
    # a mask given relative to the working directory, saved in another folder, loads back from there
    monkeypatch.chdir(tmp_path)
    relative = Regions([Region("a blue square", mask="square.png")])
    saved = relative.save_layout(tmp_path / "sub" / "layout.json") if (tmp_path / "sub").mkdir() is None else None
    monkeypatch.chdir("/")
    assert Regions.from_layout(saved).regions[0].mask_path == str(tmp_path / "square.png")


@pytest.mark.parametrize(
    "content, name, message",
    [
        ("{", "bad.json", "not valid JSON"),
        ("regions = [", "bad.toml", "not valid TOML"),
        ('{"regions": [{"prompt": "a", "box": [0, 0, 1, 1]}], "colour": 1}', "extra.json", "no field(s) colour"),
        ('{"regions": [{"prompt": "a", "area": [0, 0, 1, 1]}]}', "area.json", "no field(s) area"),
        ('{"base_ratio": 0.2}', "none.json", "needs 'regions'"),
        ('{"regions": [{"prompt": "a", "box": [0, 0, 1, 1]}]}', "layout.yaml", ".json or .toml"),
    ],
)
def test_bad_layout_files(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)").replace(".", "\\.")):
        Regions.from_layout(tmp_path / name)


def test_layout_picture(tmp_path):
    _square(tmp_path)
    control = load_layout(LAYOUT | {"regions": [LAYOUT["regions"][0], {"prompt": "a blue square", "mask": str(tmp_path / "square.png")}]})
    picture = control.picture(size=(256, 192))
    assert picture.size == (256, 192) and picture.mode == "RGB"
    pixels = np.asarray(picture).astype(int)
    inside_box = pixels[96, 60]  # (x=60/256, y=0.5) inside the circle box, away from the label
    inside_mask = pixels[100, 200]  # inside the square mask
    outside = pixels[10, 128]
    assert tuple(outside) == (255, 255, 255)
    assert inside_box[0] > inside_box[2] and tuple(inside_box) != (255, 255, 255)  # red tint
    assert inside_mask[1] > inside_mask[0] and tuple(inside_mask) != (255, 255, 255)  # second colour (green)
    path = save_picture(control, tmp_path / "layout.png", size=(128, 128))
    with Image.open(path) as saved:
        data = json.loads(saved.text[PNG_KEY])
    assert Control.from_dict(data) == control


def test_layout_picture_of_per_frame_boxes(tmp_path):
    """A video region's per-frame boxes (Wan) draw as its first frame's box (picture() failed unpacking them)."""
    control = Regions([Region("a cat", box=[(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]), Region("a dog", box=(0.5, 0.0, 1.0, 1.0))])
    picture = control.picture(size=(64, 48))
    assert picture.size == (64, 48)
    assert tuple(np.asarray(picture)[12 + 6, 16]) != (255, 255, 255)  # inside the first frame's box
    assert save_picture(control, tmp_path / "frames.png", size=(64, 48))


def test_exports():
    assert attnctl.Region is Region and attnctl.Regions is Regions
    assert "Regions" in attnctl.__all__ and "Region" in attnctl.__all__


def test_video_region_fields_survive_saving_and_loading(tmp_path):
    """`with_mask_files` keeps a region's frame range (it was dropped: the region then covered every frame), and a
    layout's per-frame mask paths are read relative to the layout file and written back as paths."""
    soft = torch.zeros(8, 8)
    soft[2:6, 2:6] = 1.0
    saved = Regions([Region("a cat", mask=soft, frames=(1, 3))]).with_mask_files(tmp_path / "masks")
    assert saved.regions[0].frames == (1, 3) and saved.regions[0].mask_path is not None
    for name in ("m0.png", "m1.png"):
        Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp_path / name)
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"regions": [{"prompt": "a cat", "mask": ["m0.png", "m1.png"], "frames": [0, 2]}]}))
    loaded = Regions.from_layout(layout)
    region = loaded.regions[0]
    assert region.per_frame is not None and len(region.per_frame) == 2
    assert region.to_dict()["mask"] == [str(tmp_path / "m0.png"), str(tmp_path / "m1.png")]
    assert Regions.from_layout(loaded.to_dict()["regions"]) == loaded


def test_a_mask_stack_reads_as_its_list_of_frames():
    """A 3-D array (frames, H, W) is one mask per token frame, read exactly as the list of its frames (issue #21:
    `AttentionMapResult.masks` on video is (videos, frames, H, W), and `Region(mask=masks[i])` raised); a first or
    last axis of 1 stays one single-channel mask, and an (H, W, 3) / (H, W, 4) array an RGB(A) image, refused."""
    soft = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(0))
    uint8 = np.zeros((2, 6, 5), dtype=np.uint8)
    uint8[0, :3], uint8[1, 3:] = 255, 128  # one 0..255 stack (a stack's scale: test_a_uint8_mask_stack_is_scaled_as_one_array)
    for stack in (soft, soft > 0.5, soft.numpy(), uint8, torch.from_numpy(uint8)):
        region, listed = Region("a cat", mask=stack), Region("a cat", mask=list(stack))
        assert region == listed and len(region.per_frame) == len(stack) and region.video
        assert torch.equal(region._pixels, listed._pixels) and region._pixels.dtype == listed._pixels.dtype
    for single in (soft[:1], soft[0, :, :, None], np.ones((2, 4, 1))):
        region = Region("a cat", mask=single)
        assert region.per_frame is None and not region.video and region.shape.ndim == 2
    for colour in (np.ones((6, 5, 3)), np.full((6, 5, 4), 255, dtype=np.uint8), torch.ones(6, 5, 3)):
        with pytest.raises(ConfigError, match=r"RGB / RGBA image \(H, W, C\).*grayscale.*got shape \(6, 5, [34]\)"):
            Region("a cat", mask=colour)


def test_a_mask_stack_is_refused_on_image_models_as_a_list_is(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    stack = torch.zeros(2, 8, 8)
    stack[:, 2:6, 2:6] = 1.0
    for mask in (stack, list(stack)):
        with pytest.raises(ConfigError, match=r"Region\('a dog', mask=<\(2, 8, 8\) array.*need a video denoiser"):
            attnctl.apply(pipe, [Regions([Region("a dog", mask=mask)])])


def _needs_wan():
    from attnctl.testing.new_families import available

    return pytest.mark.skipif(not available("tiny-wan"), reason="tiny-wan needs diffusers >= 0.42 with Wan")


@_needs_wan()
def test_video_attention_masks_are_usable_directly_as_a_region_mask(tiny_cache):
    """Issue #21 on tiny-wan: `Region(mask=masks(word)[0])` from a real call is `Region(mask=list(masks(word)[0]))`,
    bitwise, in the region and in the generated video."""
    from attnctl.testing import CALL_DEFAULTS

    pipe = tiny_cache("tiny-wan")

    def generate():
        out = pipe(prompt="a cat on the street", num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **CALL_DEFAULTS["tiny-wan"])
        return out.frames

    with attnctl.apply(pipe, [attnctl.AttentionMaps(("cat",))]) as handle:
        generate()
    masks = handle.outputs["attention_maps"].masks("cat")
    assert masks.ndim == 4 and masks.shape[1] > 1
    region, listed = Region("a dog", mask=masks[0]), Region("a dog", mask=list(masks[0]))
    assert region == listed and torch.equal(region._pixels, listed._pixels) and len(region.per_frame) == masks.shape[1]
    videos = []
    for r in (region, listed):
        with attnctl.apply(pipe, [Regions([r])]):
            videos.append(generate())
    assert torch.equal(videos[0], videos[1])


# -- per-frame masks: empty frames, one scale per stack, fields that read back, errors naming the rule --------------
def test_a_per_frame_mask_may_have_empty_frames_but_not_every_frame():
    """`AttentionMapResult.masks(word)[i]` on video is thresholded over the whole video, so a token frame the object
    has left is all False: that frame has no cells of the region; a mask with no area in any frame is refused."""
    stack = torch.zeros(3, 8, 8, dtype=torch.bool)
    stack[0, :4], stack[1, 2:6] = True, True
    for mask in (stack, list(stack), stack.numpy(), [m.numpy().astype(np.uint8) * 255 for m in stack]):
        region = Region("a cat", mask=mask)
        assert len(region.per_frame) == 3 and float(region.per_frame[2].max()) == 0.0 and region.per_frame[0].any()
    layout = grid_layout((Tube(Region("a cat", mask=stack).per_frame),), (3, 4, 4))
    assert layout.coverage.reshape(3, 4, 4)[2].abs().max() == 0 and (layout.labels.reshape(3, 4, 4)[2] == 0).all()
    assert layout.labels.reshape(3, 4, 4)[:2].any(dim=(1, 2)).all()
    for empty in (torch.zeros(3, 8, 8), [np.zeros((8, 8))] * 2):
        with pytest.raises(ConfigError, match=r"Region\('a cat'\): every per-frame mask is empty"):
            Region("a cat", mask=empty)
    with pytest.raises(ConfigError, match=r"Region\('a cat'\): the mask is empty"):
        Region("a cat", mask=torch.zeros(8, 8))


@_needs_wan()
def test_an_empty_token_frame_is_a_region_absent_from_that_frame_on_wan(tiny_cache):
    """tiny-wan has 3 token frames: masks (m, m, empty) are the tube of frames 0..1 with m, bitwise (region prompts
    and isolation)."""
    from attnctl.testing import CALL_DEFAULTS

    pipe = tiny_cache("tiny-wan")
    m = torch.zeros(16, 12)
    m[:, :6] = 1.0
    videos = []
    cat = Region("a cat", box=(0.5, 0.0, 1.0, 1.0))
    for region in (Region("a dog", mask=[m, m, torch.zeros(16, 12)]), Region("a dog", mask=[m, m], frames=(0, 2))):
        with attnctl.apply(pipe, [Regions([region, cat], isolate=True)]):
            videos.append(pipe(prompt="a cat on the street", num_inference_steps=1, output_type="latent",
                               generator=torch.Generator().manual_seed(0), **CALL_DEFAULTS["tiny-wan"]).frames)
    assert torch.isfinite(videos[0]).all() and torch.equal(videos[0], videos[1])


def test_a_uint8_mask_stack_is_scaled_as_one_array():
    """One uint8 array has one scale: 0..255 unless it holds only 0 and 1; a list holds separate masks, each its own."""
    stack = np.zeros((2, 4, 5), dtype=np.uint8)
    stack[0, :2], stack[1, 2:] = 255, 1
    for value in (stack, torch.from_numpy(stack)):
        assert [float(f.max()) for f in Region("a cat", mask=value).per_frame] == [1.0, pytest.approx(1 / 255)]
    assert [float(f.max()) for f in Region("a cat", mask=list(stack)).per_frame] == [1.0, 1.0]
    binary = np.minimum(stack, 1)  # a 0 / 1 stack is a 0 / 1 mask, not 1/255 of one
    assert torch.equal(Region("a cat", mask=binary)._pixels, torch.from_numpy(binary).float())


@pytest.mark.parametrize("kind", ["list of one", "list of two", "stack", "narrow frames"])
def test_per_frame_masks_survive_re_creating_the_region_from_its_fields(kind):
    """`dataclasses.replace` re-reads `mask` as stored: per-frame masks must stay per-frame (one frame included)."""
    import dataclasses

    m = torch.rand(2, 6, 5, generator=torch.Generator().manual_seed(1))
    mask = {"list of one": [m[0]], "list of two": list(m), "stack": m, "narrow frames": [m[0, :, :3], m[1, :, :3]]}[kind]
    region = Region("a cat", mask=mask, subject=False)
    copy = dataclasses.replace(region, prompt="a dog")
    assert copy == Region("a dog", mask=mask, subject=False) and copy.video and region.video
    assert len(copy.per_frame) == len(region.per_frame) and torch.equal(copy._pixels, region._pixels)
    assert dataclasses.replace(copy, prompt="a cat") == region


def test_a_colour_tensor_refused_on_an_image_model_names_the_frames_rule(tiny_cache):
    """A (3, H, W) colour tensor (torchvision's to_tensor) is read as 3 token frames: the refusal says so."""
    pipe = tiny_cache("tiny-sd")
    rgb = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"\(3, 8, 8\) array, read as 3 per-token-frame masks: a 3-D mask \(F, H, W\) is F "
                                          r"masks, one per token frame.*need a video denoiser"):
        attnctl.apply(pipe, [Regions([Region("a dog", mask=rgb)])])
