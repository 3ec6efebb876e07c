"""Write the tiny random model as the bundled default (until a trained model replaces it).

    python training/bundle_tiny_default.py [--out vlv_engine/assets/default_model]

Its captions are words drawn by an untrained network: it exists so that every
entry point runs out of the box and the tests have a real folder to load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlv_engine.testing import tiny_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "vlv_engine" / "assets" / "default_model"
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tiny_engine(args.seed).save_pretrained(args.out)


if __name__ == "__main__":
    main()
