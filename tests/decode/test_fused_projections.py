"""q/k/v and gate/up as one product each (vlv_engine.engine.fused_projections).

Bound: fp32 logits of the fused model equal the unfused model's to a relative error
< 1e-6 (only a product's blocking may differ), and its greedy tokens equal HF's."""

import copy

import torch
from decode_helpers import EOS, PAD, traced_decode_step

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder
from vlv_engine.engine.fused_projections import ProjectionSlice, fuse_projections
from vlv_engine.engine.generation import generate_reference


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


class _Block(torch.nn.Module):
    """Llama-style projections: three read one input, two another."""

    def __init__(self, k=48):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(k, n, bias=b) for n, b in
                                                 ((40, True), (16, True), (16, False)))
        self.gate_proj, self.up_proj = torch.nn.Linear(k, 64, bias=False), torch.nn.Linear(k, 64, bias=False)


def _blocks(seed=1):
    torch.manual_seed(seed)
    plain = _Block()
    fused = copy.deepcopy(plain)
    assert fuse_projections(fused) == 2
    return plain, fused


def test_each_member_gets_its_rows_in_any_call_order():
    plain, fused = _blocks()
    x, other = torch.randn(2, 3, 48), torch.randn(2, 3, 48)
    names = ("q_proj", "k_proj", "v_proj")
    with torch.no_grad():
        want = {n: getattr(plain, n)(x) for n in names}
        # the model's order, another order, a repeated call, a different input in between
        for order in (names, ("v_proj", "q_proj", "k_proj"), ("q_proj", "q_proj", "k_proj", "v_proj")):
            for n in order:
                assert rel_err(getattr(fused, n)(x), want[n]) < 1e-6, (order, n)
        assert rel_err(fused.k_proj(other), plain.k_proj(other)) < 1e-6
        assert rel_err(fused.q_proj(x), want["q_proj"]) < 1e-6
        assert rel_err(fused.k_proj(x), want["k_proj"]) < 1e-6
        assert rel_err(fused.up_proj(x), plain.up_proj(x)) < 1e-6
        # v has no bias of its own: its rows of the fused bias are zeros
        assert rel_err(fused.v_proj(other), plain.v_proj(other)) < 1e-6
    # the kept slices are dropped once every member has taken its own
    for n in names:
        getattr(fused, n)(x)
    assert fused.q_proj.group._state is None


def test_one_product_per_group_and_no_weight_stored_twice():
    plain, fused = _blocks(2)
    calls = []
    for name in ("qkv_proj", "gate_up_proj"):
        getattr(fused, name).register_forward_hook(lambda m, args, out, name=name: calls.append(name))
    with torch.no_grad():
        x = torch.randn(1, 48)
        fused.q_proj(x), fused.k_proj(x), fused.v_proj(x)
        fused.gate_proj(x), fused.up_proj(x)
    assert calls == ["qkv_proj", "gate_up_proj"]
    assert isinstance(fused.k_proj, ProjectionSlice) and not list(fused.k_proj.parameters())
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters()) + 16  # v's zero bias
    # a member's `weight` is a view of its rows of the fused weight
    assert fused.k_proj.weight.data_ptr() == fused.qkv_proj.weight[40:56].data_ptr()
    assert torch.equal(fused.k_proj.weight, plain.k_proj.weight)


def test_fusing_again_or_other_layers_changes_nothing():
    plain, fused = _blocks(3)
    assert fuse_projections(fused) == 0  # idempotent
    partial = _Block()
    del partial.v_proj
    partial.gate_proj = partial.gate_proj.double()
    assert fuse_projections(partial) == 0  # a group with a member missing, one in another dtype
    assert isinstance(partial.q_proj, torch.nn.Linear) and isinstance(partial.up_proj, torch.nn.Linear)


def test_state_dict_keeps_the_model_layout_and_loads_back():
    plain, fused = _blocks(4)
    want, got = plain.state_dict(), fused.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # views of the fused tensors, not copies
    assert got["k_proj.weight"].data_ptr() == fused.qkv_proj.weight[40:56].data_ptr()
    # an unfused state dict loads into the fused model (joined), strictly
    other = _Block()
    loaded = copy.deepcopy(fused)
    assert not loaded.load_state_dict(other.state_dict()).missing_keys
    x = torch.randn(2, 48)
    with torch.no_grad():
        assert rel_err(loaded.v_proj(x), other.v_proj(x)) < 1e-6
        assert rel_err(loaded.up_proj(x), other.up_proj(x)) < 1e-6


def test_fused_llm_gives_hf_logits_and_tokens(llm):
    fused = copy.deepcopy(llm)
    layers = llm.config.num_hidden_layers
    assert fuse_projections(fused) == 2 * layers
    g = torch.Generator().manual_seed(0)
    prefix = torch.randn(5, 8, llm.config.hidden_size, generator=g)
    with torch.no_grad():
        a, b = fused(inputs_embeds=prefix).logits, llm(inputs_embeds=prefix).logits
    assert rel_err(a, b) < 1e-6
    for beams in (1, 3):
        gen = GenerationConfig(max_new_tokens=12, num_beams=beams)
        want = generate_reference(llm, prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(StaticDecoder(fused).generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD), want)


def test_fused_llm_saves_and_loads_as_the_hf_model(llm, tmp_path):
    fused = copy.deepcopy(llm)
    fuse_projections(fused)
    fused.save_pretrained(tmp_path)
    back = type(llm).from_pretrained(tmp_path).eval()
    assert isinstance(back.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    ids = torch.randint(0, llm.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, llm(input_ids=ids).logits)


def test_compiled_token_step_traces_one_product_per_group(llm):
    """Dynamo traces the fused members' keep/take logic into one graph (fullgraph) holding
    4 products per layer (+ the lm_head), not 7: the fusion survives compilation."""
    fused = copy.deepcopy(llm)
    fuse_projections(fused)
    graphs, got, want = traced_decode_step(fused, llm)
    assert rel_err(got, want) < 1e-6
    assert len(graphs) == 1
    linears = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    assert len(linears) == 4 * llm.config.num_hidden_layers + 1


def test_engine_fuses_for_its_own_decoders_only(tiny):
    from vlv_engine.testing import tiny_engine

    attn = tiny.model.caption_decoder.llm.model.layers[0].self_attn
    assert tiny.decoder == "static" and isinstance(attn.q_proj, ProjectionSlice)
    reference = tiny_engine(seed=0, with_diffusion=False, decoder="reference")
    assert isinstance(reference.model.caption_decoder.llm.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_revision_does_not_see_the_fusion(tiny):
    """The batch manifest's revision hashes the state dict, which keeps the unfused layout:
    results made by an engine that fuses stay valid for one that does not, and back."""
    from vlv_engine.batch.revision import engine_revision
    from vlv_engine.testing import tiny_engine

    reference = tiny_engine(seed=0, decoder="reference")
    assert engine_revision(tiny) == engine_revision(reference)
