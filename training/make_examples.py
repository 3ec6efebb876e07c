"""Render the fixed Shapes World evaluation examples shipped in vlv_engine/assets/examples.

The eight scenes are chosen by hand rather than sampled so that, together, they
cover every shape, size, colour and position at least once, and so that the set
never changes when the sampler does.  They use exact centres (evaluation images).

    python training/make_examples.py [--out DIR]

(needs ``vlv_engine`` importable: install the project or set PYTHONPATH to the repo root)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from vlv_engine import shapes

EXAMPLE_CAPTIONS: tuple[str, ...] = (
    "a large red circle at the center",
    "a small blue square at the top and a large green triangle at the bottom right",
    "a small yellow triangle at the top left",
    "a large purple square at the left and a small orange circle at the bottom",
    "a small green circle at the top right and a large orange triangle at the right",
    "a large blue triangle at the bottom left",
    "a small red triangle at the center and a large yellow square at the bottom left",
    "a small purple circle at the top and a large blue square at the bottom right",
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "vlv_engine" / "assets" / "examples"


def write_examples(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    captions: dict[str, str] = {}
    for index, text in enumerate(EXAMPLE_CAPTIONS):
        scene = shapes.scene_from_caption(text)
        if scene is None:
            raise ValueError(f"example caption is not a valid scene: {text!r}")
        name = f"scene_{index:02d}.png"
        Image.fromarray(shapes.render(scene)).save(out / name)
        # Store the canonical caption, so the JSON is exactly what caption() emits.
        captions[name] = shapes.caption(scene)
    (out / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
    return captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    write_examples(args.out)


if __name__ == "__main__":
    main()
