"""`vlv serve`: its flags reach the service settings; bad settings are usage errors."""

from __future__ import annotations

from vlv_engine import cli


def test_serve_flags_parse():
    args = cli.build_parser().parse_args(
        ["serve", "--model", "m", "--host", "0.0.0.0", "--port", "9000", "--max-batch-size", "32",
         "--max-delay-ms", "7.5", "--max-body-mb", "4", "--max-pixels", "1000000", "--timeout-s", "5",
         "--device", "cpu", "--dtype", "bf16", "--max-images", "8", "--max-queue", "64"])
    assert (args.model, args.host, args.port, args.max_batch_size, args.max_delay_ms, args.max_body_mb,
            args.max_pixels, args.timeout_s, args.dtype, args.max_images, args.max_queue) == \
        ("m", "0.0.0.0", 9000, 32, 7.5, 4.0, 1_000_000, 5.0, "bf16", 8, 64)
    assert args.func is cli.cmd_serve


def test_bad_settings_and_missing_model_are_usage_errors(tmp_path, capsys):
    assert cli.main(["serve", "--max-queue", "2", "--max-images", "4"]) == cli.EXIT_USAGE
    assert "max_queue (2) must be >= max_images (4)" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path / "nope")]) == cli.EXIT_USAGE
    assert "not found" in capsys.readouterr().err


def test_model_threads_default_leaves_a_core_for_http(monkeypatch):
    parse = cli.build_parser().parse_args
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 8)
    assert cli._serve_threads(parse(["serve"])) == 7
    assert cli._serve_threads(parse(["serve", "--threads", "3"])) == 3
    assert cli._serve_threads(parse(["serve", "--device", "cuda"])) is None
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 1)
    assert cli._serve_threads(parse(["serve"])) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli._serve_threads(parse(["serve"])) is None  # the environment's setting stands


def test_serve_package_imports_without_the_web_stack():
    import subprocess
    import sys

    code = ("import sys; import vlv_engine.serve; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
