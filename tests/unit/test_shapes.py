"""Shapes World v1 (docs/shapes-world.md): rendering, captions, parsing, scoring, read-back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlv_engine import shapes
from vlv_engine.shapes import COLORS, ShapeObject, caption, parse, render, score

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "vlv_engine" / "assets" / "examples"
WHITE = (255, 255, 255)


def obj(shape="square", size="small", color="blue", row="top", col="left") -> ShapeObject:
    return ShapeObject(shape=shape, size=size, color=color, row=row, col=col)


def painted(image: np.ndarray) -> np.ndarray:
    return np.any(image != 255, axis=-1)


def brute_force_mask(shape: str, cx: float, cy: float, d: float) -> np.ndarray:
    """Per-pixel float geometry straight from the spec text, independent of shapes._mask."""
    h = d / 2
    mask = np.zeros((64, 64), dtype=bool)
    for y in range(64):
        for x in range(64):
            px, py = x + 0.5, y + 0.5
            if shape == "circle":
                inside = (px - cx) ** 2 + (py - cy) ** 2 <= h**2
            elif shape == "square":
                inside = cx - h <= px < cx + h and cy - h <= py < cy + h
            else:
                verts = [(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)]
                signs = [
                    (bx - ax) * (py - ay) - (by - ay) * (px - ax)
                    for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1])
                ]
                inside = all(s >= 0 for s in signs) or all(s <= 0 for s in signs)
            mask[y, x] = inside
    return mask


# Rendering ----------------------------------------------------------------------


def test_canvas_is_white_uint8_64x64():
    image = render((obj(),))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[63, 63]) == WHITE


def test_small_square_top_left_covers_exactly_5_to_17():
    # cx = cy = 11, d = 12: 5 <= x + 0.5 < 17  <=>  x in [5, 17).
    expected = np.zeros((64, 64), dtype=bool)
    expected[5:17, 5:17] = True
    np.testing.assert_array_equal(painted(render((obj("square"),))), expected)


def test_large_square_center_covers_exactly_22_to_42():
    expected = np.zeros((64, 64), dtype=bool)
    expected[22:42, 22:42] = True
    image = render((obj("square", "large", row="middle", col="center"),))
    np.testing.assert_array_equal(painted(image), expected)


def test_small_circle_pixel_count_matches_brute_force():
    expected = sum(
        (x + 0.5 - 11) ** 2 + (y + 0.5 - 11) ** 2 <= 36 for y in range(64) for x in range(64)
    )
    mask = painted(render((obj("circle"),)))
    assert mask.sum() == expected == 112
    # Symmetric about the centre 11: rows/cols 5..16.
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (5, 16, 5, 16)


def test_small_triangle_top_left_rows():
    # 2|x + 0.5 - 11| <= y + 0.5 - 5 and y + 0.5 <= 17: apex row y = 6 (x = 10, 11),
    # widths 2, 2, 4, 4, ..., 10, 10, 12 down to the base row y = 16 (x = 5..16).
    mask = painted(render((obj("triangle"),)))
    rows = np.nonzero(mask.any(axis=1))[0]
    assert (rows.min(), rows.max()) == (6, 16)
    assert list(np.nonzero(mask[6])[0]) == [10, 11]
    assert list(np.nonzero(mask[16])[0]) == list(range(5, 17))
    assert list(mask.sum(axis=1)[6:17]) == [2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12]
    assert mask.sum() == 72


def test_large_triangle_center_pixel_count():
    mask = painted(render((obj("triangle", "large", row="middle", col="center"),)))
    assert list(np.nonzero(mask[23])[0]) == [31, 32]
    assert list(np.nonzero(mask[41])[0]) == list(range(22, 42))
    assert mask.sum() == 200


@pytest.mark.parametrize("shape", shapes.SHAPES)
@pytest.mark.parametrize("size", list(shapes.SIZES))
@pytest.mark.parametrize("cell", [("top", "left"), ("middle", "center"), ("bottom", "right")])
def test_masks_match_independent_float_geometry(shape, size, cell):
    o = obj(shape, size, row=cell[0], col=cell[1])
    cx, cy = o.center
    expected = brute_force_mask(shape, cx, cy, shapes.SIZES[size])
    np.testing.assert_array_equal(painted(render((o,))), expected)


@pytest.mark.parametrize("color", list(COLORS))
def test_colors_exact(color):
    image = render((obj("circle", "large", color, "middle", "center"),))
    assert tuple(image[32, 32]) == COLORS[color]
    assert {tuple(p) for p in image.reshape(-1, 3)} == {WHITE, COLORS[color]}


def test_two_objects_paint_both_colors_without_overlap():
    scene = shapes.make_scene(
        [
            obj("square", "large", "red", "top", "left"),
            obj("square", "large", "green", "top", "center"),
        ]
    )
    image = render(scene)
    assert (image == COLORS["red"]).all(-1).sum() == 400
    assert (image == COLORS["green"]).all(-1).sum() == 400


def test_jitter_shifts_by_integer_offsets_within_bounds():
    scene = (obj("triangle", "large", row="middle", col="center"),)
    exact = render(scene)
    seen = set()
    for seed in range(40):
        ox, oy = np.random.default_rng(seed).integers(-2, 3, size=2)
        jittered = render(scene, jitter=2, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(jittered, np.roll(exact, (oy, ox), axis=(0, 1)))
        seen.add((int(ox), int(oy)))
    assert all(-2 <= v <= 2 for pair in seen for v in pair) and len(seen) > 10


def test_jitter_needs_rng():
    with pytest.raises(ValueError):
        render((obj(),), jitter=2)


# Scenes -------------------------------------------------------------------------


def test_sampled_scenes_are_valid_and_ordered():
    rng = np.random.default_rng(0)
    counts = {1: 0, 2: 0}
    for _ in range(500):
        scene = shapes.sample_scene(rng)
        counts[len(scene)] += 1
        cells = [o.cell for o in scene]
        assert len(set(cells)) == len(cells)
        assert cells == sorted(cells)
    assert counts[1] > 150 and counts[2] > 150
    assert all(len(shapes.sample_scene(rng, 2)) == 2 for _ in range(200))


def test_make_scene_rejects_shared_cell_and_bad_counts():
    with pytest.raises(ValueError):
        shapes.make_scene([obj(), obj(color="red")])
    with pytest.raises(ValueError):
        shapes.make_scene([])
    with pytest.raises(ValueError):
        shapes.make_scene([obj(col=c) for c in shapes.COLUMNS])
    with pytest.raises(ValueError):
        obj(color="pink")


# Captions and parsing -----------------------------------------------------------


SPEC_EXAMPLE = "a small blue square at the top and a large green triangle at the bottom right"


def test_caption_spec_example_in_reading_order_regardless_of_input_order():
    a = obj("square", "small", "blue", "top", "center")
    b = obj("triangle", "large", "green", "bottom", "right")
    assert caption((a, b)) == caption((b, a)) == SPEC_EXAMPLE
    assert caption((obj("circle", "large", "red", "middle", "center"),)) == (
        "a large red circle at the center"
    )


def test_reading_order_is_row_first():
    right_of_top = obj(row="top", col="right", color="red")
    left_of_middle = obj(row="middle", col="left", color="green")
    assert caption((left_of_middle, right_of_top)) == (
        "a small red square at the top right and a small green square at the left"
    )


@pytest.mark.parametrize(
    ("cell", "phrase"),
    [
        (("top", "left"), "top left"),
        (("top", "center"), "top"),
        (("middle", "left"), "left"),
        (("middle", "center"), "center"),
        (("bottom", "center"), "bottom"),
        (("bottom", "right"), "bottom right"),
    ],
)
def test_position_phrases(cell, phrase):
    assert obj(row=cell[0], col=cell[1]).position == phrase


def test_parse_spec_example():
    assert parse(SPEC_EXAMPLE) == {
        ("small", "blue", "square", "top"),
        ("large", "green", "triangle", "bottom right"),
    }


def test_parse_caption_round_trip_500_scenes():
    rng = np.random.default_rng(1)
    for _ in range(500):
        scene = shapes.sample_scene(rng)
        text = caption(scene)
        assert parse(text) == {o.as_tuple() for o in scene}
        assert shapes.scene_from_caption(text) == scene


def test_parse_tolerates_surrounding_whitespace_and_final_period():
    expected = parse(SPEC_EXAMPLE)
    assert parse(f"  {SPEC_EXAMPLE}.\n") == expected
    assert parse(SPEC_EXAMPLE.replace(" and ", "  and   ")) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "garbage",
        "a small blue square",
        "a small blue square at the",
        "a small blue square at the top and",
        "a small blue square at the top and a large green",
        "a small blue square at the top please",
        "a small blue square at the top left right",
        "a small blue square at the middle",
        "a small pink square at the top",
        "a tiny blue square at the top",
        "a small blue hexagon at the top",
        "the small blue square at the top",
        "a small blue square on the top",
        "a blue small square at the top",
        "A small blue square at the top",
        "a small blue square at the top, a large red circle at the center",
        "a small blue square at the top , a large red circle at the center",
        "a small blue square at the top or a large red circle at the center",
        "a small blue square at the top and a large red circle at the center and "
        "a small red circle at the left",
        "a small blue square at the top..",
    ],
)
def test_parse_rejects_anything_off_grammar(text):
    assert parse(text) == frozenset()


def test_parse_accepts_unordered_pair_but_scene_from_caption_rejects_shared_cell():
    swapped = "a large green triangle at the bottom right and a small blue square at the top"
    assert parse(swapped) == parse(SPEC_EXAMPLE)
    same_cell = "a small blue square at the top and a large red circle at the top"
    assert len(parse(same_cell)) == 2
    assert shapes.scene_from_caption(same_cell) is None


# Scoring ------------------------------------------------------------------------


def test_score_all_exact():
    rng = np.random.default_rng(2)
    scenes = [shapes.sample_scene(rng) for _ in range(20)]
    result = score([caption(s) for s in scenes], scenes)
    assert result == {"exact_match": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "n": 20.0}


def test_score_partial_hand_computed():
    truths = [
        SPEC_EXAMPLE,
        "a small red circle at the top left and a large yellow square at the center",
        "a large orange triangle at the bottom",
        "a small purple circle at the right",
    ]
    predictions = [
        SPEC_EXAMPLE,  # 2 of 2
        "a small red circle at the top left",  # 1 of 1 predicted, 1 of 2 true
        "a small red circle at the top and a large orange triangle at the bottom",  # 1 of 2
        "a small purple circle at the",  # unparseable: empty set
    ]
    # true positives 4, predicted tuples 5, true tuples 6.
    result = score(predictions, truths)
    assert result["n"] == 4
    assert result["exact_match"] == pytest.approx(1 / 4)
    assert result["precision"] == pytest.approx(4 / 5)
    assert result["recall"] == pytest.approx(4 / 6)
    assert result["f1"] == pytest.approx(8 / 11)


def test_score_accepts_scenes_as_truth_and_handles_nothing_predicted():
    scene = (obj(),)
    assert score(["nonsense"], [scene]) == {
        "exact_match": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "n": 1.0,
    }
    with pytest.raises(ValueError):
        score(["a"], [])


# Read-back ----------------------------------------------------------------------


def single_object_scenes(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, num_objects=1) for _ in range(n)]


def test_read_back_clean_single_objects_all_correct():
    for scene in single_object_scenes(200, 3):
        (o,) = scene
        assert shapes.read_back(render(scene)) == (o.color, o.row, o.col)


def test_read_back_every_shape_size_color_cell():
    for o in (
        ShapeObject(shape, size, color, row, col)
        for shape in shapes.SHAPES
        for size in shapes.SIZES
        for color in COLORS
        for row in shapes.ROWS
        for col in shapes.COLUMNS
    ):
        assert shapes.read_back(render((o,))) == (o.color, o.row, o.col)


def test_read_back_with_gaussian_noise_sigma_10():
    rng = np.random.default_rng(4)
    for scene in single_object_scenes(200, 5):
        (o,) = scene
        noisy = render(scene).astype(np.float64) + rng.normal(0, 10, (64, 64, 3))
        image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        assert shapes.read_back(image) == (o.color, o.row, o.col)


def test_read_back_with_blur_and_jitter():
    rng = np.random.default_rng(6)
    for scene in single_object_scenes(100, 7):
        (o,) = scene
        image = render(scene, jitter=2, rng=rng).astype(np.float64)
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = sum(padded[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)) / 9
        assert shapes.read_back(np.rint(blurred).astype(np.uint8)) == (o.color, o.row, o.col)


def test_read_back_blank_image_is_none():
    assert shapes.read_back(np.full((64, 64, 3), 255, dtype=np.uint8)) is None


def truth_cells(scene):
    return frozenset((o.color, o.row, o.col) for o in scene)


def test_read_back_objects_clean_one_and_two_objects():
    rng = np.random.default_rng(8)
    for n in (1, 2):
        for _ in range(150):
            scene = shapes.sample_scene(rng, num_objects=n)
            assert shapes.read_back_objects(render(scene)) == truth_cells(scene)


def test_read_back_objects_noise_and_blur():
    rng = np.random.default_rng(9)
    for _ in range(150):
        scene = shapes.sample_scene(rng, num_objects=2)
        image = render(scene).astype(np.float64)
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = sum(padded[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)) / 9
        noisy = np.clip(np.rint(blurred + rng.normal(0, 10, (64, 64, 3))), 0, 255).astype(np.uint8)
        assert shapes.read_back_objects(noisy) == truth_cells(scene)


def test_read_back_objects_blank_and_wrong_colour():
    assert shapes.read_back_objects(np.full((64, 64, 3), 255, dtype=np.uint8)) == frozenset()
    scene = (ShapeObject("square", "large", "red", "top", "left"), ShapeObject("circle", "small", "blue", "bottom", "right"))
    image = render(scene)
    image[image[..., 2] == 220] = np.array(COLORS["green"], dtype=np.uint8)  # repaint the blue circle
    assert shapes.read_back_objects(image) == {("red", "top", "left"), ("green", "bottom", "right")}
    with pytest.raises(ValueError, match="expected"):
        shapes.read_back_objects(np.zeros((32, 32, 3), dtype=np.uint8))


# Datasets -----------------------------------------------------------------------


def test_make_dataset_deterministic_per_seed():
    a = shapes.make_dataset(30, seed=7, jitter=2)
    b = shapes.make_dataset(30, seed=7, jitter=2)
    c = shapes.make_dataset(30, seed=8, jitter=2)
    assert [t for _, t in a] == [t for _, t in b]
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert [t for _, t in a] != [t for _, t in c]
    for image, text in shapes.make_dataset(30, seed=9):
        scene = shapes.scene_from_caption(text)
        assert scene is not None and np.array_equal(image, render(scene))


# Shipped examples ---------------------------------------------------------------


def load_examples() -> dict[str, str]:
    return json.loads((EXAMPLES / "captions.json").read_text())


def test_shipped_examples_match_their_captions():
    captions = load_examples()
    assert sorted(captions) == [f"scene_{i:02d}.png" for i in range(8)]
    for name, text in captions.items():
        scene = shapes.scene_from_caption(text)
        assert scene is not None, text
        assert caption(scene) == text
        png = np.array(Image.open(EXAMPLES / name).convert("RGB"))
        np.testing.assert_array_equal(png, render(scene), err_msg=name)


def test_shipped_examples_cover_every_attribute_value():
    objects = [o for t in load_examples().values() for o in shapes.scene_from_caption(t) or ()]
    assert {o.shape for o in objects} == set(shapes.SHAPES)
    assert {o.size for o in objects} == set(shapes.SIZES)
    assert {o.color for o in objects} == set(COLORS)
    assert {o.position for o in objects} == set(shapes.POSITION_PHRASES.values())
    assert {len(shapes.scene_from_caption(t) or ()) for t in load_examples().values()} == {1, 2}


def test_make_examples_script_reproduces_shipped_examples(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_examples", REPO / "training" / "make_examples.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.write_examples(tmp_path) == load_examples()
    for name in load_examples():
        fresh = np.array(Image.open(tmp_path / name).convert("RGB"))
        shipped = np.array(Image.open(EXAMPLES / name).convert("RGB"))
        np.testing.assert_array_equal(fresh, shipped)
