"""The Clustering Mask Transformer (CMT) layer (CMT-DeepLab, Sec. 3.3, eq. 3-12) in MaX-DeepLab's
dual-path transformer layer.

The paper builds on MaX-DeepLab's dual-path transformer and says nothing of the layer's widths, norms
or residual layout, so those follow DeepLab2's ``DualPathTransformerLayer``. Notation as in the paper.
The layer reads the pixel path ``x`` (B x W x H x W', the output of the pixel path's axial block,
before its activation) and the cluster centers ``C`` (B x N x D), both at their own width, and works at
a 256-channel bottleneck:

1. bottleneck: centers ``Cb = act(BN(W C))`` and pixels ``F = act(BN(W act(x)))``;
2. location-sensitive clustering (eq. 9-12), if enabled: ``e_hat = e + MLP(C)`` (``e`` is the
   previous layer's ``e_hat``, or a projection of ``C`` in the first layer), ``r^c = sigmoid(e_hat)``,
   M reference points (h, w) in [0, 1] per center; eq. (11) ``Cb = Conv(Concat(C, r^c))`` is the
   center bottleneck conv itself, reading ``r^c`` next to ``C``; eq. (12) ``F = Conv(Concat(F, r^p))``
   is a 1x1 conv on the bottleneck pixels with the fixed pixel coordinates ``r^p``;
3. pixel-cluster assignment (eq. 6): ``logits = S + K~p Q~c^T / sqrt(d)`` on the bottleneck features,
   ``Z = softmax_N(logits)``; ``S`` is the previous layer's ``logits`` (resized when the stride
   changes) when the residual path is enabled;
4. center update (eq. 7): MaX-DeepLab's memory attention -- the centers attend to the pixels and to
   each other under one softmax (its memory-to-pixel and memory-to-memory attention, eq. 3 for the
   pixel part), BN on the similarities and on the retrieved values -- plus the clustering term
   ``Z^T Vp`` (an unnormalised sum over the pixels, as k-means' update before the division), each
   with its own norm and output projection (as kMaX-DeepLab normalises its k-means update apart
   from the attention: one norm over their sum would let the clustering term, ~HW times larger,
   drown the attention); then MaX-DeepLab's FFN;
5. pixel update (eq. 8): ``x + Conv(act(BN(Z Vc)))`` with ``Vc`` the centers' values; without the
   switch, MaX-DeepLab's pixel-to-memory attention ``softmax_N(Qp Kc^T) Vc`` in its place.

Each output projection ends with a norm whose scale starts at zero (DeepLab2), so a fresh layer only
applies the activation to the centers and leaves the pixels unchanged. All switches off give MaX-DeepLab's
dual-path transformer layer plus the assignment (eq. 6) that the deep supervision reads. Memory and time
are linear in HW x N: no HW x HW tensor is formed. Centers are handled as B x D x N x 1 maps internally,
so that every projection is a 1x1 :func:`~..layers.conv_norm`.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F_
from torch import nn

from ..layers import DropPath, add_, attention_norm, conv_norm, get_activation

__all__ = ["CMTLayer", "pixel_coordinates", "resize_assignment_logits", "zero_init_output"]


def pixel_coordinates(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``r^p``: (2, H, W) pixel coordinates (h, w) normalised to [0, 1] (eq. 12)."""
    ys = torch.linspace(0.0, 1.0, height, device=device, dtype=dtype) if height > 1 else \
        torch.zeros(1, device=device, dtype=dtype)
    xs = torch.linspace(0.0, 1.0, width, device=device, dtype=dtype) if width > 1 else \
        torch.zeros(1, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=0)


def resize_assignment_logits(S: torch.Tensor, size) -> torch.Tensor:
    """Resize previous assignment logits S (B x N x h x w) to ``size`` = (H, W) (bilinear)."""
    if tuple(S.shape[-2:]) == tuple(size):
        return S
    return F_.interpolate(S, size=size, mode="bilinear", align_corners=False)


def zero_init_output(proj: nn.Module) -> None:
    """Start a residual update at zero: the scale of its norm is 0 (the weight, without a norm)."""
    norm = getattr(proj, "norm", None)
    target = norm.weight if norm is not None and getattr(norm, "weight", None) is not None else proj.weight
    nn.init.zeros_(target)


def _centers_map(C: torch.Tensor) -> torch.Tensor:
    """B x N x D -> B x D x N x 1."""
    return C.transpose(1, 2).unsqueeze(-1)


def _centers_seq(C: torch.Tensor) -> torch.Tensor:
    """B x D x N x 1 -> B x N x D."""
    return C.squeeze(-1).transpose(1, 2)


