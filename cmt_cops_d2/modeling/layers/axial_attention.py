"""Position-sensitive multi-head axial attention (Axial-DeepLab, ECCV 2020; MaX-, CMT-DeepLab).

One :class:`AxialAttention` attends along a single axis (height or width) of an ``[N, C, H, W]``
map: every column (height axis) or row (width axis) is an independent 1D sequence of length
``L``. For a query at position ``o`` and a key at position ``p`` of the same sequence (Axial-DeepLab
eq. 4, with the normalisation of DeepLab2 / MaX-DeepLab)::

    logits[o, p] = BN_qk(q_o . k_p) + BN_qr(q_o . r^q_{p-o}) + BN_kr(k_p . r^k_{p-o})
    w[o, :]      = softmax_p(logits[o, :])                         (computed in float32)
    y_o          = BN_v(sum_p w[o, p] v_p) + BN_rv(sum_p w[o, p] r^v_{p-o})

* ``q, k, v`` come from one 1x1 convolution followed by a norm (``qkv_norm``); q and k have
  ``key_channels / num_heads`` channels per head, v has ``value_channels / num_heads``.
* No ``1/sqrt(d)`` scaling: each logit term has its own norm **per head** (``similarity_norm``: one
  channel per (term, head)), and each retrieved term has its own norm per output channel
  (``output_norm``: one channel per (term, value channel)). With ``norm="GN"`` these two norms are
  GroupNorms with one group per (term, head), i.e. instance normalisation of each head's map;
  with BN/SyncBN/FrozenBN they are batch norms with the channel layout above, as in DeepLab2.
* ``r^q, r^k, r^v`` are **relative** position embeddings looked up in one table per term of
  ``2 * max_span - 1`` rows (relative distances ``-(max_span-1) .. max_span-1``), shared by all
  heads (as in DeepLab2, so parameter counts match MaX-S). Nothing depends on the input size:
  distances beyond ``max_span - 1`` are **clipped** to the table's first / last row (all keys
  farther than that share one embedding). The default ``max_span=255`` makes attention fully
  position-resolved for sequences up to 255 positions, e.g. the 81 positions of a 1281x1281 input
  at stride 16 (DeepLab2 uses the same 255 / 509-row table).
* Attention is global along the axis (no local windows). Memory per pass is
  ``O(N * num_heads * H * W * L)``: the largest tensors are the ``[N, heads, O, L, L]`` logits
  (``O`` = the other axis), never an ``HW x HW`` matrix.
* ``stride > 1`` subsamples the output along the attended axis **after** attention
  (``y[..., ::stride]``), as DeepLab2 does in stride-2 axial blocks; queries are not subsampled
  before attention, so batch-norm statistics are exactly DeepLab2's. Output length is
  ``ceil(L / stride)``, the same as a 3x3 convolution with stride 2 and padding 1.

Einsum subscripts used throughout: ``n`` batch, ``h`` head, ``d`` channel within a head,
``o`` position on the other axis, ``l`` query position, ``m`` key position.
"""
from typing import Optional

import torch
from torch import nn
from detectron2.layers import get_norm

from .conv_norm import batch_norm_affine, conv_then_norm
from .inference import InferenceShortcuts

__all__ = ["AxialAttention", "AxialAttention2D", "relative_distance_index", "attention_norm"]


