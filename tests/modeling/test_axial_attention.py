"""Position-sensitive axial attention (Axial-DeepLab eq. 4 with DeepLab2's norms) and drop path."""
import math

import pytest
import torch
from torch import nn

from cmt_cops_d2.modeling.layers import (
    AxialAttention,
    AxialAttention2D,
    DropPath,
    batch_norm_affine,
    drop_path,
    relative_distance_index,
    set_inference_shortcuts,
)

from .norms import randomize_batch_norms


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomize_norms(module: nn.Module, seed: int = 0):
    """Random gamma / beta / running statistics so that every norm matters in the comparison."""
    randomize_batch_norms(module, seed)


def _norm(bn: nn.BatchNorm2d, t: torch.Tensor, training: bool) -> torch.Tensor:
    """Reference BN over channel dim 1 of ``t`` with any number of trailing dims."""
    dims = [0] + list(range(2, t.dim()))
    if training:
        mean, var = t.mean(dims), t.var(dims, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    shape = [1, -1] + [1] * (t.dim() - 2)
    return (t - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def dense_reference(att: AxialAttention, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Axial attention written out per sequence, per head and per (query, key) pair.

    Loops over every 1D sequence of the attended axis and every head; the relative embeddings
    are looked up pair by pair with an explicitly clipped distance ``key - query``.
    """
    S, heads = att.max_span, att.num_heads
    K, V = att.key_channels, att.value_channels
    dk, dv = K // heads, V // heads
    n_batch = x.shape[0]
    seq = x if att.axis == "width" else x.transpose(2, 3)  # [N, C, O, L]
    O, L = seq.shape[2:]
    Wqkv = att.qkv.weight[:, :, 0, 0]  # [2K+V, C]
    qkv = torch.einsum("ec,ncol->neol", Wqkv, seq)
    qkv = _norm(att.qkv_norm, qkv, training)

    def row(d):  # table row for relative distance d, clipped to the table's ends
        return min(max(d, -(S - 1)), S - 1) + S - 1

    sim = torch.zeros(n_batch, 3, heads, O, L, L, dtype=x.dtype)
    for n in range(n_batch):
        for o in range(O):
            for h in range(heads):
                q = qkv[n, h * dk : (h + 1) * dk, o]  # [dk, L]
                k = qkv[n, K + h * dk : K + (h + 1) * dk, o]
                sim[n, 0, h, o] = q.T @ k  # full-axis matmul
                for li in range(L):
                    for mi in range(L):
                        sim[n, 1, h, o, li, mi] = q[:, li] @ att.query_rpe[row(mi - li)]
                        sim[n, 2, h, o, li, mi] = k[:, mi] @ att.key_rpe[row(mi - li)]
    sim = _norm(att.similarity_norm, sim.reshape(n_batch, 3 * heads, O, L, L), training)
    logits = sim.reshape(n_batch, 3, heads, O, L, L).sum(1)
    w = torch.softmax(logits, dim=-1)

    ret = torch.zeros(n_batch, 2, heads, dv, O, L, dtype=x.dtype)
    for n in range(n_batch):
        for o in range(O):
            for h in range(heads):
                v = qkv[n, 2 * K + h * dv : 2 * K + (h + 1) * dv, o]  # [dv, L]
                ret[n, 0, h, :, o] = v @ w[n, h, o].T
                for li in range(L):
                    for mi in range(L):
                        ret[n, 1, h, :, o, li] += w[n, h, o, li, mi] * att.value_rpe[row(mi - li)]
    ret = _norm(att.output_norm, ret.reshape(n_batch, 2 * V, O, L), training)
    y = ret.reshape(n_batch, 2, V, O, L).sum(1)[..., :: att.stride]
    return y if att.axis == "width" else y.transpose(2, 3)


@pytest.mark.parametrize("autograd", [False, True], ids=["folded", "unfolded"])
@pytest.mark.parametrize("axis,stride", [("height", 1), ("width", 1), ("height", 2), ("width", 2)])
def test_matches_dense_reference_eval(axis, stride, autograd):
    # Without autograd the eval-mode norms are folded into q, k, v (AxialAttention._forward_folded);
    # with it the norms run as in training. Both must give the dense reference.
    torch.manual_seed(0)
    # max_span=3 < L=5 or 6: far pairs exercise the clipping of the relative distance.
    att = AxialAttention(6, 4, 8, axis=axis, num_heads=2, max_span=3, stride=stride).double()
    _randomize_norms(att)
    set_inference_shortcuts(att.eval())
    x = torch.randn(2, 6, 5, 6, dtype=torch.double)
    with torch.set_grad_enabled(autograd):
        y = att(x)
    with torch.no_grad():
        ref = dense_reference(att, x, training=False)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("terms", [(False, True, True), (True, False, True), (True, True, False),
                                   (False, False, False)])
def test_folded_inference_matches_unfolded_with_position_terms_off(terms):
    use_q, use_k, use_v = terms
    torch.manual_seed(2)
    att = AxialAttention(6, 4, 8, axis="width", num_heads=2, max_span=4, use_query_rpe=use_q,
                         use_key_rpe=use_k, use_value_rpe=use_v).double()
    _randomize_norms(att, seed=2)
    set_inference_shortcuts(att.eval())
    x = torch.randn(2, 6, 5, 7, dtype=torch.double)
    with torch.no_grad():
        folded = att(x)
    unfolded = att(x)  # autograd on: the norms run as modules
    assert unfolded.requires_grad and not folded.requires_grad
    torch.testing.assert_close(folded, unfolded.detach(), rtol=1e-9, atol=1e-9)


def test_group_norm_attention_is_not_folded():
    # GN normalises each map by its own statistics: there is no per-channel affine to fold.
    torch.manual_seed(3)
    att = set_inference_shortcuts(AxialAttention(8, 32, 32, num_heads=2, norm="GN").eval())  # 32 groups
    x = torch.randn(1, 8, 4, 5)
    with torch.no_grad():
        assert batch_norm_affine(att.similarity_norm) is None
        assert batch_norm_affine(att.output_norm) is None
        y = att(x)
    torch.testing.assert_close(y, att(x).detach())


def test_matches_dense_reference_train_batch_statistics():
    torch.manual_seed(1)
    att = AxialAttention(4, 4, 4, axis="height", num_heads=2, max_span=4).double().train()
    _randomize_norms(att, seed=1)
    x = torch.randn(2, 4, 6, 3, dtype=torch.double)
    with torch.no_grad():
        ref = dense_reference(att, x, training=True)
        y = att(x)
    torch.testing.assert_close(y, ref, rtol=1e-8, atol=1e-8)


def test_relative_distance_index_hand_made():
    # Row = clip(key - query, -(S-1), S-1) + S - 1 with S = 2.
    expected = torch.tensor([[1, 2, 2], [0, 1, 2], [0, 0, 1]])
    assert torch.equal(relative_distance_index(3, 3, 2), expected)
    # Unclipped: row - (S - 1) is exactly key - query.
    idx = relative_distance_index(4, 4, 10)
    assert torch.equal(idx - 9, torch.arange(4)[None, :] - torch.arange(4)[:, None])


def _hand_made_layer(axis: str, q_bias: float, k_bias: float) -> AxialAttention:
    """One head, one channel, L = 4, S = 3 (rows are distances -2..2); every norm is the identity.

    The qkv conv is zero, so q, k, v are the qkv-norm biases (constants); r^v(d) = 10 * (d + 3).
    """
    att = AxialAttention(1, 1, 1, axis=axis, num_heads=1, max_span=3)
    with torch.no_grad():
        att.qkv.weight.zero_()
        for bn in (att.qkv_norm, att.similarity_norm, att.output_norm):
            bn.eps = 0.0
            bn.weight.fill_(1.0)
            bn.bias.zero_()
        att.qkv_norm.bias.copy_(torch.tensor([q_bias, k_bias, 0.0]))
        att.query_rpe.zero_()
        att.key_rpe.zero_()
        att.value_rpe.copy_(torch.tensor([[10.0], [20.0], [30.0], [40.0], [50.0]]))
    return att.eval()


@pytest.mark.parametrize("axis", ["height", "width"])
def test_relative_embeddings_hand_made(axis):
    shape = (1, 1, 4, 1) if axis == "height" else (1, 1, 1, 4)
    x = torch.randn(shape)
    # q = 1 and r^q(+1) = 50: each query attends to the key one step after it (m - l = +1) and
    # retrieves r^v(+1) = 40. The last query has no such key: uniform weights over distances
    # -3 (clipped to -2), -2, -1, 0 -> (10 + 10 + 20 + 30) / 4.
    att = _hand_made_layer(axis, q_bias=1.0, k_bias=0.0)
    with torch.no_grad():
        att.query_rpe[3, 0] = 50.0
        y = att(x).flatten()
    torch.testing.assert_close(y, torch.tensor([40.0, 40.0, 40.0, 17.5]))
    # k = 1 and r^k(-1) = 50: each query attends to the key one step before it, r^v(-1) = 20.
    # The first query: distances 0, 1, 2, 3 (clipped to 2) -> (30 + 40 + 50 + 50) / 4.
    att = _hand_made_layer(axis, q_bias=0.0, k_bias=1.0)
    with torch.no_grad():
        att.key_rpe[1, 0] = 50.0
        y = att(x).flatten()
    torch.testing.assert_close(y, torch.tensor([42.5, 20.0, 20.0, 20.0]))


@pytest.mark.parametrize("hw", [(1, 1), (5, 3), (7, 13), (300, 2)])
def test_any_input_size(hw):
    # One layer (nothing tied to a resolution) runs on odd sizes and on axes longer than the
    # table (max_span = 4 here; 300 > 255 = the default too).
    torch.manual_seed(0)
    layer = AxialAttention2D(8, 8, 8, num_heads=2, max_span=4, stride=2).eval()
    H, W = hw
    with torch.no_grad():
        y = layer(torch.randn(1, 8, H, W))
    assert y.shape == (1, 8, math.ceil(H / 2), math.ceil(W / 2))
    assert torch.isfinite(y).all()


def test_memory_is_linear_in_the_axis_not_quadratic_in_the_image():
    # The largest tensor saved for backward is the [N, terms * heads, O * L, L] logits stack,
    # i.e. O(N * heads * H * W * L), never an (H * W) x (H * W) matrix.
    H = W = 48
    heads = 2
    att = AxialAttention(8, 8, 8, axis="height", num_heads=heads, max_span=8).train()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        att(torch.randn(1, 8, H, W))
    assert max(sizes) <= 3 * heads * H * W * H
    assert max(sizes) < (H * W) ** 2 // 4


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    layer = AxialAttention2D(8, 8, 16, num_heads=4, max_span=3, stride=2).train()
    y = layer(torch.randn(2, 8, 5, 7))
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bf16_autocast_runs_softmax_in_float32():
    torch.manual_seed(0)
    att = AxialAttention(8, 8, 8, axis="width", num_heads=2, max_span=3).eval()
    x = torch.randn(1, 8, 3, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = att(x)
    with torch.no_grad():
        ref = att(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.1)


def test_group_norm_has_one_group_per_term_and_head():
    att = AxialAttention(16, 16, 32, num_heads=8, norm="GN")
    assert att.similarity_norm.num_groups == 3 * 8
    assert att.output_norm.num_groups == 2 * 8
    assert att(torch.randn(2, 16, 3, 4)).shape == (2, 32, 3, 4)


def test_rejects_heads_not_dividing_channels():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        AxialAttention(8, 6, 8, num_heads=4)


def test_drop_path_is_identity_in_eval_and_with_zero_rate():
    x = torch.randn(4, 3, 2, 2)
    layer = DropPath(0.5).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(drop_path(x, 0.0, training=True), x)


def test_drop_path_drops_whole_samples_with_the_right_expectation():
    torch.manual_seed(0)
    p = 0.25
    layer = DropPath(p).train()
    x = torch.ones(20000, 3, 2, 2)
    y = layer(x)
    per_sample = y.flatten(1)
    # Each sample is all zeros or all 1 / (1 - p): whole residual branches are dropped.
    kept = per_sample[:, 0] > 0
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / (1 - p)))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.015
    assert abs(y.mean().item() - 1.0) < 0.02  # unbiased


def test_position_terms_can_be_switched_off():
    att = AxialAttention(8, 8, 8, num_heads=2, use_query_rpe=False, use_key_rpe=False,
                         use_value_rpe=False)
    assert att.query_rpe is None and att.key_rpe is None and att.value_rpe is None
    assert att.similarity_norm.num_features == 2 and att.output_norm.num_features == 8
    assert att(torch.randn(1, 8, 3, 4)).shape == (1, 8, 3, 4)
