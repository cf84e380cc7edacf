"""The CMT layer (eq. 3-12 in MaX-DeepLab's dual-path transformer layer) against direct dense
computations on tiny tensors, with every batch norm an arbitrary eval-mode affine map."""
import math

import pytest
import torch
from torch.nn.functional import gelu

from cmt_cops_d2.modeling.cmt.cmt_layer import CMTLayer, pixel_coordinates

from ..norms import randomize_batch_norms

B, PIX, DC, DB, DK, DV, HEADS, N, M, H, W = 2, 16, 12, 8, 8, 8, 2, 5, 3, 4, 6
FFN, MLP = 16, 10
SWITCHES = ("use_cluster_update", "use_assignment_residual", "use_pixel_update",
            "use_reference_mask", "use_coord_conv")


def make(seed=0, first_layer=False, randomize=True, **switches):
    torch.manual_seed(seed)
    layer = CMTLayer(PIX, DC, bottleneck_dim=DB, key_dim=DK, value_dim=DV, num_heads=HEADS,
                     ffn_dim=FFN, num_points=M, ref_mlp_dim=MLP, first_layer=first_layer, **switches)
    if randomize:
        # Every norm an arbitrary affine map (the zero-initialised output scales included), so that
        # every path shows in the output and a missing or misplaced norm changes it.
        randomize_batch_norms(layer, seed + 100, shift_scale=0.2)
    return layer.eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, PIX, H, W, generator=g)
    C = torch.randn(B, N, DC, generator=g)
    S = torch.randn(B, N, H, W, generator=g)
    e = torch.randn(B, N, 2 * M, generator=g)
    return x, C, S, e


