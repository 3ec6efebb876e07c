"""Smoke trainings of both stages on the tiny preset: loss, checkpoints, exact resume, DDP."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vlv_engine import Engine
from vlv_training.config import load_config
from vlv_training.trainer import train


def _cfg(tmp_path, stage, **over):
    sets = [f"stage={stage}", "init=tiny", f"out_dir={tmp_path / stage}", "steps=4", "batch_size=4",
            "log_every=1", "save_every=2", "optim.lr=1e-3", "optim.warmup_steps=1", "data.num_samples=64"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, sets)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["vae", "teacher", "stage1", "stage2"])
def test_smoke_training_writes_everything(tmp_path, stage):
    cfg = _cfg(tmp_path, stage)
    summary = train(cfg, progress=False)
    run = tmp_path / stage
    assert summary["step"] == 4 and torch.isfinite(torch.tensor(summary["loss"]))
    assert len(_losses(run)) == 4
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000002", "step_000004"]
    assert (run / "loss.png").stat().st_size > 1000
    engine = Engine.from_pretrained(run / "model")  # the engine's own format
    assert len(engine.caption([torch.zeros(3, 32, 32, dtype=torch.uint8)])) == 1
    if stage in ("teacher", "stage1"):
        # Latents are cached per sample key: with 64 samples and 16 draws, some repeat or not,
        # but every miss was encoded exactly once.
        assert summary["latent_cache"]["misses"] <= 16


def test_trainable_groups_follow_the_stage(tmp_path):
    from vlv_training.modeling import build_model, set_trainable

    model = build_model("tiny").model
    names = [n for n, _ in set_trainable(model, _cfg(tmp_path, "stage1").trainable_groups)]
    assert any(n.startswith("encoder.florence.language_model.") for n in names)
    assert "encoder.query_embed" in names
    assert not any(n.startswith(("encoder.florence.vision_tower", "bottleneck.", "diffusion.",
                                 "caption_decoder.")) for n in names)
    names = [n for n, _ in set_trainable(model, _cfg(tmp_path, "stage2").trainable_groups)]
    assert all(n.startswith("caption_decoder.") for n in names) and names


@pytest.mark.parametrize("stage", ["teacher", "stage1", "stage2"])
def test_resume_continues_the_same_loss_curve_bit_exactly(tmp_path, stage):
    straight = _cfg(tmp_path / "a", stage)
    train(straight, progress=False)
    run_a = tmp_path / "a" / stage

    resumed = _cfg(tmp_path / "b", stage)
    train(resumed, progress=False)
    run_b = tmp_path / "b" / stage
    # Simulate a crash right after the step-2 checkpoint: drop what came later.
    shutil.rmtree(run_b / "checkpoints" / "step_000004")
    shutil.rmtree(run_b / "model")
    lines = (run_b / "metrics.jsonl").read_text().splitlines()[:2]
    (run_b / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train(resumed, progress=False)

    assert _losses(run_b) == _losses(run_a)
    wa = load_file(str(run_a / "checkpoints" / "step_000004" / "weights.safetensors"))
    wb = load_file(str(run_b / "checkpoints" / "step_000004" / "weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_config_files_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("stage: stage2\nsteps: 7\noptim:\n  lr: 0.001\n")
    (tmp_path / "c.toml").write_text('stage = "stage2"\nsteps = 7\n[optim]\nlr = 0.001\n')
    a = load_config(tmp_path / "c.yaml", ["optim.betas=[0.9, 0.95]", "data.seed=3"])
    b = load_config(tmp_path / "c.toml", ["optim.betas=[0.9, 0.95]", "data.seed=3"])
    assert a == b and a.optim.betas == (0.9, 0.95) and a.data.seed == 3 and a.steps == 7
    with pytest.raises(ValueError, match="unknown config field"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="trainable"):
        load_config(None, ["trainable=[everything]"])


def test_two_process_ddp_step(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vlv_engine.cli", "train", "stage2", "--quiet",
           "--set", "init=tiny", "--set", f"out_dir={tmp_path / 'ddp'}", "--set", "steps=2",
           "--set", "batch_size=2", "--set", "log_every=1", "--set", "save_every=2",
           "--set", "data.num_samples=32"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_losses(tmp_path / "ddp")) == 2
    assert (tmp_path / "ddp" / "model" / "vlv.json").is_file()


def test_time_budget_stops_early_and_a_rerun_finishes(tmp_path):
    cfg = _cfg(tmp_path, "stage2", steps=50, save_every=100, max_minutes=0.0)
    first = train(cfg, progress=False)
    assert not first["complete"] and first["step"] == 0
    cfg = _cfg(tmp_path, "stage2", steps=3, save_every=100, max_minutes=5)
    done = train(cfg, progress=False)
    assert done["complete"] and (tmp_path / "stage2" / "model" / "vlv.json").is_file()


def test_min_snr_weights_favour_noisy_steps():
    from diffusers import DDPMScheduler

    from vlv_training.losses import snr_weights

    sched = DDPMScheduler(num_train_timesteps=1000)
    w = snr_weights(sched, torch.tensor([0, 500, 999]), "min_snr", 5.0)
    assert w[0] < w[1] <= w[2] <= 1.0 + 1e-6  # low-noise steps (huge SNR) are down-weighted
    assert snr_weights(sched, torch.tensor([3]), "none", 5.0) is None


def test_cosine_with_a_warm_restart_is_the_schedule_of_an_extended_run():
    """cycle_ends=[3000] at 7,000 steps: the first 3,000 steps follow a 3,000-step cosine,
    then the lr jumps to the 7,000-step cosine's value, as when a finished 3,000-step run
    is resumed under steps=7000."""
    from vlv_training.config import load_config
    from vlv_training.trainer import lr_lambda

    over = ["optim.warmup_steps=500", "optim.min_lr_ratio=0.1"]
    restart = lr_lambda(load_config(None, ["steps=7000", "optim.cycle_ends=[3000]", *over]))
    short = lr_lambda(load_config(None, ["steps=3000", *over]))
    long = lr_lambda(load_config(None, ["steps=7000", *over]))
    for step in (0, 499, 500, 1500, 2999):
        assert restart(step) == short(step)
    for step in (3000, 4000, 6999):
        assert restart(step) == long(step)
    assert restart(2999) < 0.11 and abs(restart(3000) - 0.705) < 0.005  # the jump: 5e-5 -> ~3.5e-4 at lr 5e-4
    with pytest.raises(ValueError, match="not a number|invalid literal"):
        load_config(None, ["optim.cycle_ends=[soon]"])
    same = lr_lambda(load_config(None, ["steps=7000", "optim.horizons=[[3000, 3000]]", *over]))
    assert all(same(s) == restart(s) for s in range(0, 7000, 97))


def test_a_long_horizon_first_keeps_the_lr_near_its_peak():
    """horizons=[[1298, 20000]] at 3,000 steps: a run begun under steps=20000 and resumed at
    step 1,298 with steps=3000 (the bundled nano teacher's history)."""
    from vlv_training.config import load_config
    from vlv_training.trainer import lr_lambda

    over = ["optim.warmup_steps=500", "optim.min_lr_ratio=0.1"]
    held = lr_lambda(load_config(None, ["steps=3000", "optim.horizons=[[1298, 20000]]", *over]))
    long = lr_lambda(load_config(None, ["steps=20000", *over]))
    short = lr_lambda(load_config(None, ["steps=3000", *over]))
    for step in (0, 499, 800, 1297):
        assert held(step) == long(step)
    for step in (1298, 2000, 2999):
        assert held(step) == short(step)
    assert held(1297) > 0.99 and abs(held(1298) - 0.80) < 0.01
    with pytest.raises(ValueError, match="pairs"):
        load_config(None, ["optim.horizons=[[1298]]"])


def test_ema_follows_the_warmed_up_decay_and_loads_back():
    from vlv_training.ema import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.9)
    expected = torch.zeros(3)
    for value in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0):
        with torch.no_grad():
            p.fill_(value)
        d = min(0.9, (1 + ema.updates) / (10 + ema.updates))
        expected = d * expected + (1 - d) * value
        ema.update()
    assert torch.allclose(ema.shadow["w"], expected) and ema.updates == 7
    assert not torch.allclose(ema.shadow["w"], p.detach())
    tensors, meta = ema.state()
    other = EMA([("w", torch.nn.Parameter(torch.ones(3)))], decay=0.9)
    other.load(tensors, meta)
    assert torch.equal(other.shadow["w"], ema.shadow["w"]) and other.updates == 7
    ema.copy_to_params()
    assert torch.equal(p.detach(), ema.shadow["w"])
    with pytest.raises(ValueError, match="lacks"):
        other.load({}, meta)
    with pytest.raises(ValueError, match="ema_decay"):
        EMA([("w", p)], decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        load_config(None, ["ema_decay=1.5"])


def test_ema_run_saves_the_average_and_resumes_bit_exactly(tmp_path):
    straight = _cfg(tmp_path / "a", "teacher", ema_decay=0.9)
    train(straight, progress=False)
    run_a = tmp_path / "a" / "teacher"
    last = run_a / "checkpoints" / "step_000004"
    raw, avg = load_file(str(last / "weights.safetensors")), load_file(str(last / "ema.safetensors"))
    assert raw.keys() == avg.keys() and any(not torch.equal(raw[k], avg[k]) for k in raw)
    # The model folder holds the average, not the last step's weights.
    model = Engine.from_pretrained(run_a / "model").model
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], avg[k]) for k in avg)

    resumed = _cfg(tmp_path / "b", "teacher", ema_decay=0.9)
    train(resumed, progress=False)
    run_b = tmp_path / "b" / "teacher"
    shutil.rmtree(run_b / "checkpoints" / "step_000004")
    shutil.rmtree(run_b / "model")
    train(resumed, progress=False)
    avg_b = load_file(str(run_b / "checkpoints" / "step_000004" / "ema.safetensors"))
    assert all(torch.equal(avg[k], avg_b[k]) for k in avg)

    # A run without an average cannot silently resume into one that keeps it.
    plain = _cfg(tmp_path / "c", "teacher", steps=2)
    train(plain, progress=False)
    with pytest.raises(ValueError, match="no average"):
        train(_cfg(tmp_path / "c", "teacher", ema_decay=0.9), progress=False)
