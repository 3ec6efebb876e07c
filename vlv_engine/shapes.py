"""Shapes World v1: the synthetic world the bundled nano model is trained and scored on.

This module is the executable form of ``docs/shapes-world.md``: it samples scenes,
renders them, writes and parses captions, and scores predicted captions.  Training
and evaluation both go through it so the two can never disagree about the world.

Rendering works in doubled coordinates (every length times two).  Pixel centres
(x + 0.5) and half extents (d / 2) then become integers, so every inclusion test is
exact integer arithmetic and no float rounding can move a pixel across an edge.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUND",
    "CANVAS",
    "CELL_CENTERS",
    "COLORS",
    "COLUMNS",
    "POSITION_PHRASES",
    "ROWS",
    "SHAPES",
    "SIZES",
    "ObjectTuple",
    "Scene",
    "ShapeObject",
    "caption",
    "make_dataset",
    "make_scene",
    "parse",
    "read_back",
    "read_back_objects",
    "render",
    "sample_scene",
    "scene_from_caption",
    "score",
]

CANVAS = 64
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 12, "large": 20}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "center", "right")
# Shared by rows (centre y) and columns (centre x): the grid is symmetric.
CELL_CENTERS: tuple[int, ...] = (11, 32, 53)

POSITION_PHRASES: dict[tuple[str, str], str] = {
    ("top", "left"): "top left",
    ("top", "center"): "top",
    ("top", "right"): "top right",
    ("middle", "left"): "left",
    ("middle", "center"): "center",
    ("middle", "right"): "right",
    ("bottom", "left"): "bottom left",
    ("bottom", "center"): "bottom",
    ("bottom", "right"): "bottom right",
}
_CELL_OF_PHRASE: dict[str, tuple[str, str]] = {p: cell for cell, p in POSITION_PHRASES.items()}

ObjectTuple = tuple[str, str, str, str]
"""(size, color, shape, position): the unit that captions are scored on."""


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    size: str
    color: str
    row: str
    col: str

    def __post_init__(self) -> None:
        # Fail at construction so a bad object never reaches render or caption.
        for value, allowed, name in (
            (self.shape, SHAPES, "shape"),
            (self.size, tuple(SIZES), "size"),
            (self.color, tuple(COLORS), "color"),
            (self.row, ROWS, "row"),
            (self.col, COLUMNS, "col"),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def cell(self) -> tuple[int, int]:
        """(row index, column index); sorting by it gives reading order."""
        return ROWS.index(self.row), COLUMNS.index(self.col)

    @property
    def position(self) -> str:
        return POSITION_PHRASES[(self.row, self.col)]

    @property
    def center(self) -> tuple[int, int]:
        """Exact (cx, cy) in pixels."""
        r, c = self.cell
        return CELL_CENTERS[c], CELL_CENTERS[r]

    def as_tuple(self) -> ObjectTuple:
        return (self.size, self.color, self.shape, self.position)


Scene = tuple[ShapeObject, ...]
"""1 or 2 objects in distinct cells, in reading order (see ``make_scene``)."""


def make_scene(objects: Iterable[ShapeObject]) -> Scene:
    """Validate objects and put them in reading order, the canonical scene form."""
    scene = tuple(sorted(objects, key=lambda o: o.cell))
    if not 1 <= len(scene) <= 2:
        raise ValueError(f"a scene holds 1 or 2 objects, got {len(scene)}")
    if len({o.cell for o in scene}) != len(scene):
        raise ValueError("objects of a scene must sit in distinct cells")
    return scene


def sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """Draw a scene uniformly: object count, cells (without replacement), attributes."""
    if num_objects is None:
        num_objects = int(rng.integers(1, 3))
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    cells = rng.choice(len(ROWS) * len(COLUMNS), size=num_objects, replace=False)
    objects = []
    for cell in cells:
        r, c = divmod(int(cell), len(COLUMNS))
        objects.append(
            ShapeObject(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                size=tuple(SIZES)[int(rng.integers(len(SIZES)))],
                color=tuple(COLORS)[int(rng.integers(len(COLORS)))],
                row=ROWS[r],
                col=COLUMNS[c],
            )
        )
    return make_scene(objects)


# Doubled pixel-centre coordinates: 2 * (i + 0.5) = 2i + 1.
_X2 = (2 * np.arange(CANVAS) + 1)[None, :]  # [1, W]
_Y2 = (2 * np.arange(CANVAS) + 1)[:, None]  # [H, 1]


def _mask(shape: str, cx2: int, cy2: int, d: int) -> np.ndarray:
    """Boolean [H, W] mask of pixels whose centre lies in the shape.

    ``cx2``/``cy2`` are the doubled centre, so ``d`` is also the doubled half extent.
    The triangle includes its edges (inside-or-on-edge).  With integer centres no
    pixel centre ever lies exactly on any edge of any shape (the parities differ),
    so the boundary choices of the spec and this one never change a pixel.
    """
    dx = _X2 - cx2
    dy = _Y2 - cy2
    if shape == "circle":
        return dx * dx + dy * dy <= d * d
    if shape == "square":
        return (dx >= -d) & (dx < d) & (dy >= -d) & (dy < d)
    if shape == "triangle":
        # Apex (cx, cy - d/2), base at y = cy + d/2; each side widens 1/2 px per px down.
        return (2 * np.abs(dx) <= dy + d) & (dy <= d)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, jitter: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render a scene to a uint8 [64, 64, 3] RGB image.

    ``jitter`` moves each centre by an integer offset in [-jitter, jitter] in x and y
    (the spec allows up to 2 for training); integer offsets keep the exact-edge
    property of ``_mask``.  Jittered large objects in adjacent cells can touch;
    later objects in reading order are painted over earlier ones.
    """
    if jitter < 0:
        raise ValueError("jitter must be >= 0")
    if jitter and rng is None:
        raise ValueError("jitter needs an rng")
    image = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene:
        cx, cy = obj.center
        if jitter and rng is not None:
            ox, oy = rng.integers(-jitter, jitter + 1, size=2)
            cx, cy = cx + int(ox), cy + int(oy)
        image[_mask(obj.shape, 2 * cx, 2 * cy, SIZES[obj.size])] = COLORS[obj.color]
    return image