def relative_distance_index(
    query_length: int, key_length: int, max_span: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Row of the relative-embedding table for each (query, key) pair.

    Query ``l`` and key ``m`` (both indexed from 0 on the same axis) have relative distance
    ``m - l``; it is clipped to ``[-(max_span - 1), max_span - 1]`` and shifted by ``max_span - 1``.

    Returns:
        ``[query_length, key_length]`` int64 tensor with values in ``[0, 2 * max_span - 2]``.
    """
    q = torch.arange(query_length, device=device)
    k = torch.arange(key_length, device=device)
    dist = (k[None, :] - q[:, None]).clamp(-(max_span - 1), max_span - 1)
    return dist + (max_span - 1)


def attention_norm(norm, num_channels: int, num_groups: Optional[int] = None) -> nn.Module:
    """Norm layer for attention tensors viewed as ``[N, num_channels, *, *]``.

    ``num_groups`` is the number of independent (term, head) groups among the channels: used as
    the GroupNorm group count when ``norm == "GN"`` (Detectron2's fixed 32 groups would mix heads).
    Other norms, and GN without ``num_groups``, come from :func:`detectron2.layers.get_norm`; an
    empty norm gives ``nn.Identity``.
    """
    if norm == "GN" and num_groups is not None:
        return nn.GroupNorm(num_groups, num_channels)
    module = get_norm(norm, num_channels)
    return nn.Identity() if module is None else module


class AxialAttention(nn.Module, InferenceShortcuts):
    """Position-sensitive multi-head self-attention along one axis of an ``[N, C, H, W]`` map.

    Args:
        in_channels: ``C`` of the input.
        key_channels: total query/key channels over all heads (MaX-S axial block: ``f``).
        value_channels: total value channels over all heads = output channels (MaX-S: ``2f``).
        axis: ``"height"`` (attend along H, each column separately) or ``"width"``.
        num_heads: number of heads; must divide ``key_channels`` and ``value_channels``.
        max_span: relative distances up to ``max_span - 1`` get their own embedding; larger ones
            are clipped (see the module docstring). Independent of the input size.
        stride: subsample the attended axis by this factor after attention (1 or 2 in practice).
        norm: ``"BN"``, ``"SyncBN"``, ``"FrozenBN"``, ``"GN"``, ``""`` or a callable (see
            :func:`attention_norm`).
        rpe_init_std: std of the truncated-normal initialisation of the embedding tables.
        use_query_rpe, use_key_rpe, use_value_rpe: include the ``q.r^q``, ``k.r^k`` and ``w.r^v``
            terms (all True in Axial-DeepLab / MaX-DeepLab).
    """

    def __init__(
        self,
        in_channels: int,
        key_channels: int,
        value_channels: int,
        *,
        axis: str = "height",
        num_heads: int = 8,
        max_span: int = 255,
        stride: int = 1,
        norm="BN",
        rpe_init_std: float = 1.0,
        use_query_rpe: bool = True,
        use_key_rpe: bool = True,
        use_value_rpe: bool = True,
    ):
        super().__init__()
        if axis not in ("height", "width"):
            raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(
                f"key_channels ({key_channels}) and value_channels ({value_channels}) must be "
                f"divisible by num_heads ({num_heads})"
            )
        if max_span < 1:
            raise ValueError(f"max_span must be >= 1, got {max_span}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.in_channels = in_channels
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.axis = axis
        self.num_heads = num_heads
        self.max_span = max_span
        self.stride = stride
        self.use_query_rpe = use_query_rpe
        self.use_key_rpe = use_key_rpe
        self.use_value_rpe = use_value_rpe
        dk = key_channels // num_heads
        dv = value_channels // num_heads

        self.qkv = nn.Conv2d(in_channels, 2 * key_channels + value_channels, 1, bias=False)
        self.qkv_norm = attention_norm(norm, 2 * key_channels + value_channels)
        rows = 2 * max_span - 1
        self.query_rpe = nn.Parameter(torch.empty(rows, dk)) if use_query_rpe else None
        self.key_rpe = nn.Parameter(torch.empty(rows, dk)) if use_key_rpe else None
        self.value_rpe = nn.Parameter(torch.empty(rows, dv)) if use_value_rpe else None
        self.num_similarity_terms = 1 + int(use_query_rpe) + int(use_key_rpe)
        self.num_output_terms = 1 + int(use_value_rpe)
        self.similarity_norm = attention_norm(
            norm, self.num_similarity_terms * num_heads, self.num_similarity_terms * num_heads
        )
        self.output_norm = attention_norm(
            norm, self.num_output_terms * value_channels, self.num_output_terms * num_heads
        )

        # Transformer-style init without the BN: std = fan_in^-0.5 (as in SASA / ViT / DeepLab2).
        std = in_channels ** -0.5
        nn.init.trunc_normal_(self.qkv.weight, std=std, a=-2 * std, b=2 * std)
        std = rpe_init_std
        for table in (self.query_rpe, self.key_rpe, self.value_rpe):
            if table is not None:
                nn.init.trunc_normal_(table, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[N, in_channels, H, W]``.

        Returns:
            ``[N, value_channels, H', W']`` with the attended axis subsampled by ``stride``
            (``H' = ceil(H / stride)`` for the height axis, else ``H' = H``; likewise ``W'``).
        """
        if self.shortcuts_apply():
            similarity_affine = batch_norm_affine(self.similarity_norm)
            output_affine = batch_norm_affine(self.output_norm)
            if similarity_affine is not None and output_affine is not None:
                return self._forward_folded(x, similarity_affine[0], output_affine)
        n = x.shape[0]
        heads, K, V = self.num_heads, self.key_channels, self.value_channels
        qkv = self.qkv_norm(self.qkv(x))
        if self.axis == "height":
            qkv = qkv.transpose(2, 3)  # [N, C, W, H]: the attended axis is last
        O, L = qkv.shape[-2:]
        q = qkv[:, :K].reshape(n, heads, K // heads, O, L)
        k = qkv[:, K : 2 * K].reshape(n, heads, K // heads, O, L)
        v = qkv[:, 2 * K :].reshape(n, heads, V // heads, O, L)
        index = relative_distance_index(L, L, self.max_span, device=x.device)  # [l, m]

        # Similarity terms, each [n, h, o, l, m].
        terms = [torch.einsum("nhdol,nhdom->nholm", q, k)]
        if self.use_query_rpe:
            r_q = self.query_rpe[index].to(q.dtype)  # [l, m, d]
            terms.append(torch.einsum("nhdol,lmd->nholm", q, r_q))
        if self.use_key_rpe:
            r_k = self.key_rpe[index].to(k.dtype)
            terms.append(torch.einsum("nhdom,lmd->nholm", k, r_k))
        logits = torch.stack(terms, dim=1).reshape(n, self.num_similarity_terms * heads, O * L, L)
        logits = self.similarity_norm(logits)
        logits = logits.reshape(n, self.num_similarity_terms, heads, O, L, L).sum(dim=1)
        # Softmax in (at least) float32, also under fp16 / bf16 autocast.
        softmax_dtype = torch.promote_types(logits.dtype, torch.float32)
        weights = torch.softmax(logits.to(softmax_dtype), dim=-1).to(v.dtype)  # [n, h, o, l, m]

        # Retrieved terms, each [n, h, d, o, l].
        outputs = [torch.einsum("nholm,nhdom->nhdol", weights, v)]
        if self.use_value_rpe:
            r_v = self.value_rpe[index].to(v.dtype)
            outputs.append(torch.einsum("nholm,lmd->nhdol", weights, r_v))
        y = torch.stack(outputs, dim=1).reshape(n, self.num_output_terms * V, O, L)
        y = self.output_norm(y).reshape(n, self.num_output_terms, V, O, L).sum(dim=1)

        if self.stride > 1:
            y = y[..., :: self.stride]
        if self.axis == "height":
            y = y.transpose(2, 3)
        return y.contiguous()

    def _forward_folded(self, x: torch.Tensor, similarity_scale: torch.Tensor, output_affine):
        """:meth:`forward` with eval-mode batch norms folded in (the inference shortcuts), same result.

        Each similarity norm scales its term per head: the scale goes onto ``q`` or ``k`` before the
        product, and its shift, constant along the softmax axis, drops out. Each output norm is a scale
        and shift per value channel: the scale goes onto ``v`` (or the retrieved ``r^v`` term), the
        shifts are added once. No stacked ``[n, terms, h, o, l, m]`` tensor, no norm passes, and with
        ``stride > 1`` only the kept queries are computed.
        """
        n = x.shape[0]
        heads, K, V, s = self.num_heads, self.key_channels, self.value_channels, self.stride
        dk, dv = K // heads, V // heads
        qkv = conv_then_norm(x, self.qkv, self.qkv_norm)
        if self.axis == "height":
            qkv = qkv.transpose(2, 3)  # [N, C, W, H]: the attended axis is last
        O, L = qkv.shape[-2:]
        q = qkv[:, :K].reshape(n, heads, dk, O, L)[..., ::s]
        k = qkv[:, K : 2 * K].reshape(n, heads, dk, O, L)
        v = qkv[:, 2 * K :].reshape(n, heads, dv, O, L)
        index = relative_distance_index(L, L, self.max_span, device=x.device)[::s]  # [l, m]
        scale = iter(similarity_scale.to(q.dtype).view(-1, heads, 1, 1, 1))

        logits = torch.einsum("nhdol,nhdom->nholm", q * next(scale), k)
        if self.use_query_rpe:
            r_q = self.query_rpe[index].to(q.dtype)
            logits += torch.einsum("nhdol,lmd->nholm", q * next(scale), r_q)
        if self.use_key_rpe:
            r_k = self.key_rpe[index].to(k.dtype)
            logits += torch.einsum("nhdom,lmd->nholm", k * next(scale), r_k)
        softmax_dtype = torch.promote_types(logits.dtype, torch.float32)
        weights = torch.softmax(logits.to(softmax_dtype), dim=-1).to(v.dtype)

        out_scale, out_shift = (t.to(v.dtype).view(-1, heads, dv, 1, 1) for t in output_affine)
        y = torch.einsum("nholm,nhdom->nhdol", weights, v * out_scale[0])
        if self.use_value_rpe:
            r_v = self.value_rpe[index].to(v.dtype)
            y += torch.einsum("nholm,lmd->nhdol", weights, r_v) * out_scale[1]
        y = (y + out_shift.sum(0)).reshape(n, V, O, -1)
        if self.axis == "height":
            y = y.transpose(2, 3)
        return y.contiguous()

    def extra_repr(self) -> str:
        return (
            f"axis={self.axis}, heads={self.num_heads}, key_channels={self.key_channels}, "
            f"value_channels={self.value_channels}, max_span={self.max_span}, stride={self.stride}"
        )


class AxialAttention2D(nn.Module):
    """Height-axis attention followed by width-axis attention (the "3x3 conv" of an axial block).

    Each axis is subsampled by ``stride`` right after its own attention (DeepLab2 order), so the
    width pass runs on the already height-strided map.

    Args:
        in_channels: input channels.
        key_channels, value_channels: per axis layer (MaX-S: ``f`` and ``2f``); the width layer's
            input is the height layer's output (``value_channels``).
        **kwargs: ``num_heads``, ``max_span``, ``norm``, ``rpe_init_std``, ``use_*_rpe`` for both
            :class:`AxialAttention` layers.
    """

    def __init__(
        self, in_channels: int, key_channels: int, value_channels: int, *, stride: int = 1, **kwargs
    ):
        super().__init__()
        self.height_axis = AxialAttention(
            in_channels, key_channels, value_channels, axis="height", stride=stride, **kwargs
        )
        self.width_axis = AxialAttention(
            value_channels, key_channels, value_channels, axis="width", stride=stride, **kwargs
        )
        self.out_channels = value_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, in_channels, H, W]`` -> ``[N, value_channels, ceil(H/stride), ceil(W/stride)]``."""
        return self.width_axis(self.height_axis(x))