def bn(norm, y):
    """Eval-mode batch norm over dim 1 of y (B x C x ...)."""
    shape = (1, -1) + (1,) * (y.dim() - 2)
    return ((y - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
            * norm.weight.view(shape) + norm.bias.view(shape))


def lin(conv, y):
    """A 1x1 conv (with its norm, if any) as a matrix product on B x Cin x L."""
    out = torch.einsum("oc,bcl->bol", conv.weight[:, :, 0, 0], y)
    if conv.bias is not None:
        out = out + conv.bias[None, :, None]
    return out if getattr(conv, "norm", None) is None else bn(conv.norm, out)


def dense_bottleneck(layer, x, C, r_c):
    """Cb (B x DB x N) and F (B x DB x HW): eq. (11), the pixel entry, eq. (12)."""
    cin = C if r_c is None else torch.cat([C, r_c], -1)
    Cb = gelu(lin(layer.center_in, cin.transpose(1, 2)))
    F = gelu(lin(layer.pixel_in, gelu(x).flatten(2)))
    if layer.use_coord_conv:
        ys, xs = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
        r_p = torch.stack([ys, xs]).flatten(1).expand(B, -1, -1)
        F = gelu(lin(layer.pixel_coord, torch.cat([F, r_p], 1)))
    return F, Cb


def dense_logits(layer, F, Cb, S):
    """Eq. (6) before the softmax, B x N x HW."""
    k, q = lin(layer.assign_key, F), lin(layer.assign_query, Cb)
    logits = torch.einsum("bdp,bdn->bnp", k, q) / math.sqrt(DK)
    if S is not None and layer.use_assignment_residual:
        logits = logits + S.flatten(2)
    return logits


def split_heads(t, depth):
    return [t[:, h * depth // HEADS:(h + 1) * depth // HEADS] for h in range(HEADS)]


def dense_center_update(layer, F, Cb, C, Z, cluster):
    """Eq. (7) head by head: one softmax over pixels and centers with BN on the similarities, BN and
    act on the read values, the output projection; the clustering term with its own norm and
    projection; the residual, act; then the FFN."""
    qkv_c = lin(layer.center_qkv, Cb)
    q_c, k_c, v_c = qkv_c[:, :DK], qkv_c[:, DK:2 * DK], qkv_c[:, 2 * DK:]
    pix = lin(layer.pixel_qkv, F)
    k_p, v_p = pix[:, -(DK + DV):-DV], pix[:, -DV:]
    sims = []
    for q, kp, kc in zip(split_heads(q_c, DK), split_heads(k_p, DK), split_heads(k_c, DK)):
        sims.append(torch.einsum("bdn,bdl->bnl", q, torch.cat([kp, kc], -1)))
    sim = bn(layer.similarity_norm, torch.stack(sims, 1))                 # B x h x N x HW+N
    attn = sim.softmax(-1)
    reads = [torch.einsum("bnl,bdl->bdn", attn[:, h], torch.cat([vp, vc], -1))
             for h, (vp, vc) in enumerate(zip(split_heads(v_p, DV), split_heads(v_c, DV)))]
    update = lin(layer.center_out, gelu(bn(layer.center_value_norm, torch.cat(reads, 1))))
    if cluster:
        update = update + lin(layer.cluster_out, bn(layer.cluster_norm, v_p @ Z.transpose(1, 2)))
    C1 = gelu(C.transpose(1, 2) + update)
    C2 = gelu(C1 + lin(layer.ffn_out, gelu(lin(layer.ffn_in, C1))))
    return C2.transpose(1, 2), (k_c, v_c)


def dense_pixel_update(layer, x, F, Z, k_c, v_c, clustering):
    if clustering:                                                        # eq. (8)
        read = v_c @ Z                                                    # B x DV x HW
    else:                                                                 # MaX pixel-to-memory
        q_p = lin(layer.pixel_qkv, F)[:, :DK]
        sim = torch.stack([torch.einsum("bdp,bdn->bpn", q, k)
                           for q, k in zip(split_heads(q_p, DK), split_heads(k_c, DK))], 1)
        attn = bn(layer.pixel_similarity_norm, sim).softmax(-1)           # over the N centers
        read = torch.cat([torch.einsum("bpn,bdn->bdp", attn[:, h], v)
                          for h, v in enumerate(split_heads(v_c, DV))], 1)
    return x.flatten(2) + lin(layer.pixel_out, gelu(bn(layer.pixel_value_norm, read)))


def dense_layer(layer, x, C, S, e):
    """The whole layer from the functions above: (centers, pixels, logits)."""
    r_c = None
    if layer.use_reference_mask:
        r_c = layer.reference_masks(C, e)[1]
    F, Cb = dense_bottleneck(layer, x, C, r_c if layer.use_coord_conv else None)
    logits = dense_logits(layer, F, Cb, S)
    Z = logits.softmax(1)
    centers, (k_c, v_c) = dense_center_update(layer, F, Cb, C, Z, layer.use_cluster_update)
    pixels = dense_pixel_update(layer, x, F, Z, k_c, v_c, layer.use_pixel_update)
    return centers, pixels.view(B, PIX, H, W), logits.view(B, N, H, W)


def test_pixel_coordinates():
    r = pixel_coordinates(3, 5)
    assert r.shape == (2, 3, 5)
    assert torch.allclose(r[0, :, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(r[1, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_reference_masks_eq9_10():
    layer = make(first_layer=True)
    _, C, _, e = inputs()
    mlp = lin(layer.ref_mlp[2], gelu(lin(layer.ref_mlp[0], C.transpose(1, 2)))).transpose(1, 2)
    e_hat, r = layer.reference_masks(C, e)
    assert torch.allclose(e_hat, e + mlp, atol=1e-5)
    assert torch.allclose(r, torch.sigmoid(e + mlp), atol=1e-6)
    # First layer: e is a projection of the centers; later layers must be given e.
    e_hat0, _ = layer.reference_masks(C, None)
    assert torch.allclose(e_hat0, layer.ref_embed(C) + mlp, atol=1e-5)
    with pytest.raises(ValueError, match="previous layer's e_hat"):
        make().reference_masks(C, None)


@pytest.mark.parametrize("coord", [True, False])
def test_bottleneck_and_coord_conv_eq11_12(coord):
    layer = make(use_coord_conv=coord)
    x, C, _, e = inputs()
    r_c = torch.sigmoid(e) if coord else None
    F, Cb = layer.bottleneck(x, C, r_c)
    F_ref, Cb_ref = dense_bottleneck(layer, x, C, r_c)
    assert torch.allclose(F.flatten(2), F_ref, atol=1e-5)
    assert torch.allclose(Cb[..., 0], Cb_ref, atol=1e-5)


def test_assignment_eq6_with_residual():
    layer = make()
    x, C, S, e = inputs()
    F, Cb = layer.bottleneck(x, C, torch.sigmoid(e))
    logits = layer.assignment_logits(F, Cb, S)
    assert torch.allclose(logits.flatten(2), dense_logits(layer, F.flatten(2), Cb[..., 0], S), atol=1e-5)
    # Residual path off: S is ignored.
    layer.use_assignment_residual = False
    assert torch.allclose(layer.assignment_logits(F, Cb, S), layer.assignment_logits(F, Cb, None))


def test_residual_logits_are_resized_across_strides():
    layer = make()
    x, C, S, e = inputs()
    F, Cb = layer.bottleneck(x, C, torch.sigmoid(e))
    small = S[..., ::2, ::2]
    up = torch.nn.functional.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
    assert torch.allclose(layer.assignment_logits(F, Cb, small), layer.assignment_logits(F, Cb, up))


def bottleneck_and_assignment(layer):
    """The layer's bottleneck features of the test inputs and an arbitrary assignment Z = softmax(S)."""
    x, C, S, e = inputs()
    F, Cb = layer.bottleneck(x, C, torch.sigmoid(e))
    return x, C, F, Cb, torch.softmax(S, dim=1)


@pytest.mark.parametrize("cluster", [True, False])
def test_center_update_eq7_and_eq3(cluster):
    layer = make(use_cluster_update=cluster)
    x, C, F, Cb, Z = bottleneck_and_assignment(layer)
    got, _ = layer.center_update(F, Cb, C, Z)
    expected, _ = dense_center_update(layer, F.flatten(2), Cb[..., 0], C, Z.flatten(2), cluster)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("clustering", [True, False])
def test_pixel_update_eq8_and_maxdeeplab_pixel_attention(clustering):
    layer = make(use_pixel_update=clustering)
    x, C, F, Cb, Z = bottleneck_and_assignment(layer)
    _, (k_c, v_c) = layer.center_update(F, Cb, C, Z)
    got = layer.pixel_update(x, F, Z, (k_c, v_c))
    expected = dense_pixel_update(layer, x, F.flatten(2), Z.flatten(2), k_c[..., 0], v_c[..., 0], clustering)
    assert torch.allclose(got.flatten(2), expected, atol=1e-5)


@pytest.mark.parametrize("switches", [{}, {s: False for s in SWITCHES}])
def test_forward_is_the_equations_wired_together(switches):
    layer = make(**switches)
    x, C, S, e = inputs()
    out = layer(x, C, S, e)
    centers, pixels, logits = dense_layer(layer, x, C, S, e)
    assert torch.allclose(out["centers"], centers, atol=1e-5)
    assert torch.allclose(out["pixels"], pixels, atol=1e-5)
    assert torch.allclose(out["logits"], logits, atol=1e-5)
    assert out["pixels"].shape == x.shape and out["centers"].shape == C.shape
    if switches:
        assert set(out) == {"centers", "pixels", "logits"}
    else:
        e_hat, r = layer.reference_masks(C, e)
        assert torch.allclose(out["ref_embed"], e_hat) and torch.allclose(out["ref_points"], r)


def _transfer(on, off):
    """Copy ``on``'s parameters into ``off``; where a switch changes a projection's input or output
    size (coord-conv inputs, the pixel queries), copy the part both have."""
    target = off.state_dict()
    for k, v in on.state_dict().items():
        if k not in target:
            continue
        t = target[k]
        if t.shape == v.shape:
            t.copy_(v)
        elif k.startswith("center_in.weight"):            # off has no r^c input channels
            t.copy_(v[:, : t.shape[1]])
        elif k.startswith("pixel_qkv"):                   # off has pixel queries in front
            t[-v.shape[0]:].copy_(v)
        else:
            raise AssertionError(f"unexpected shape change of {k}")


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_changes_what_it_names_and_nothing_else(switch):
    on = make(seed=0)
    flags = {s: True for s in SWITCHES}
    flags[switch] = False
    if switch == "use_reference_mask":
        flags["use_coord_conv"] = False     # coord-conv needs reference masks
    off = make(seed=0, **flags)
    _transfer(on, off)
    x, C, S, e = inputs()
    a, b = on(x, C, S, e), off(x, C, S, e)
    changed = {k for k in ("centers", "pixels", "logits") if not torch.allclose(a[k], b[k], atol=1e-6)}
    expected = {
        # only the center update reads the clustering term
        "use_cluster_update": {"centers"},
        # only the pixel update differs
        "use_pixel_update": {"pixels"},
        # S changes the logits, hence Z, hence both updates
        "use_assignment_residual": {"logits", "centers", "pixels"},
        # without coord-conv the layer reads other bottleneck features
        "use_coord_conv": {"logits", "centers", "pixels"},
        "use_reference_mask": {"logits", "centers", "pixels"},
    }[switch]
    assert changed == expected
    if switch == "use_coord_conv":
        # the reference masks themselves do not depend on coord-conv
        assert torch.allclose(a["ref_embed"], b["ref_embed"])
    if switch == "use_reference_mask":
        assert "ref_points" not in b


def test_every_parameter_gets_a_gradient():
    layer = make(first_layer=True).train()
    x, C, S, e = inputs()
    out = layer(x, C, S, None)
    loss = out["centers"].square().mean() + out["pixels"].square().mean() + out["logits"].mean() \
        + out["ref_points"].mean()
    loss.backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fresh_layer_leaves_pixels_and_only_activates_centers():
    """Every output projection starts at zero (DeepLab2): the pixels pass unchanged and the centers
    only go through the two activations of the attention and FFN residuals."""
    layer = make(randomize=False)
    x, C, S, e = inputs()
    out = layer(x, C, S, e)
    assert torch.allclose(out["pixels"], x, atol=1e-6)
    assert torch.allclose(out["centers"], gelu(gelu(C)), atol=1e-6)


def test_bad_dimensions_and_switch_combination():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CMTLayer(16, 12, key_dim=10, value_dim=8, num_heads=4)
    with pytest.raises(ValueError, match="USE_COORD_CONV requires USE_REFERENCE_MASK"):
        CMTLayer(16, 8, key_dim=8, num_heads=2, use_reference_mask=False, use_coord_conv=True)
