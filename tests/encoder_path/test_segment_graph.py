"""Per-bucket replay of the fixed-shape segment: buckets, padding, slicing back, buffer
reuse. The eager recorder replays on the CPU what a CUDA graph replays on a GPU."""

import pytest
import torch
from torch import nn

from vlv_engine.engine.segment_graph import (BucketedSegment, EagerRecording, bucket_for, eager_recorder, pad_rows,
                                             power_of_two_buckets)


def test_power_of_two_buckets():
    assert power_of_two_buckets(1) == (1,)
    assert power_of_two_buckets(8) == (1, 2, 4, 8)
    assert power_of_two_buckets(6) == (1, 2, 4, 6)
    with pytest.raises(ValueError, match="max_batch"):
        power_of_two_buckets(0)


def test_bucket_for():
    buckets = (1, 2, 4, 6)
    assert [bucket_for(n, buckets) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError, match="exceeds the largest bucket 6"):
        bucket_for(7, buckets)


def test_pad_rows():
    x = torch.randn(3, 5, 2)
    assert pad_rows(x, 3) is x
    p = pad_rows(x, 4)
    assert p.shape == (4, 5, 2) and torch.equal(p[:3], x) and not p[3].any()


class Recorder:
    """eager_recorder that remembers each recording (and the inputs each replay saw)."""

    def __init__(self):
        self.recordings, self.seen = [], []

    def __call__(self, segment, static_input):
        def spy(x):
            self.seen.append(x.clone())
            return segment(x)

        rec = EagerRecording(spy, static_input)
        self.recordings.append(rec)
        return rec


@pytest.fixture
def segment():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 5)).eval()
    return lambda x: net(x).cumsum(dim=1)  # [b, L, 6] -> [b, L, 5]; rows never mix


def test_matches_the_segment_for_every_size(segment):
    rec = Recorder()
    runner = BucketedSegment(segment, (1, 2, 4), rec)
    for n in (3, 1, 4, 2, 3, 9, 1):  # 9: above the largest bucket, in chunks of 4
        x = torch.randn(n, 7, 6)
        out = runner(x)
        with torch.no_grad():
            ref = segment(x)
        assert out.shape == (n, 7, 5)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # One recording per bucket, made on its first use, then only replayed.
    assert sorted(r.static_input.shape[0] for r in rec.recordings) == [1, 2, 4]


def test_static_buffers_are_reused_and_padding_is_zero(segment):
    rec = Recorder()
    runner = BucketedSegment(segment, (1, 4), rec)
    a = torch.randn(4, 7, 6)
    runner(a)
    static = runner._inputs[4]
    b = torch.randn(3, 7, 6)
    out = runner(b)
    assert runner._inputs[4] is static and len(rec.recordings) == 1  # bucket 4 only
    last = rec.seen[-1]  # what the replay ran on: b, then a zero row (not a's last row)
    assert torch.equal(last[:3], b) and not last[3].any()
    with torch.no_grad():
        torch.testing.assert_close(out, segment(b), rtol=1e-6, atol=1e-6)


def test_outputs_do_not_alias_the_static_buffer(segment):
    runner = BucketedSegment(segment, (2,), eager_recorder)
    x1, x2 = torch.randn(2, 7, 6), torch.randn(2, 7, 6)
    out1 = runner(x1)
    kept = out1.clone()
    runner(x2)  # the replay overwrites the static output
    assert torch.equal(out1, kept)


def test_input_contract_is_checked(segment):
    runner = BucketedSegment(segment, (2,), eager_recorder)
    runner(torch.randn(2, 7, 6))
    with pytest.raises(ValueError, match=r"recorded for inputs \(7, 6\)"):
        runner(torch.randn(2, 8, 6))
    with pytest.raises(ValueError, match="increasing positive"):
        BucketedSegment(segment, (4, 2), eager_recorder)


def test_cuda_recorder_refuses_cpu_tensors(segment):
    from vlv_engine.engine.segment_graph import cuda_graph_recorder

    with pytest.raises(ValueError, match="CUDA graphs capture CUDA work"):
        cuda_graph_recorder(segment, torch.randn(2, 7, 6))
