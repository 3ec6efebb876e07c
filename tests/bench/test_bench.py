"""`vlv bench` (vlv_engine.bench): reports, timers, memory probes, pipelines, the CLI."""

import json

import pytest
import torch

from vlv_engine.bench.measure import PeakMemory, Timing, current_rss, time_calls
from vlv_engine.bench.report import Row, format_table, plot_throughput, write_json


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_row_ratio_is_the_fast_paths_advantage():
    assert Row("e2e", "captions/s", "cap/s", 8, fast=30.0, reference=10.0).ratio == pytest.approx(3.0)
    assert Row("e2e", "latency", "s", 1, fast=0.5, reference=1.5, better="lower").ratio == pytest.approx(3.0)
    assert Row("decode", "x", "ms", 1, fast=1.0, reference=None).ratio is None


def test_table_json_plot(tmp_path):
    rows = [Row("decode", "tokens/s", "tok/s", b, fast=10.0 * b, reference=4.0 * b, extra={"path": "fast"})
            for b in (1, 8)]
    rows.append(Row("e2e", "latency p50", "s", 1, fast=0.2, reference=0.5, better="lower"))
    table = format_table(rows)
    assert "| decode | tokens/s (tok/s) | 8 | 80.0 | 32.0 | 2.50x | path=fast |" in table
    assert "| e2e | latency p50 (s) | 1 | 0.2 | 0.5 | 2.50x |" in table
    path = write_json(tmp_path / "b.json", machine={"cpu": "x"}, options={}, rows=rows, skipped={"unet": "why"},
                      setup={})
    data = json.loads(path.read_text())
    assert data["results"][1]["ratio"] == pytest.approx(2.5) and data["skipped"] == {"unet": "why"}
    png = plot_throughput(tmp_path / "b.png", rows, "t")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timing_percentiles():
    t = Timing([float(i) for i in range(1, 101)])
    assert t.median == 50.5 and t.best == 1.0
    assert t.percentile(95) == 95.0 and t.percentile(50) == 50.0 and t.percentile(100) == 100.0
    calls = []
    timing = time_calls(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(timing.seconds) == 3


def test_peak_memory_sees_a_temporary_allocation():
    before = current_rss()
    assert before > 0
    with PeakMemory(torch.device("cpu"), interval=0.001) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
        import time

        time.sleep(0.05)
        del x
    assert mem.peak_rss - before > 48 * 2**20


def test_memory_bandwidth_is_measured():
    from vlv_engine.bench.machine import machine_info, memory_bandwidth

    bw = memory_bandwidth("cpu", nbytes=16 * 2**20, repeats=2)
    assert 1e8 < bw < 1e13
    info = machine_info("cpu")
    assert info["cores"] >= 1 and info["torch"] == torch.__version__ and info["gpu"] is None


def test_token_match():
    from vlv_engine.bench.pipelines import token_match

    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert token_match(a, a) == 1.0
    b = a.clone()
    b[0, 0] = 9
    assert token_match(a, b) == pytest.approx(7 / 8)
    assert token_match(a, a[:, :2]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_setup():
    from vlv_engine.bench.pipelines import build_setup

    return build_setup("tiny", compile_decoder=False, encoder_backend="eager")


def test_pipelines_fixed_length_and_exact_fp32(tiny_setup):
    from vlv_engine.bench.pipelines import caption_tokens, random_pixels

    s = tiny_setup
    pixels = random_pixels(s.reference, 3)
    gen = s.generation()
    fast = caption_tokens(s.fast, s.fast_decoder, pixels, gen, s.never_eos)
    ref = caption_tokens(s.reference, s.reference_decoder, pixels, gen, s.never_eos)
    assert fast.shape == ref.shape == (3, s.new_tokens)  # EOS suppressed in both: a fixed length
    assert torch.equal(fast, ref)  # unquantized fp32 fast path: the reference's tokens


def test_suites_on_tiny(tiny_setup):
    from vlv_engine.bench.decode import run_decode
    from vlv_engine.bench.e2e import run_e2e
    from vlv_engine.bench.encoder import run_encoder

    rows = run_decode(tiny_setup, [1, 2], repeats=1, bandwidth=1e10, schemes=["int8_dynamic"], compile=False)
    paths = {r.extra["path"] for r in rows if r.metric == "ms/token"}
    assert len(paths) == 2 and any(p.startswith("int8_dynamic") for p in paths)
    for r in rows:
        assert r.fast > 0 and r.reference > 0 and r.ratio > 0
    fast_rows = [r for r in rows if r.metric == "ms/token" and r.extra["path"].startswith("fast")]
    assert all(r.extra["token_match"] == 1.0 for r in fast_rows)
    # Teacher-forced agreement at the smallest batch only: exact for the fp32 fast path, a
    # finite SQNR for int8 dynamic (its logits differ).
    first = [r for r in rows if r.metric == "ms/token" and r.batch == 1]
    fast1 = next(r for r in first if r.extra["path"].startswith("fast"))
    assert fast1.extra["tf_top1"] == 1.0 and fast1.extra["logit_sqnr_db"] > 80
    int8 = next(r for r in first if r.extra["path"].startswith("int8_dynamic"))
    assert 0.0 <= int8.extra["tf_top1"] <= 1.0 and 5 < int8.extra["logit_sqnr_db"] < 80
    assert all("tf_top1" not in r.extra for r in rows if r.metric == "ms/token" and r.batch == 2)
    rows = run_encoder(tiny_setup, [1, 2], repeats=1)
    assert [r.metric for r in rows] == ["latency p50", "throughput", "throughput"]
    assert float(rows[0].extra["rel_err"]) < 1e-5
    rows = run_e2e(tiny_setup, [1, 2], repeats=2)
    assert {r.metric for r in rows} == {"captions/s", "latency p50", "latency p95"}
    assert all(r.extra["token_match"] == 1.0 for r in rows if r.metric == "captions/s")


def test_teacher_forced_logits_reproduce_greedy_tokens(tiny_setup):
    """Greedy tokens are the argmax of their own model's teacher-forced logits, position by
    position (an off-by-one in the feeding would shift every choice)."""
    from vlv_engine.bench.decode import logit_agreement, teacher_forced_logits
    from vlv_engine.config import GenerationConfig

    s = tiny_setup
    llm = s.reference_decoder.llm
    text = llm.config.get_text_config(decoder=True)
    prefix = torch.randn(3, s.reference.config.encoder.num_queries, text.hidden_size,
                         generator=torch.Generator().manual_seed(5)) * 3
    ids = s.reference_decoder.generate(prefix, GenerationConfig(max_new_tokens=9, num_beams=1),
                                       eos_token_id=s.never_eos, pad_token_id=0)
    logits = teacher_forced_logits(llm, prefix, ids)
    assert logits.shape == (3, 9, text.vocab_size) and logits.dtype == torch.float32
    assert torch.equal(logits.argmax(-1), ids)
    fast = teacher_forced_logits(s.fast_decoder.llm, prefix, ids)  # fused projections, its attention
    assert logit_agreement(fast, logits)["tf_top1"] == 1.0
    assert logit_agreement(logits, logits) == {"tf_top1": 1.0, "logit_sqnr_db": float("inf")}
    noisy = logits + 0.1 * logits.norm() / logits.numel() ** 0.5 * torch.randn(logits.shape)
    assert logit_agreement(noisy, logits)["logit_sqnr_db"] == pytest.approx(20.0, abs=0.3)


def test_decode_variants_run_as_the_fast_path_does(tiny_setup):
    """Extra decode rows copy the reference's LLM, which runs eager attention: each is set up
    as the fast path's LLM (its attention, fused projections), not as the reference's."""
    from vlv_engine.bench.decode import variant_decoders
    from vlv_engine.engine.decode_attention import NAME
    from vlv_engine.engine.fused_projections import ProjectionSlice

    assert tiny_setup.reference_decoder.llm.config._attn_implementation == "eager"
    decoders = variant_decoders(tiny_setup, ["none", "int8_dynamic"], torch.float32, compile=False)
    assert len(decoders) == 2  # "none" is the fast path itself here
    for decoder in decoders.values():
        assert decoder.llm.config._attn_implementation == NAME
        assert isinstance(decoder.llm.model.layers[0].mlp.up_proj, ProjectionSlice)


def test_cli_bench_nano_decode(tmp_path, capsys):
    from vlv_engine.cli import main

    rc = main(["bench", "--preset", "nano", "--suites", "decode", "preprocess", "--batch-sizes", "1", "--repeats",
               "1", "--new-tokens", "4", "--no-compile", "--threads", "1", "--out", str(tmp_path),
               "--decode-schemes", "int8_dynamic"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "machine:" in out and "copy bandwidth" in out and "| decode | tokens/s (tok/s) | 1 |" in out
    data = json.loads((tmp_path / "bench_nano.json").read_text())
    assert data["machine"]["memory_bandwidth_GBps"] > 0 and data["setup"]["new_tokens"] == 4
    assert {r["extra"].get("path", "").split(" ")[0] for r in data["results"]} >= {"fast", "int8_dynamic"}
    assert "preprocess" in data["results"][-1]["suite"] or "preprocess" in data["skipped"]


def test_decode_rows_reach_the_json_while_the_suite_runs(tmp_path):
    """A run stopped from outside (a device's time limit) keeps each decode row measured so
    far in its JSON, marked incomplete; a finished suite drops the mark."""
    from vlv_engine.bench.runner import BenchOptions, run_bench

    path = tmp_path / "bench_nano.json"
    seen = []

    def log(msg):
        if msg.startswith("decode: ms/token"):
            data = json.loads(path.read_text())
            seen.append(([r["extra"]["path"] for r in data["results"] if r["metric"] == "ms/token"],
                         data["skipped"].get("decode", "")))

    opts = BenchOptions(preset="nano", suites=("decode",), batch_sizes=(1,), repeats=1, new_tokens=4,
                        compile_decoder=False, out=tmp_path, decode_schemes=("int8_dynamic",), threads=1)
    result = run_bench(opts, log=log)
    assert len(seen) == 2
    assert len(seen[0][0]) == 1 and len(seen[1][0]) == 2 and seen[1][0][1].startswith("int8_dynamic")
    assert all(why.startswith("incomplete") for _, why in seen)
    final = json.loads(path.read_text())
    assert "decode" not in final["skipped"] and len(final["results"]) == len(result.rows) == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_bench_bad_input(capsys):
    from vlv_engine.cli import main

    assert main(["bench", "--preset", "nano", "--batch-sizes", "0"]) == 2
    assert "batch sizes must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--suites", "nope"])


def test_paper_preset_needs_a_gpu():
    from vlv_engine.bench.pipelines import build_setup

    with pytest.raises(ValueError, match="GPU only"):
        build_setup("paper", device="cpu")


def test_encoder_batch_size_reaches_the_fast_engine():
    from vlv_engine.bench.pipelines import build_setup

    setup = build_setup("tiny", compile_decoder=False, encoder_backend="eager", encoder_batch_size=1)
    assert setup.fast.encoder_batch_size == 1 and setup.notes["encoder_batch_size"] == 1


def test_the_setup_says_what_an_auto_encoder_scheme_took(monkeypatch):
    from vlv_engine.bench.pipelines import build_setup
    from vlv_engine.engine import encoder_quant

    monkeypatch.setattr(encoder_quant, "cpu_bf16_units", lambda: "amx")
    setup = build_setup("tiny", compile_decoder=False, encoder_backend="eager", encoder_quantize="auto")
    assert setup.fast.encoder_quantize == "bf16" and setup.notes["encoder_quantize"] == "bf16 (auto)"
    assert setup.reference.encoder_quantize is None
    setup = build_setup("tiny", compile_decoder=False, encoder_backend="eager", encoder_quantize="int8_dynamic")
    assert setup.notes["encoder_quantize"] == "int8_dynamic"
