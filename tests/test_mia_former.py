"""MIA-Former: full-gate equivalence, masked == sliced execution, skipped work is really skipped."""

from __future__ import annotations

import pytest
import timm
import torch

import miarobust.models  # noqa: F401

PAIRS = [("vit_fmnist", "mia_vit_fmnist", {}), ("deit_s", "mia_deit_s", {}),
         ("vit_fmnist", "mia_vit_fmnist", {"init_values": 0.1})]  # layer scale: blocks not `_plain`


def pair(static_name: str, mia_name: str, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    static = timm.create_model(static_name, **kwargs).eval()
    mia = timm.create_model(mia_name, **kwargs).eval()
    mia.load_state_dict(static.state_dict(), strict=False)
    c, h, w = static.pretrained_cfg["input_size"]
    return static, mia, torch.randn(3, c, h, w)


def randomise_controller(mia: torch.nn.Module, bias: float = 0.3, std: float = 0.5) -> None:
    for head in mia.controller:
        for lin in (head.cls, head.tokens):
            torch.nn.init.normal_(lin.weight, std=std)
            torch.nn.init.constant_(lin.bias, bias)


@pytest.mark.parametrize("static_name,mia_name,kwargs", PAIRS)
def test_full_gate_mode_equals_static(static_name, mia_name, kwargs) -> None:
    static, mia, x = pair(static_name, mia_name, kwargs)
    mia.set_gate_mode("full")
    with torch.no_grad():
        assert (mia(x) - static(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("static_name,mia_name,kwargs", PAIRS)
@pytest.mark.parametrize("execution", ["masked", "sliced"])
def test_open_gates_through_gated_execution_equal_static(static_name, mia_name, kwargs, execution) -> None:
    static, mia, x = pair(static_name, mia_name, kwargs)
    randomise_controller(mia, bias=50.0, std=0.0)  # every gate open, but through the gated code paths
    mia.set_gate_mode("deterministic").execution = execution
    with torch.no_grad():
        assert (mia(x) - static(x)).abs().max().item() <= 1e-5
        assert (mia(x[:1]) - static(x[:1])).abs().max().item() <= 1e-5  # batch 1: its own code path


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_masked_and_sliced_agree_on_random_gates(seed: int) -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {}, seed)
    randomise_controller(mia)
    mia.set_gate_mode("deterministic")
    outs = {}
    with torch.no_grad():
        for execution in ("masked", "sliced"):
            mia.execution = execution
            outs[execution] = (mia(x), mia.last.macs.clone())
    assert (outs["masked"][0] - outs["sliced"][0]).abs().max().item() <= 1e-5
    assert torch.equal(outs["masked"][1], outs["sliced"][1])
    kept = mia.last.kept()
    assert (kept["blocks"] < 1).any() and (kept["heads"] < 1).any() and (kept["tokens"] < 1).any()


def test_macs_vary_per_input() -> None:
    _, mia, _ = pair("vit_fmnist", "mia_vit_fmnist", {})
    randomise_controller(mia, bias=0.0, std=1.0)
    with torch.no_grad():
        mia(torch.randn(16, 1, 28, 28))
    assert mia.last.macs.unique().numel() > 1


def test_dropped_token_passes_through_unchanged() -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    blk = mia.blocks[0]
    tokens = mia._pos_embed(mia.patch_embed(x))
    b, n, _ = tokens.shape
    keep = torch.ones(b, n)
    keep[:, 5:20] = 0
    for execution in ("forward_masked", "forward_sliced"):
        out = getattr(blk, execution)(tokens, torch.ones(b), torch.ones(b, 4), keep)
        assert torch.equal(out[:, 5:20], tokens[:, 5:20])
        assert not torch.equal(out[:, :5], tokens[:, :5])


def test_skipped_block_is_identity_and_gradient_reaches_input() -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    blk = mia.blocks[0]
    tokens = mia._pos_embed(mia.patch_embed(x)).detach().requires_grad_(True)
    b, n, _ = tokens.shape
    gate = torch.tensor([0.0, 1.0, 0.0])
    out = blk.forward_sliced(tokens, gate, torch.ones(b, 4), torch.ones(b, n))
    assert torch.equal(out[0], tokens[0]) and torch.equal(out[2], tokens[2])
    out.sum().backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all()


def test_straight_through_gives_gate_gradients_to_the_input() -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    randomise_controller(mia)
    mia.set_gate_mode("deterministic")
    mia.straight_through = True
    x = x.requires_grad_(True)
    mia.last = None
    mia(x)
    (grad,) = torch.autograd.grad(mia.last.macs.sum(), x)
    assert grad.abs().sum() > 0  # the MACs respond to the input through the relaxed gates


def test_record_counts_only_heads_and_tokens_of_running_blocks() -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    randomise_controller(mia)
    for head in mia.controller:
        torch.nn.init.constant_(head.cls.bias[:1], -50.0)  # every block skipped
        torch.nn.init.zeros_(head.cls.weight[:1])
    with torch.no_grad():
        mia(x)
    from miarobust.models.flops import VitDims, controller_macs

    dims = VitDims.of(mia)
    expected = dims.patch_macs + dims.head_macs + dims.depth * controller_macs(dims)
    assert torch.allclose(mia.last.macs, torch.full((3,), float(expected)))


def test_batch_one_sliced_equals_masked_and_leaves_the_input_alone() -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    randomise_controller(mia)
    one = x[:1].clone()
    outs = {}
    for execution in ("masked", "sliced"):
        mia.execution = execution
        with torch.no_grad():  # the sliced blocks update the forward's own residual stream in place
            outs[execution] = mia(one)
    assert torch.equal(one, x[:1])
    assert (outs["masked"] - outs["sliced"]).abs().max().item() <= 1e-5
    assert mia.last.blocks.min() == 0 or mia.last.heads.min() == 0  # something was really dropped


def test_sliced_weight_cache_follows_weight_updates() -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    blk = mia.blocks[0]
    tokens = mia._pos_embed(mia.patch_embed(x[:1]))
    n = tokens.shape[1]
    heads = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    with torch.no_grad():
        before = blk.forward_sliced(tokens, torch.ones(1), heads, torch.ones(1, n))
        assert len(blk._slices) == 1  # the pattern's sliced weights are cached
        blk.attn.qkv.weight.mul_(0.5)  # an in-place update (an optimiser step, a reload) must invalidate them
        after = blk.forward_sliced(tokens, torch.ones(1), heads, torch.ones(1, n))
        expected = blk.forward_masked(tokens, torch.ones(1), heads, torch.ones(1, n))  # dense, no slices
    assert not torch.allclose(before, after)
    assert (after - expected).abs().max().item() <= 1e-5
    # with autograd through the weights nothing is cached (the slices must carry gradients)
    blk._slices.clear()
    blk.forward_sliced(tokens, torch.ones(1), heads, torch.ones(1, n)).sum().backward()
    assert not blk._slices and blk.attn.qkv.weight.grad is not None


def test_clear_caches_sees_writes_through_data() -> None:
    """`.data` writes bypass the version counter the cache is keyed on; clear_caches() is the way out."""
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    blk = mia.blocks[0]
    tokens = mia._pos_embed(mia.patch_embed(x[:1]))
    n = tokens.shape[1]
    gates = (torch.ones(1), torch.tensor([[1.0, 0.0, 1.0, 0.0]]), torch.ones(1, n))
    with torch.no_grad():
        blk.forward_sliced(tokens, *gates)
        blk.attn.qkv.weight.data.mul_(0.5)
        assert mia.clear_caches() is mia and not blk.__dict__.get("_slices")
        after = blk.forward_sliced(tokens, *gates)
        expected = blk.forward_masked(tokens, *gates)
    assert (after - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_block_with_no_heads_is_countable_without_autograd(fused: bool) -> None:
    """A running block that keeps no head adds only proj's bias; without autograd that tensor must not
    require grad (FlopCounterMode's module tracker asserted on it in the unfused path)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    for head in mia.controller:  # every block runs, every head off
        torch.nn.init.zeros_(head.cls.weight)
        head.cls.bias.data = torch.tensor([5.0] + [-5.0] * (head.cls.out_features - 1))
    for blk in mia.blocks:
        blk.attn.fused_attn = fused
    for batch in (x[:1], x):
        with FlopCounterMode(display=False), torch.no_grad():
            y = mia(batch)
        assert not y.requires_grad and bool(mia.last.heads.eq(0).all())


def test_class_token_is_required() -> None:
    with pytest.raises(ValueError, match="class token"):
        timm.create_model("mia_vit_fmnist", class_token=False, global_pool="avg")


def test_sliced_weight_cache_is_bounded() -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    blk = mia.blocks[0]
    tokens = mia._pos_embed(mia.patch_embed(x[:1]))
    n = tokens.shape[1]
    a = blk.attn
    limit = 2 * sum(p.numel() for p in (a.qkv.weight, a.qkv.bias, a.proj.weight))
    with torch.no_grad():
        for pattern in range(1, 15):  # every head pattern but all-on and all-off
            heads = torch.tensor([[float(pattern >> i & 1) for i in range(4)]])
            blk.forward_sliced(tokens, torch.ones(1), heads, torch.ones(1, n))
    assert 0 < sum(t.numel() for v in blk._slices.values() for t in v) <= limit
    assert len(blk._slices) < 14


@pytest.mark.parametrize("mode", ["deterministic", "stochastic"])
def test_batch_one_fast_path_matches_the_batched_path(mode: str) -> None:
    """Inference at batch 1 reads decisions out as Python values; with autograd on, the same image takes
    the batched code path. Same seed: same gates, output, MACs and log-probability."""
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    randomise_controller(mia)
    mia.set_gate_mode(mode).execution = "sliced"
    runs = {}
    for grad in (False, True):
        torch.manual_seed(7)
        with torch.set_grad_enabled(grad):
            ys, recs = [], []
            for i in range(3):
                ys.append(mia(x[i : i + 1]).detach())
                recs.append(mia.last)
        runs[grad] = ys, recs
    for (y0, r0), (y1, r1) in zip(zip(*runs[False]), zip(*runs[True])):
        assert (y0 - y1).abs().max().item() <= 1e-5
        for field in ("blocks", "heads", "tokens", "macs"):
            assert torch.equal(getattr(r0, field), getattr(r1, field).detach())
        assert torch.allclose(r0.log_prob, r1.log_prob.detach(), atol=1e-5)
    blocks = torch.cat([r.blocks for r in runs[False][1]])
    assert blocks.min() == 0 or torch.cat([r.heads for r in runs[False][1]]).min() == 0


def test_plain_blocks_are_recognised() -> None:
    """Functional calls replace the module calls only where they are the same computation."""
    mia = pair("deit_s", "mia_deit_s", {})[1]
    assert all(blk._plain() for blk in mia.blocks)
    scaled = pair("vit_fmnist", "mia_vit_fmnist", {"init_values": 0.1})[1]
    assert not any(blk._plain() for blk in scaled.blocks)
    dropout = timm.create_model("mia_vit_fmnist", proj_drop_rate=0.1)
    assert not dropout.train().blocks[0]._plain() and dropout.eval().blocks[0]._plain()


def test_plain_follows_swapped_layers() -> None:
    """`_plain` is cached; a layer swapped anywhere in a block, or explicit attention, must be seen."""
    from timm.layers import LayerScale

    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    blk = mia.blocks[0]
    assert blk._plain()
    blk.attn.q_norm = torch.nn.LayerNorm(blk.attn.head_dim)
    assert not blk._plain()
    blk.attn.q_norm = torch.nn.Identity()
    assert blk._plain()
    blk.ls1 = LayerScale(blk.norm1.normalized_shape[0], 0.1)
    assert not blk._plain()
    blk.ls1 = torch.nn.Identity()
    blk.attn.fused_attn = False
    assert not blk._plain()
    # the cache's key counts this process's registrations: it must not travel in a pickle or a deep copy
    import copy
    import pickle

    assert "_plain_cache" in vars(blk)
    assert "_plain_cache" not in vars(pickle.loads(pickle.dumps(blk))) and "_plain_cache" not in vars(copy.deepcopy(blk))


def test_cached_tensors_follow_assigned_parameters_and_copies() -> None:
    """Plain blocks, decision heads and the model's dims read their tensors once; a parameter or layer
    assigned anew, an in-place update, and a deep copy's own parameters must all be what runs."""
    import copy

    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    randomise_controller(mia)
    one = x[:1]

    def reference() -> torch.Tensor:  # the masked path reads every tensor through the modules
        mia.execution = "masked"
        with torch.no_grad():
            y = mia(one)
        mia.execution = "auto"
        return y

    def fast() -> torch.Tensor:
        with torch.no_grad():
            return mia(one)

    tokens = mia._pos_embed(mia.patch_embed(one)).detach()

    def head_matches(head: torch.nn.Module) -> bool:  # the logits as the head's modules compute them
        z = head.norm(tokens)
        expected = torch.cat([head.cls(z[:, 0]), head.tokens(z[:, 1:]).squeeze(-1)], 1)
        return torch.allclose(head(tokens, 1), expected, atol=1e-6)

    before = fast()  # fills the caches
    assert mia.last.blocks.sum() > 0
    head = mia.controller[1]
    for blk in mia.blocks:
        blk.mlp.fc2.weight = torch.nn.Parameter(blk.mlp.fc2.weight * 1.5)  # assigned anew
    head.cls.bias = torch.nn.Parameter(head.cls.bias + 0.3)
    with torch.no_grad():
        assert head_matches(head)
    after = fast()
    assert not torch.allclose(before, after) and (after - reference()).abs().max().item() <= 1e-5
    with torch.no_grad():  # in place: the same tensors
        for blk in mia.blocks:
            blk.attn.qkv.weight.mul_(0.7)
        head.norm.weight.mul_(1.3)
        assert head_matches(head)
    assert (fast() - reference()).abs().max().item() <= 1e-5
    copied = copy.deepcopy(mia)
    assert not any(k in vars(m) for m in copied.modules() for k in ("_plain_cache", "_slices", "_args", "_dims_cache"))
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.9)
        assert not torch.allclose(copied(one), mia(one))  # the copy runs on its own tensors
    mia.reset_classifier(5)
    assert mia.dims.head_macs == mia.embed_dim * 5 and fast().shape == (1, 5)


def test_decision_heads_of_the_earlier_layout_load() -> None:
    """Checkpoints whose controller had separate `block` and `heads` linears load into `cls`, same logits."""
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    sd = mia.state_dict()
    for i in range(len(mia.controller)):
        for kind in ("weight", "bias"):
            stacked = sd.pop(f"controller.{i}.cls.{kind}")
            sd[f"controller.{i}.block.{kind}"], sd[f"controller.{i}.heads.{kind}"] = stacked[:1], stacked[1:]
    fresh = timm.create_model("mia_vit_fmnist")
    assert set(fresh.load_state_dict(sd, strict=True).missing_keys) == set()
    tokens = mia._pos_embed(mia.patch_embed(x))
    with torch.no_grad():
        assert all(torch.equal(a(tokens, 1), b(tokens, 1)) for a, b in zip(mia.controller, fresh.controller))


def test_full_mode_record() -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    mia.set_gate_mode("full")
    with torch.no_grad():
        mia(x)
    from miarobust.models.flops import VitDims, static_macs

    rec = mia.last
    dims = VitDims.of(mia)
    assert rec.probs is None and torch.equal(rec.log_prob, torch.zeros(3))
    assert torch.equal(rec.macs, torch.full((3,), float(static_macs(dims))))
    assert rec.tokens.shape == (3, dims.depth, dims.tokens) and rec.tokens.min() == 1


@pytest.mark.parametrize("execution", ["masked", "sliced"])
def test_forward_intermediates_runs_the_gated_blocks(execution: str) -> None:
    """timm's forward_intermediates (and features_only) see the sub-model the gates chose, not the static model."""
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {}, seed=3)
    randomise_controller(mia)
    mia.set_gate_mode("deterministic").execution = execution
    with torch.no_grad():
        features = mia.forward_features(x)
        macs = mia.last.macs.clone()
        final, inter = mia.forward_intermediates(x, output_fmt="NLC", norm=True)
        assert torch.allclose(final, features, atol=1e-5) and torch.equal(mia.last.macs, macs)
        assert torch.allclose(inter[-1], final[:, 1:], atol=1e-5)  # the last block, normed: the patch tokens of the features
        static_final, static_inter = mia.set_gate_mode("full").forward_intermediates(x, output_fmt="NLC")
    assert not torch.allclose(static_final, final, atol=1e-3)
    assert len(inter) == len(static_inter) == len(mia.blocks)
    mia.set_gate_mode("deterministic")
    net = timm.create_model("mia_vit_fmnist", features_only=True, out_indices=(1, 3)).eval()
    net.model.load_state_dict(mia.state_dict(), strict=False)
    with torch.no_grad():
        got = net(x)
        want = mia.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [g.shape for g in got] == [w.shape for w in want] and all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


def test_mask_arguments_and_dynamic_sizes_are_refused_and_the_cfg_says_the_size_is_fixed() -> None:
    _, mia, x = pair("vit_fmnist", "mia_vit_fmnist", {})
    with pytest.raises(ValueError, match="attention mask"):
        mia.forward_features(x, attn_mask=torch.ones(1, 1, 50, 50, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention mask"):
        mia.forward_intermediates(x, is_causal=True)
    with pytest.raises(ValueError, match="img_size"):
        timm.create_model("mia_vit_fmnist", dynamic_img_size=True)
    for name in ("mia_vit_fmnist", "mia_deit_t", "deit_t"):
        assert timm.create_model(name, pretrained=False).pretrained_cfg["fixed_input_size"] is True
    assert timm.create_model("deit_t", dynamic_img_size=True).pretrained_cfg["fixed_input_size"] is False
