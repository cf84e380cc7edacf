"""The Clustering Mask Transformer (CMT) cross-attention layer (CMT-DeepLab, Sec. 3.3, eq. 3-12).

Notation as in the paper. Pixels ``F`` (B x D_p x H x W, i.e. HW x D per image), cluster centers ``C``
(B x N x D_c). One layer:

1. location-sensitive clustering (eq. 9-12), if enabled:
   ``e_hat = e + MLP(C)`` (``e`` is the previous layer's ``e_hat``, or a projection of ``C`` in the first
   layer), ``r^c = sigmoid(e_hat)`` -- M reference points (h, w) in [0, 1] per center;
   ``C = Conv(Concat(C, r^c))``, ``F = Conv(Concat(F, r^p))`` with ``r^p`` the fixed pixel coordinates;
2. pixel-cluster assignment (eq. 6): ``logits = S + K~p Q~c^T``, ``Z = softmax_N(logits)``; ``S`` is the
   previous layer's ``logits`` (resized when the stride changes) when the residual path is enabled;
3. center update (eq. 7): ``C + (softmax_HW(Qc Kp^T) + Z^T) Vp``; without the clustering term this is
   the plain cross-attention of eq. (3);
4. pixel update (eq. 8): ``F + Z Vc``.

Each term has its own switch; all switched off gives the MaX-DeepLab-style cross-attention module: the
centers read the pixels by eq. (3) and the pixels read the centers by their own attention
``softmax_N(Qp Kc^T) Vc`` (MaX-DeepLab's pixel-to-memory attention), and there is no reference mask,
coord-conv or residual path between assignments.

Choices where the paper is silent (all documented in ``add_cmt_config``):

* dot products are scaled by ``1/sqrt(d)`` (per head for the attention, over the full key depth for the
  assignment logits);
* the cross-attention of eq. (3)/(7) is multi-head (``num_heads``); the clustering term ``Z^T Vp`` is the
  same for every head (Z has one assignment per pixel);
* ``Z^T Vp`` is a sum over all pixels (k-means' update before the division by the cluster size), whose
  scale grows with HW; the combined center update is therefore normalised (BatchNorm1d over channels)
  before the output projection, as kMaX-DeepLab does for its k-means update;
* both updates end with a norm whose scale is initialised to zero, so that a freshly initialised layer
  is the identity on ``C`` and ``F`` (as the backbone's residual blocks); the center update has an output
  projection, the pixel update none (the enclosing dual-path block's last 1x1 conv follows, as in
  MaX-DeepLab);
* the coord-conv is a 1x1 convolution (a linear layer on the centers) back to the input width.

Memory and time are linear in HW x N: no HW x HW tensor is formed.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F_
from torch import nn

__all__ = ["CMTLayer", "pixel_coordinates", "resize_assignment_logits"]


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


class CMTLayer(nn.Module):
    """Cross-attention between pixels and cluster centers, from the clustering perspective (eq. 3-12).

    Args:
        pixel_dim: channels D_p of the pixel features F.
        center_dim: channels D_c of the cluster centers C.
        key_dim: depth of queries / keys (all attention and assignment products).
        num_heads: heads of the cross-attention (eq. 3 / 7) and of the baseline pixel attention.
        num_points: M, reference points per center (eq. 9-10).
        use_cluster_update: add the clustering term Z^T Vp to the center update (eq. 7).
        use_assignment_residual: add the previous layer's assignment logits S (eq. 6).
        use_pixel_update: update pixels with the clustering result, F + Z Vc (eq. 8); otherwise with
            their own attention over the centers (MaX-DeepLab).
        use_reference_mask: predict reference masks e_hat = e + MLP(C), r = sigmoid(e_hat) (eq. 9-10).
        use_coord_conv: coord-conv on centers (with r^c) and pixels (with r^p) (eq. 11-12).
        first_layer: this layer projects the initial embedding e from the centers (eq. 9); later
            layers receive the previous layer's e_hat (the skip connection across layers).
    """

    def __init__(self, pixel_dim: int, center_dim: int, key_dim: int = 128, num_heads: int = 8,
                 num_points: int = 8, use_cluster_update: bool = True,
                 use_assignment_residual: bool = True, use_pixel_update: bool = True,
                 use_reference_mask: bool = True, use_coord_conv: bool = True,
                 first_layer: bool = False):
        super().__init__()
        if key_dim % num_heads or pixel_dim % num_heads or center_dim % num_heads:
            raise ValueError(f"key_dim {key_dim}, pixel_dim {pixel_dim} and center_dim {center_dim} "
                             f"must be divisible by num_heads {num_heads}")
        if use_coord_conv and not use_reference_mask:
            raise ValueError("coord-conv on the centers needs the reference masks "
                             "(USE_COORD_CONV requires USE_REFERENCE_MASK)")
        self.pixel_dim, self.center_dim, self.key_dim = pixel_dim, center_dim, key_dim
        self.num_heads, self.num_points = num_heads, num_points
        self.use_cluster_update = use_cluster_update
        self.use_assignment_residual = use_assignment_residual
        self.use_pixel_update = use_pixel_update
        self.use_reference_mask = use_reference_mask
        self.use_coord_conv = use_coord_conv

        self.first_layer = first_layer
        if use_reference_mask:
            if first_layer:
                self.ref_embed = nn.Linear(center_dim, 2 * num_points)  # e from the initial centers
            self.ref_mlp = nn.Sequential(nn.Linear(center_dim, center_dim), nn.GELU(),
                                         nn.Linear(center_dim, 2 * num_points))
        if use_coord_conv:
            self.center_coord = nn.Linear(center_dim + 2 * num_points, center_dim)
            self.pixel_coord = nn.Conv2d(pixel_dim + 2, pixel_dim, 1)

        # Eq. (6): assignment projections K~p (pixels) and Q~c (centers).
        self.assign_key = nn.Conv2d(pixel_dim, key_dim, 1)
        self.assign_query = nn.Linear(center_dim, key_dim)
        # Eq. (3) / (7): cross-attention projections Qc, Kp, Vp.
        self.center_query = nn.Linear(center_dim, key_dim)
        self.pixel_key = nn.Conv2d(pixel_dim, key_dim, 1)
        self.pixel_value = nn.Conv2d(pixel_dim, center_dim, 1)
        self.center_update_norm = nn.BatchNorm1d(center_dim)
        self.center_out = nn.Linear(center_dim, center_dim)
        self.center_out_norm = nn.LayerNorm(center_dim)
        # Eq. (8): Vc, or the baseline pixel attention's Qp, Kc, Vc.
        self.center_value = nn.Linear(center_dim, pixel_dim)
        if not use_pixel_update:
            self.pixel_query = nn.Conv2d(pixel_dim, key_dim, 1)
            self.center_key = nn.Linear(center_dim, key_dim)
        # No output projection on the pixel path: as in MaX-DeepLab's dual-path block, the enclosing
        # block's last 1x1 conv follows directly.
        self.pixel_out_norm = nn.BatchNorm2d(pixel_dim)
        nn.init.zeros_(self.center_out_norm.weight)
        nn.init.zeros_(self.pixel_out_norm.weight)

    # --- the equations, one function each --------------------------------------------------------
    def reference_masks(self, C: torch.Tensor, e: Optional[torch.Tensor]):
        """Eq. (9-10): e_hat = e + MLP(C), r^c = sigmoid(e_hat). Returns (e_hat, r^c), each B x N x 2M
        laid out as [h_1..h_M, w_1..w_M]."""
        if e is None:
            if not self.first_layer:
                raise ValueError("a CMT layer after the first needs the previous layer's e_hat")
            e = self.ref_embed(C)
        e_hat = e + self.ref_mlp(C)
        return e_hat, torch.sigmoid(e_hat)

    def coord_conv(self, F: torch.Tensor, C: torch.Tensor, r_c: torch.Tensor):
        """Eq. (11-12): C = Conv(Concat(C, r^c)), F = Conv(Concat(F, r^p))."""
        B, _, H, W = F.shape
        r_p = pixel_coordinates(H, W, F.device, F.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        return self.pixel_coord(torch.cat([F, r_p], 1)), self.center_coord(torch.cat([C, r_c], -1))

    def assignment_logits(self, F: torch.Tensor, C: torch.Tensor, S: Optional[torch.Tensor]):
        """Eq. (6) before the softmax: S + K~p Q~c^T, as B x N x H x W."""
        k = self.assign_key(F)                                  # B x d x H x W
        q = self.assign_query(C)                                # B x N x d
        logits = torch.einsum("bdhw,bnd->bnhw", k, q) / math.sqrt(self.key_dim)
        if S is not None and self.use_assignment_residual:
            logits = logits + resize_assignment_logits(S, logits.shape[-2:])
        return logits

    def center_update(self, F: torch.Tensor, C: torch.Tensor, Z: torch.Tensor):
        """Eq. (7): C + (softmax_HW(Qc Kp^T) + Z^T) Vp; eq. (3) without the clustering term."""
        B, _, H, W = F.shape
        h, dk, dv = self.num_heads, self.key_dim // self.num_heads, self.center_dim // self.num_heads
        q = self.center_query(C).view(B, -1, h, dk)                       # B x N x h x dk
        k = self.pixel_key(F).reshape(B, h, dk, H * W)                    # B x h x dk x HW
        v = self.pixel_value(F).reshape(B, h, dv, H * W)                  # B x h x dv x HW
        attn = torch.einsum("bnhd,bhdp->bhnp", q, k).float() / math.sqrt(dk)
        attn = attn.softmax(dim=-1).to(v.dtype)                           # softmax over HW
        update = torch.einsum("bhnp,bhdp->bnhd", attn, v).reshape(B, -1, self.center_dim)
        if self.use_cluster_update:
            # Z^T Vp: every head uses the same assignment Z (B x N x HW).
            update = update + torch.einsum("bnp,bhdp->bnhd", Z.flatten(2),
                                           v).reshape(B, -1, self.center_dim)
        update = self.center_update_norm(update.transpose(1, 2)).transpose(1, 2)
        return C + self.center_out_norm(self.center_out(update))

    def pixel_update(self, F: torch.Tensor, C: torch.Tensor, Z: torch.Tensor):
        """Eq. (8): F + Z Vc; without the switch, F + softmax_N(Qp Kc^T) Vc (MaX-DeepLab)."""
        B, _, H, W = F.shape
        v = self.center_value(C)                                          # B x N x Dp
        if self.use_pixel_update:
            update = torch.einsum("bnhw,bnd->bdhw", Z, v)
        else:
            h, dk, dv = self.num_heads, self.key_dim // self.num_heads, self.pixel_dim // self.num_heads
            q = self.pixel_query(F).reshape(B, h, dk, H, W)
            k = self.center_key(C).view(B, -1, h, dk)
            attn = torch.einsum("bhdxy,bnhd->bhnxy", q, k).float() / math.sqrt(dk)
            attn = attn.softmax(dim=2).to(v.dtype)                        # softmax over N
            update = torch.einsum("bhnxy,bnhd->bhdxy", attn, v.view(B, -1, h, dv))
            update = update.reshape(B, self.pixel_dim, H, W)
        return F + self.pixel_out_norm(update)

    def forward(self, F: torch.Tensor, C: torch.Tensor, S: Optional[torch.Tensor] = None,
                e: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """
        Args:
            F: B x D_p x H x W pixel features.
            C: B x N x D_c cluster centers.
            S: previous assignment logits (B x N x h x w, any h, w) or None.
            e: previous reference-mask embedding e_hat (B x N x 2M) or None.
        Returns:
            dict with ``pixels`` (updated F), ``centers`` (updated C), ``logits`` (this layer's
            assignment logits, B x N x H x W: the clustering result for deep supervision and the next
            layer's S), and, with reference masks, ``ref_embed`` (e_hat) and ``ref_points`` (r^c).
        """
        out = {}
        if self.use_reference_mask:
            e_hat, r_c = self.reference_masks(C, e)
            out["ref_embed"], out["ref_points"] = e_hat, r_c
            if self.use_coord_conv:
                F, C = self.coord_conv(F, C, r_c)
        logits = self.assignment_logits(F, C, S)
        Z = logits.float().softmax(dim=1).to(F.dtype)                     # softmax over N
        out["centers"] = self.center_update(F, C, Z)
        out["pixels"] = self.pixel_update(F, C, Z)
        out["logits"] = logits
        return out