class CMTLayer(nn.Module):
    """Dual-path transformer layer with the CMT cross-attention (see the module docstring).

    Args:
        pixel_channels: channels of the pixel path ``x`` (2048 at stride 32, 1024 at stride 16).
        center_dim: channels D of the cluster centers (MaX-DeepLab: 256).
        bottleneck_dim: width at which the layer works (MaX-DeepLab: 256).
        key_dim, value_dim: total query/key and value depth over the heads (MaX-DeepLab: 128, 256);
            ``key_dim`` is also the depth of the assignment's K~p and Q~c.
        num_heads: heads of the memory and pixel-to-memory attention.
        ffn_dim: hidden width of the centers' FFN (MaX-DeepLab: 2048).
        num_points: M, reference points per center (eq. 9-10).
        ref_mlp_dim: hidden width of the reference-mask MLP (eq. 9).
        use_cluster_update: add the clustering term Z^T Vp to the center update (eq. 7).
        use_assignment_residual: add the previous layer's assignment logits S (eq. 6).
        use_pixel_update: update pixels with the clustering result Z Vc (eq. 8); otherwise with
            MaX-DeepLab's pixel-to-memory attention.
        use_reference_mask: predict reference masks e_hat = e + MLP(C), r = sigmoid(e_hat) (eq. 9-10).
        use_coord_conv: coord-conv on centers (with r^c) and pixels (with r^p) (eq. 11-12).
        first_layer: this layer projects the initial embedding e from the centers (eq. 9); later
            layers receive the previous layer's e_hat (the skip connection across layers).
        drop_path: drop-path rate of each residual update (pixels, attention, clustering, FFN).
    """

    def __init__(self, pixel_channels: int, center_dim: int = 256, bottleneck_dim: int = 256,
                 key_dim: int = 128, value_dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048,
                 num_points: int = 8, ref_mlp_dim: int = 2048, use_cluster_update: bool = True,
                 use_assignment_residual: bool = True, use_pixel_update: bool = True,
                 use_reference_mask: bool = True, use_coord_conv: bool = True,
                 first_layer: bool = False, norm: str = "BN", activation: str = "gelu",
                 drop_path: float = 0.0):
        super().__init__()
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"key_dim {key_dim} and value_dim {value_dim} must be divisible by "
                             f"num_heads {num_heads}")
        if use_coord_conv and not use_reference_mask:
            raise ValueError("coord-conv on the centers needs the reference masks "
                             "(USE_COORD_CONV requires USE_REFERENCE_MASK)")
        self.key_dim, self.value_dim, self.num_heads = key_dim, value_dim, num_heads
        self.num_points = num_points
        self.use_cluster_update = use_cluster_update
        self.use_assignment_residual = use_assignment_residual
        self.use_pixel_update = use_pixel_update
        self.use_reference_mask = use_reference_mask
        self.use_coord_conv = use_coord_conv
        self.first_layer = first_layer
        # ``act`` is only applied to temporaries (it may work in place at inference); ``act_input``
        # activates the layer's input, which the pixel residual still needs.
        self.act = get_activation(activation, inplace=True)
        self.act_input = get_activation(activation)

        # Eq. (9-10): the reference-mask embedding and its MLP on the layer's input centers.
        if use_reference_mask:
            if first_layer:
                self.ref_embed = nn.Linear(center_dim, 2 * num_points)   # e from the initial centers
            self.ref_mlp = nn.Sequential(
                conv_norm(center_dim, ref_mlp_dim, 1, norm=norm), get_activation(activation),
                nn.Conv2d(ref_mlp_dim, 2 * num_points, 1))
        # Bottlenecks; with coord-conv the center one is eq. (11)'s Conv(Concat(C, r^c)).
        coord_in = 2 * num_points if use_coord_conv else 0
        self.center_in = conv_norm(center_dim + coord_in, bottleneck_dim, 1, norm=norm)
        self.pixel_in = conv_norm(pixel_channels, bottleneck_dim, 1, norm=norm)
        if use_coord_conv:                                               # eq. (12)
            self.pixel_coord = conv_norm(bottleneck_dim + 2, bottleneck_dim, 1, norm=norm)
        # Eq. (6): assignment projections K~p (pixels) and Q~c (centers).
        self.assign_key = nn.Conv2d(bottleneck_dim, key_dim, 1)
        self.assign_query = nn.Conv2d(bottleneck_dim, key_dim, 1)
        # Queries, keys and values (DeepLab2's memory_qkv / pixel_qkv, each a 1x1 conv + norm).
        std = bottleneck_dim ** -0.5
        self.center_qkv = conv_norm(bottleneck_dim, 2 * key_dim + value_dim, 1, norm=norm)
        pixel_q = 0 if use_pixel_update else key_dim
        self.pixel_qkv = conv_norm(bottleneck_dim, pixel_q + key_dim + value_dim, 1, norm=norm)
        for proj in (self.center_qkv, self.pixel_qkv):
            nn.init.trunc_normal_(proj.weight, std=std)
        # Eq. (3) / (7): the centers' attention to pixels and centers, its norms and projection.
        self.similarity_norm = attention_norm(norm, num_heads, num_heads)
        self.center_value_norm = attention_norm(norm, value_dim, num_heads)
        self.center_out = conv_norm(value_dim, center_dim, 1, norm=norm)
        # Eq. (7)'s clustering term Z^T Vp: its own norm and projection.
        if use_cluster_update:
            self.cluster_norm = attention_norm(norm, value_dim)
            self.cluster_out = conv_norm(value_dim, center_dim, 1, norm=norm)
        # The centers' FFN.
        self.ffn_in = conv_norm(center_dim, ffn_dim, 1, norm=norm)
        self.ffn_out = conv_norm(ffn_dim, center_dim, 1, norm=norm)
        # Eq. (8), or MaX-DeepLab's pixel-to-memory attention: norms and projection.
        if not use_pixel_update:
            self.pixel_similarity_norm = attention_norm(norm, num_heads, num_heads)
        self.pixel_value_norm = attention_norm(norm, value_dim, num_heads)
        self.pixel_out = conv_norm(value_dim, pixel_channels, 1, norm=norm)
        outputs = [self.center_out, self.ffn_out, self.pixel_out]
        if use_cluster_update:
            outputs.append(self.cluster_out)
        for proj in outputs:
            zero_init_output(proj)
        self.drop_pixels, self.drop_attention = DropPath(drop_path), DropPath(drop_path)
        self.drop_cluster, self.drop_ffn = DropPath(drop_path), DropPath(drop_path)

    # --- the equations, one function each --------------------------------------------------------
    def reference_masks(self, C: torch.Tensor, e: Optional[torch.Tensor]):
        """Eq. (9-10): e_hat = e + MLP(C), r^c = sigmoid(e_hat). Returns (e_hat, r^c), each B x N x 2M
        laid out as [h_1..h_M, w_1..w_M]."""
        if e is None:
            if not self.first_layer:
                raise ValueError("a CMT layer after the first needs the previous layer's e_hat")
            e = self.ref_embed(C)
        e_hat = e + _centers_seq(self.ref_mlp(_centers_map(C)))
        return e_hat, torch.sigmoid(e_hat)

    def bottleneck(self, x: torch.Tensor, C: torch.Tensor, r_c: Optional[torch.Tensor]):
        """The layer's entry: ``Cb = act(BN(W [C, r^c]))`` (eq. 11 with coord-conv) and
        ``F = act(BN(W act(x)))``, then eq. (12) ``F = act(BN(W [F, r^p]))`` with coord-conv.
        Returns (F: B x Db x H x W, Cb: B x Db x N x 1)."""
        center_in = C if r_c is None else torch.cat([C, r_c], -1)
        Cb = self.act(self.center_in(_centers_map(center_in)))
        F = self.act(self.pixel_in(self.act_input(x)))
        if self.use_coord_conv:
            B, _, H, W = F.shape
            r_p = pixel_coordinates(H, W, F.device, F.dtype).unsqueeze(0).expand(B, -1, -1, -1)
            F = self.act(self.pixel_coord(torch.cat([F, r_p], 1)))
        return F, Cb

    def assignment_logits(self, F: torch.Tensor, Cb: torch.Tensor, S: Optional[torch.Tensor]):
        """Eq. (6) before the softmax: S + K~p Q~c^T / sqrt(d), as B x N x H x W."""
        k = self.assign_key(F)                                    # B x d x H x W
        q = self.assign_query(Cb)[..., 0]                         # B x d x N
        logits = torch.einsum("bdhw,bdn->bnhw", k, q) / math.sqrt(self.key_dim)
        if S is not None and self.use_assignment_residual:
            logits = logits + resize_assignment_logits(S, logits.shape[-2:])
        return logits

    def _heads(self, t: torch.Tensor, depth: int) -> torch.Tensor:
        """B x (h d) x L x 1 (or B x (h d) x H x W) -> B x h x d x L."""
        return t.reshape(t.shape[0], self.num_heads, depth // self.num_heads, -1)

    def center_update(self, F: torch.Tensor, Cb: torch.Tensor, C: torch.Tensor, Z: torch.Tensor):
        """Eq. (7) with MaX-DeepLab's memory attention, then the FFN:

        ``C' = act(C + P_a(act(BN(softmax_{HW+N}(BN(Qc [Kp; Kc]^T)) [Vp; Vc]))) + P_z(BN(Z^T Vp)))``,
        ``C'' = act(C' + FFN(C'))``; ``P_a``, ``P_z`` are 1x1 conv + norm. Without the clustering
        switch the ``Z^T Vp`` term is absent (MaX-DeepLab's update, eq. 3 with center self-attention).
        Returns (C'': B x N x D, the centers' keys and values for the pixel update)."""
        kd, vd = self.key_dim, self.value_dim
        q_c, k_c, v_c = torch.split(self.center_qkv(Cb), [kd, kd, vd], dim=1)   # B x . x N x 1
        pixel = self.pixel_qkv(F)
        k_p, v_p = pixel[:, -(kd + vd):-vd], pixel[:, -vd:]                       # B x . x H x W
        keys = torch.cat([self._heads(k_p, kd), self._heads(k_c, kd)], -1)       # B x h x dk x HW+N
        values = torch.cat([self._heads(v_p, vd), self._heads(v_c, vd)], -1)     # B x h x dv x HW+N
        sim = torch.einsum("bhdn,bhdl->bhnl", self._heads(q_c, kd), keys)        # B x h x N x HW+N
        attn = self.similarity_norm(sim).float().softmax(-1).to(values.dtype)
        read = torch.einsum("bhnl,bhdl->bhdn", attn, values)                     # B x h x dv x N
        read = self.act(self.center_value_norm(read.reshape(read.shape[0], vd, -1, 1)))
        update = self.drop_attention(self.center_out(read))
        if self.use_cluster_update:
            # Z^T Vp over all pixels, the same assignment for every head.
            clustered = torch.einsum("bnp,bdp->bdn", Z.flatten(2), v_p.flatten(2)).unsqueeze(-1)
            update = update + self.drop_cluster(self.cluster_out(self.cluster_norm(clustered)))
        C = self.act(add_(update, _centers_map(C)))
        C = self.act(add_(self.drop_ffn(self.ffn_out(self.act(self.ffn_in(C)))), C))
        return _centers_seq(C), (k_c, v_c)

    def pixel_update(self, x: torch.Tensor, F: torch.Tensor, Z: torch.Tensor, center_kv):
        """Eq. (8): ``x + P(act(BN(Z Vc)))``; without the switch MaX-DeepLab's pixel-to-memory
        attention ``x + P(act(BN(softmax_N(BN(Qp Kc^T)) Vc)))``. ``P`` is a 1x1 conv + norm back to
        the pixel width."""
        B, _, H, W = F.shape
        k_c, v_c = center_kv
        if self.use_pixel_update:
            read = torch.einsum("bnp,bdn->bdp", Z.flatten(2), v_c[..., 0])            # B x dv x HW
        else:
            q_p = self._heads(self.pixel_qkv(F)[:, : self.key_dim], self.key_dim)    # B x h x dk x HW
            sim = torch.einsum("bhdp,bhdn->bhpn", q_p, self._heads(k_c, self.key_dim))
            attn = self.pixel_similarity_norm(sim).float().softmax(-1).to(v_c.dtype)  # over N
            read = torch.einsum("bhpn,bhdn->bhdp", attn, self._heads(v_c, self.value_dim))
        read = self.act(self.pixel_value_norm(read.reshape(B, self.value_dim, H, W)))
        return add_(self.drop_pixels(self.pixel_out(read)), x)

    def forward(self, x: torch.Tensor, C: torch.Tensor, S: Optional[torch.Tensor] = None,
                e: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: B x W x H x W' pixel path (not activated).
            C: B x N x D cluster centers.
            S: previous assignment logits (B x N x h x w, any h, w) or None.
            e: previous reference-mask embedding e_hat (B x N x 2M) or None.
        Returns:
            dict with ``pixels`` (updated x, not activated), ``centers`` (updated C), ``logits``
            (this layer's assignment logits at the pixels' resolution: the clustering result for
            deep supervision and the next layer's S), and, with reference masks, ``ref_embed``
            (e_hat) and ``ref_points`` (r^c).
        """
        out = {}
        r_c = None
        if self.use_reference_mask:
            e_hat, r_c = self.reference_masks(C, e)
            out["ref_embed"], out["ref_points"] = e_hat, r_c
        F, Cb = self.bottleneck(x, C, r_c if self.use_coord_conv else None)
        logits = self.assignment_logits(F, Cb, S)
        Z = logits.float().softmax(dim=1).to(F.dtype)                     # softmax over N
        out["centers"], center_kv = self.center_update(F, Cb, C, Z)
        out["pixels"] = self.pixel_update(x, F, Z, center_kv)
        out["logits"] = logits
        return out
