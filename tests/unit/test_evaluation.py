"""The Shapes World evaluation scores what it should."""

import numpy as np
from PIL import Image

from vlv_engine import shapes
from vlv_engine.evaluation import eval_scenes, evaluate_shapes


class _Oracle:
    """Reads scenes back from their own pixels: a perfect captioner and reconstructor."""

    class model:  # noqa: N801 - mimics Engine.model
        diffusion = object()

    def __init__(self, shift_cell: bool = False):
        self.shift_cell = shift_cell
        self._scenes = {}

    def _scene(self, image):
        return self._scenes[np.asarray(image).tobytes()]

    def caption(self, images, batch_size=None, **_):
        return [shapes.caption(self._scene(im)) for im in images]

    def reconstruct(self, images, **_):
        out = []
        for im in images:
            scene = self._scene(im)
            if self.shift_cell:
                o = scene[0]
                col = "right" if o.col != "right" else "left"
                scene = (shapes.ShapeObject(o.shape, o.size, o.color, o.row, col),)
            out.append(Image.fromarray(shapes.render(scene)))
        return out

    def learn(self, scenes):
        for s in scenes:
            self._scenes[shapes.render(s).tobytes()] = s


def test_eval_set_is_seeded_and_exact():
    assert eval_scenes(20, seed=5) == eval_scenes(20, seed=5)
    assert eval_scenes(20, seed=5) != eval_scenes(20, seed=6)
    assert all(len(s) == 1 for s in eval_scenes(30, seed=5, num_objects=1))


def test_perfect_model_scores_perfectly():
    oracle = _Oracle()
    oracle.learn(eval_scenes(50, 7) + eval_scenes(10, 8, num_objects=1))
    report = evaluate_shapes(oracle, num=50, seed=7, recon_num=10)
    assert report.caption["exact_match"] == 1.0 and report.caption["f1"] == 1.0
    assert report.reconstruction["color_and_cell"] == 1.0


def test_wrong_cell_is_caught():
    oracle = _Oracle(shift_cell=True)
    oracle.learn(eval_scenes(5, 7) + eval_scenes(10, 8, num_objects=1))
    report = evaluate_shapes(oracle, num=5, seed=7, recon_num=10)
    r = report.reconstruction
    assert r["color"] == 1.0 and r["cell"] == 0.0 and r["color_and_cell"] == 0.0


def test_runs_on_a_real_engine(tiny):
    report = evaluate_shapes(tiny, num=6, recon_num=2, steps=2)
    assert report.caption["n"] == 6 and report.reconstruction["n"] == 2
    assert 0.0 <= report.caption["f1"] <= 1.0


def test_scene_read_back_accuracy_scores_sets_of_colour_and_cell():
    from vlv_engine.evaluation import scene_read_back_accuracy

    scenes = eval_scenes(6, num_objects=2)
    images = [shapes.render(s) for s in scenes]
    assert scene_read_back_accuracy(images, scenes) == {"exact": 1.0, "precision": 1.0, "recall": 1.0, "n": 6.0}
    images[0] = np.full_like(images[0], 255)  # one blank image: two objects missed, none invented
    images[1] = shapes.render(scenes[1][:1])  # one object dropped
    got = scene_read_back_accuracy(images, scenes)
    assert got["exact"] == 4 / 6 and got["precision"] == 1.0 and got["recall"] == 9 / 12
    big = [np.kron(img, np.ones((2, 2, 1), dtype=np.uint8)) for img in images[2:]]  # 128 px: resized first
    assert scene_read_back_accuracy(big, scenes[2:])["exact"] == 1.0