def caption(scene: Scene) -> str:
    """The ground-truth caption, objects in reading order whatever the input order."""
    ordered = sorted(scene, key=lambda o: o.cell)
    return " and ".join(f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in ordered)


def _parse_phrase(tokens: Sequence[str], i: int) -> tuple[ObjectTuple, int] | None:
    """Parse ``a SIZE COLOR SHAPE at the POSITION`` from tokens[i:]; return (tuple, next i)."""
    if len(tokens) < i + 7:
        return None
    a, size, color, shape, at, the = tokens[i : i + 6]
    if (a, at, the) != ("a", "at", "the"):
        return None
    if size not in SIZES or color not in COLORS or shape not in SHAPES:
        return None
    # Two-word phrases first: "top" alone is a position but "top left" must win.
    two = " ".join(tokens[i + 6 : i + 8])
    if len(tokens) >= i + 8 and two in _CELL_OF_PHRASE:
        return (size, color, shape, two), i + 8
    if tokens[i + 6] in _CELL_OF_PHRASE:
        return (size, color, shape, tokens[i + 6]), i + 7
    return None


def _parse_objects(text: str) -> list[ObjectTuple] | None:
    """Parse 1 or 2 object phrases; None unless the whole caption fits the grammar.

    Tolerated: surrounding whitespace, runs of internal whitespace, one final period.
    Everything else (case, extra words, a third object) is a parse failure.
    """
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    tokens = text.split()
    first = _parse_phrase(tokens, 0)
    if first is None:
        return None
    obj, i = first
    if i == len(tokens):
        return [obj]
    if tokens[i] != "and":
        return None
    second = _parse_phrase(tokens, i + 1)
    if second is None or second[1] != len(tokens):
        return None
    return [obj, second[0]]


def parse(text: str) -> frozenset[ObjectTuple]:
    """The set of (size, color, shape, position) tuples of a caption; empty if it does not parse.

    Order and cell collisions are not checked: scoring is over sets, and a model that
    swaps the order of two correct objects is still correct.
    """
    objects = _parse_objects(text)
    return frozenset(objects) if objects is not None else frozenset()


