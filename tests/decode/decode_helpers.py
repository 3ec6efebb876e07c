"""Helpers of the decode-loop tests (imported by the test modules and conftest)."""

import torch

EOS, PAD = 3, 0  # the tiny word-level tokenizer's </s> and <pad>
NQ, HIDDEN = 8, 32  # the tiny preset's prefix length and LLM width


def prefixes(batch: int, seed: int) -> torch.Tensor:
    """Random prefixes [B, Nq, H]; the scale makes rows decode to different captions."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, NQ, HIDDEN, generator=g) * 3


def pad_after_eos(ids: torch.Tensor, eos: int = EOS, pad: int = PAD) -> torch.Tensor:
    """HF beam search fills the positions after EOS with `pad or eos` on a tensor (EOS when the
    pad id is 0); our convention is pad_token_id. Rewrite a reference output to it."""
    ids = ids.clone()
    for row in ids:
        hit = (row == eos).nonzero()
        if len(hit):
            row[int(hit[0]) + 1:] = pad
    return ids


def first_eos(ids: torch.Tensor, eos: int = EOS) -> list:
    """Index of each row's first EOS (None when the row has none)."""
    return [int((r == eos).nonzero()[0]) if (r == eos).any() else None for r in ids]


def traced_decode_step(llm, reference):
    """One decode step of `llm` under dynamo (fullgraph) with a backend that keeps the FX graph,
    beside the eager step of `reference`: (graphs, compiled logits, reference logits)."""
    from vlv_engine.engine.decode import StaticDecoder, decode_step

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        step = torch.compile(decode_step, backend=backend, fullgraph=True, dynamic=False)
        ids, pos = torch.tensor([[5], [7]]), torch.tensor([3])
        with torch.no_grad():
            got = step(llm, StaticDecoder(llm).cache(2, 16), ids, pos)
            want = decode_step(reference, StaticDecoder(reference).cache(2, 16), ids, pos)
    finally:
        torch._dynamo.reset()
    return graphs, got, want
