"""The CMT layer (eq. 3-12) against direct dense computations on tiny tensors."""
import math

import pytest
import torch

from cmt_cops_d2.modeling.cmt.cmt_layer import CMTLayer, pixel_coordinates

B, DP, DC, DK, HEADS, N, M, H, W = 2, 8, 12, 8, 2, 5, 3, 4, 6
SWITCHES = ("use_cluster_update", "use_assignment_residual", "use_pixel_update",
            "use_reference_mask", "use_coord_conv")


def make(seed=0, first_layer=False, **switches):
    torch.manual_seed(seed)
    layer = CMTLayer(DP, DC, key_dim=DK, num_heads=HEADS, num_points=M, first_layer=first_layer,
                     **switches)
    # Give the zero-initialised output norms a non-zero scale so every path shows in the output.
    with torch.no_grad():
        layer.center_out_norm.weight.uniform_(0.5, 1.5)
        layer.pixel_out_norm.weight.uniform_(0.5, 1.5)
    return layer.eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(B, DP, H, W, generator=g)
    C = torch.randn(B, N, DC, generator=g)
    S = torch.randn(B, N, H, W, generator=g)
    e = torch.randn(B, N, 2 * M, generator=g)
    return F, C, S, e


def conv1x1(conv, x):
    """A 1x1 conv as an explicit matrix product on B x D x H x W -> B x HW x D'."""
    w = conv.weight[:, :, 0, 0]
    return x.flatten(2).transpose(1, 2) @ w.T + conv.bias