def scene_from_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None if it does not parse or is not a valid scene."""
    objects = _parse_objects(text)
    if objects is None:
        return None
    scene = []
    for size, color, shape, position in objects:
        row, col = _CELL_OF_PHRASE[position]
        scene.append(ShapeObject(shape=shape, size=size, color=color, row=row, col=col))
    try:
        return make_scene(scene)
    except ValueError:
        return None


def _truth_set(truth: Scene | str) -> frozenset[ObjectTuple]:
    if isinstance(truth, str):
        return parse(truth)
    return frozenset(o.as_tuple() for o in truth)


def score(predictions: Sequence[str], truths: Sequence[Scene | str]) -> dict[str, float]:
    """Exact match and micro-averaged object precision/recall/F1 over a test set.

    Micro averaging (tuples pooled over all images) is the spec's "tuple-level" F1.
    Precision is 0 when nothing at all was predicted, and F1 is 0 when P + R is 0.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
    exact = true_pos = n_pred = n_true = 0
    for prediction, truth in zip(predictions, truths):
        pred_set, true_set = parse(prediction), _truth_set(truth)
        exact += pred_set == true_set
        true_pos += len(pred_set & true_set)
        n_pred += len(pred_set)
        n_true += len(true_set)
    n = len(predictions)
    precision = true_pos / n_pred if n_pred else 0.0
    recall = true_pos / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "exact_match": exact / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n": float(n),
    }


_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [6, 3]
_CENTERS = np.array(CELL_CENTERS, dtype=np.float32)  # [3]


def read_back(
    image: np.ndarray, threshold: float = 80.0, min_pixels: int = 8
) -> tuple[str, str, str] | None:
    """Read (color, row, col) off a single-object image, or None if there is no object.

    Meant for scoring reconstructions, which are blurry and noisy: a pixel is
    foreground when its RGB distance from white exceeds ``threshold`` (every palette
    colour is more than 200 away, sigma-10 noise on white rarely exceeds 40), the
    colour is the majority vote of nearest palette colours over the foreground, and
    the cell is the one whose centre is nearest the foreground centroid.
    """
    if image.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"expected a [{CANVAS}, {CANVAS}, 3] image, got {image.shape}")
    pixels = image.astype(np.float32)  # [H, W, 3]
    foreground = np.linalg.norm(pixels - np.float32(255.0), axis=-1) > threshold  # [H, W]
    ys, xs = np.nonzero(foreground)
    if len(ys) < min_pixels:
        return None
    fg = pixels[ys, xs]  # [N, 3]
    nearest = np.argmin(((fg[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1), axis=1)  # [N]
    color = tuple(COLORS)[int(np.bincount(nearest, minlength=len(COLORS)).argmax())]
    row = ROWS[int(np.abs(_CENTERS - (ys.mean() + 0.5)).argmin())]
    col = COLUMNS[int(np.abs(_CENTERS - (xs.mean() + 0.5)).argmin())]
    return color, row, col


def read_back_objects(
    image: np.ndarray, threshold: float = 80.0, min_pixels: int = 40
) -> frozenset[tuple[str, str, str]]:
    """Read the set of (color, row, col) off an image with any number of objects.

    Foreground as in :func:`read_back`; each foreground pixel belongs to the cell whose
    centre is nearest (objects never straddle a cell, at most 20 px in 21-px cells), and a
    cell holding ``min_pixels`` or more is an object of its majority colour. The smallest
    object (a small triangle) paints 72 pixels, so a blurred one still counts, while
    scattered noise pixels and a blurred neighbour's edge do not.
    """
    if image.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"expected a [{CANVAS}, {CANVAS}, 3] image, got {image.shape}")
    pixels = image.astype(np.float32)
    foreground = np.linalg.norm(pixels - np.float32(255.0), axis=-1) > threshold
    ys, xs = np.nonzero(foreground)
    if len(ys) == 0:
        return frozenset()
    rows = np.abs(_CENTERS[None, :] - (ys[:, None] + 0.5)).argmin(1)
    cols = np.abs(_CENTERS[None, :] - (xs[:, None] + 0.5)).argmin(1)
    nearest = np.argmin(((pixels[ys, xs][:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1), axis=1)
    found = set()
    for cell in np.unique(rows * 3 + cols):
        members = (rows * 3 + cols) == cell
        if members.sum() < min_pixels:
            continue
        color = tuple(COLORS)[int(np.bincount(nearest[members], minlength=len(COLORS)).argmax())]
        found.add((color, ROWS[int(cell) // 3], COLUMNS[int(cell) % 3]))
    return frozenset(found)


def make_dataset(n: int, seed: int, jitter: int = 0) -> list[tuple[np.ndarray, str]]:
    """``n`` (image, caption) pairs, identical for identical (n, seed, jitter)."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n):
        scene = sample_scene(rng)
        data.append((render(scene, jitter=jitter, rng=rng), caption(scene)))
    return data