def bn_eval(bn, x):
    """Eval-mode BatchNorm over the last dim of x (..., D)."""
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def test_pixel_coordinates():
    r = pixel_coordinates(3, 5)
    assert r.shape == (2, 3, 5)
    assert torch.allclose(r[0, :, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(r[1, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_reference_masks_eq9_10():
    layer = make(first_layer=True)
    _, C, _, e = inputs()
    mlp = lambda x: layer.ref_mlp[2](torch.nn.functional.gelu(layer.ref_mlp[0](x)))  # noqa: E731
    e_hat, r = layer.reference_masks(C, e)
    assert torch.allclose(e_hat, e + mlp(C), atol=1e-6)
    assert torch.allclose(r, torch.sigmoid(e + mlp(C)), atol=1e-6)
    # First layer: e is a projection of the centers; later layers must be given e.
    e_hat0, _ = layer.reference_masks(C, None)
    assert torch.allclose(e_hat0, layer.ref_embed(C) + mlp(C), atol=1e-6)
    with pytest.raises(ValueError, match="previous layer's e_hat"):
        make().reference_masks(C, None)


def test_coord_conv_eq11_12():
    layer = make()
    F, C, _, e = inputs()
    r_c = torch.sigmoid(e)
    F2, C2 = layer.coord_conv(F, C, r_c)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    F_cat = torch.cat([F, ys.expand(B, 1, H, W), xs.expand(B, 1, H, W)], 1)
    expected_F = conv1x1(layer.pixel_coord, F_cat)
    assert torch.allclose(F2.flatten(2).transpose(1, 2), expected_F, atol=1e-5)
    expected_C = torch.cat([C, r_c], -1) @ layer.center_coord.weight.T + layer.center_coord.bias
    assert torch.allclose(C2, expected_C, atol=1e-5)


def test_assignment_eq6_with_residual():
    layer = make()
    F, C, S, _ = inputs()
    logits = layer.assignment_logits(F, C, S)
    K = conv1x1(layer.assign_key, F)                                   # B x HW x d
    Q = C @ layer.assign_query.weight.T + layer.assign_query.bias      # B x N x d
    expected = S.flatten(2).transpose(1, 2) + K @ Q.transpose(1, 2) / math.sqrt(DK)  # B x HW x N
    assert torch.allclose(logits.flatten(2).transpose(1, 2), expected, atol=1e-5)
    # Residual path off: S is ignored.
    layer.use_assignment_residual = False
    assert torch.allclose(layer.assignment_logits(F, C, S), layer.assignment_logits(F, C, None))


def test_residual_logits_are_resized_across_strides():
    layer = make()
    F, C, S, _ = inputs()
    small = S[..., ::2, ::2]
    up = torch.nn.functional.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
    assert torch.allclose(layer.assignment_logits(F, C, small), layer.assignment_logits(F, C, up))


def _dense_center_update(layer, F, C, Z, cluster):
    """Eq. (7) head by head with explicit matrices (eq. 3 when cluster is False)."""
    Kp, Vp = conv1x1(layer.pixel_key, F), conv1x1(layer.pixel_value, F)   # B x HW x d
    Qc = C @ layer.center_query.weight.T + layer.center_query.bias
    dk, dv = DK // HEADS, DC // HEADS
    Zt = Z.flatten(2)                                                      # B x N x HW
    heads = []
    for h in range(HEADS):
        q, k = Qc[..., h * dk:(h + 1) * dk], Kp[..., h * dk:(h + 1) * dk]
        v = Vp[..., h * dv:(h + 1) * dv]
        A = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dk), dim=-1)  # softmax over HW
        heads.append((A + Zt) @ v if cluster else A @ v)
    update = bn_eval(layer.center_update_norm, torch.cat(heads, -1))
    out = update @ layer.center_out.weight.T + layer.center_out.bias
    return C + layer.center_out_norm(out)


@pytest.mark.parametrize("cluster", [True, False])
def test_center_update_eq7_and_eq3(cluster):
    layer = make(use_cluster_update=cluster)
    F, C, S, _ = inputs()
    Z = torch.softmax(S, dim=1)
    assert torch.allclose(layer.center_update(F, C, Z), _dense_center_update(layer, F, C, Z, cluster),
                          atol=1e-5)


def test_pixel_update_eq8():
    layer = make()
    F, C, S, _ = inputs()
    Z = torch.softmax(S, dim=1)
    Vc = C @ layer.center_value.weight.T + layer.center_value.bias        # B x N x Dp
    upd = Z.flatten(2).transpose(1, 2) @ Vc                              # B x HW x Dp
    expected = F.flatten(2).transpose(1, 2) + bn_eval(layer.pixel_out_norm, upd)
    assert torch.allclose(layer.pixel_update(F, C, Z).flatten(2).transpose(1, 2), expected, atol=1e-5)


def test_baseline_pixel_attention_is_softmax_over_centers():
    layer = make(use_pixel_update=False)
    F, C, S, _ = inputs()
    Z = torch.softmax(S, dim=1)
    Qp = conv1x1(layer.pixel_query, F)
    Kc = C @ layer.center_key.weight.T + layer.center_key.bias
    Vc = C @ layer.center_value.weight.T + layer.center_value.bias
    dk, dv = DK // HEADS, DP // HEADS
    heads = [torch.softmax(Qp[..., h * dk:(h + 1) * dk] @ Kc[..., h * dk:(h + 1) * dk].transpose(1, 2)
                           / math.sqrt(dk), dim=-1) @ Vc[..., h * dv:(h + 1) * dv] for h in range(HEADS)]
    upd = torch.cat(heads, -1)
    expected = F.flatten(2).transpose(1, 2) + bn_eval(layer.pixel_out_norm, upd)
    got = layer.pixel_update(F, C, Z).flatten(2).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-5)


def test_forward_wires_the_equations_together():
    layer = make()
    F, C, S, e = inputs()
    out = layer(F, C, S, e)
    e_hat, r = layer.reference_masks(C, e)
    F1, C1 = layer.coord_conv(F, C, r)
    logits = layer.assignment_logits(F1, C1, S)
    Z = logits.softmax(1)
    assert torch.allclose(out["ref_embed"], e_hat) and torch.allclose(out["ref_points"], r)
    assert torch.allclose(out["logits"], logits, atol=1e-6)
    assert torch.allclose(out["centers"], _dense_center_update(layer, F1, C1, Z, True), atol=1e-5)
    assert torch.allclose(out["pixels"], layer.pixel_update(F1, C1, Z), atol=1e-6)
    assert out["pixels"].shape == F.shape and out["centers"].shape == C.shape
    assert out["logits"].shape == (B, N, H, W) and r.shape == (B, N, 2 * M)


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_changes_what_it_names_and_nothing_else(switch):
    on = make(seed=0)
    flags = {s: True for s in SWITCHES}
    flags[switch] = False
    if switch == "use_reference_mask":
        flags["use_coord_conv"] = False     # coord-conv needs reference masks
    off = make(seed=0, **flags)
    off.load_state_dict(on.state_dict(), strict=False)
    F, C, S, e = inputs()
    a, b = on(F, C, S, e), off(F, C, S, e)
    changed = {k for k in ("centers", "pixels", "logits") if not torch.allclose(a[k], b[k], atol=1e-6)}
    expected = {
        # only the center update reads the clustering term
        "use_cluster_update": {"centers"},
        # only the pixel update differs
        "use_pixel_update": {"pixels"},
        # S changes the logits, hence Z, hence both updates
        "use_assignment_residual": {"logits", "centers", "pixels"},
        # without coord-conv the layer reads F and C directly
        "use_coord_conv": {"logits", "centers", "pixels"},
        "use_reference_mask": {"logits", "centers", "pixels"},
    }[switch]
    assert changed == expected
    if switch == "use_coord_conv":
        # the reference masks themselves do not depend on coord-conv
        assert torch.allclose(a["ref_embed"], b["ref_embed"])
    if switch == "use_reference_mask":
        assert "ref_points" not in b


def test_all_switches_off_gives_maxdeeplab_cross_attention():
    layer = make(**{s: False for s in SWITCHES})
    F, C, S, e = inputs()
    out = layer(F, C, S, e)
    assert set(out) == {"centers", "pixels", "logits"}
    # logits ignore S; centers follow eq. (3)
    assert torch.allclose(out["logits"], layer.assignment_logits(F, C, None))
    Z = out["logits"].softmax(1)
    assert torch.allclose(out["centers"], _dense_center_update(layer, F, C, Z, False), atol=1e-5)


def test_every_parameter_gets_a_gradient():
    layer = make().train()
    F, C, S, e = inputs()
    out = layer(F, C, S, e)
    loss = out["centers"].square().mean() + out["pixels"].square().mean() + out["logits"].mean() \
        + out["ref_points"].mean()
    loss.backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fresh_layer_is_identity_on_centers_and_pixels():
    torch.manual_seed(0)
    layer = CMTLayer(DP, DC, key_dim=DK, num_heads=HEADS, num_points=M, use_coord_conv=False).eval()
    F, C, S, e = inputs()
    out = layer(F, C, S, e)
    assert torch.allclose(out["centers"], C, atol=1e-6)
    assert torch.allclose(out["pixels"], F, atol=1e-6)


def test_bad_dimensions_and_switch_combination():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CMTLayer(10, 12, key_dim=8, num_heads=4)
    with pytest.raises(ValueError, match="USE_COORD_CONV requires USE_REFERENCE_MASK"):
        CMTLayer(8, 8, key_dim=8, num_heads=2, use_reference_mask=False, use_coord_conv=True)
