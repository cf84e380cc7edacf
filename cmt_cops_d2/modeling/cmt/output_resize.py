"""From stride-4 predictions to the output resolution, a band of rows at a time.

At inference the stride-4 maps (N mask logits, K semantic scores) go to the output size in up to two
bilinear resizes (``align_corners=False``): up to the padded input size, crop to the image, and, when
the caller asked for another output size (Detectron2's ``height`` / ``width``), resize again. At
1281 x 1281 the N = 128 upsampled mask logits alone are 840 MB, and every step that reads them
(softmax statistics, top-k, thresholds) would allocate as much again.

:class:`OutputResize` composes the steps into one separable linear map per axis, ``out = A_h X A_w^T``
where each row of ``A`` has at most 4 non-zero taps (2 per bilinear step), and produces the output in
bands of rows, so no full-resolution ``N x H x W`` tensor exists. The bands are pixel-major
(``rows x W x N``), the layout the per-pixel reductions over clusters read fastest. Each bilinear
step uses PyTorch's ``F.interpolate`` formula: output index ``i`` reads
``src = max((i + 0.5) * in / out - 0.5, 0)``, taps ``floor(src)`` and ``min(floor(src) + 1, in - 1)``
with weights ``1 - frac`` and ``frac``.
"""
from typing import Iterator, Tuple

import torch

__all__ = ["bilinear_taps", "OutputResize", "ResizedMaps"]


def bilinear_taps(in_size: int, out_size: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One axis of ``F.interpolate(mode="bilinear", align_corners=False)`` from ``in_size`` to
    ``out_size``: ``(index, weight)``, each ``out_size x 2``, with ``out[i] = sum_t weight[i, t] *
    x[index[i, t]]``."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    frac = (src - i0).clamp(0, 1)
    index = torch.stack([i0, (i0 + 1).clamp(max=in_size - 1)], 1)
    return index, torch.stack([1 - frac, frac], 1)


def _compose(first: Tuple[torch.Tensor, torch.Tensor], second: Tuple[torch.Tensor, torch.Tensor]):
    """Taps of ``second`` applied after ``first`` (``second`` indexes ``first``'s outputs)."""
    (i1, w1), (i2, w2) = first, second
    index = i1[i2].flatten(1)                                   # out x 4
    weight = (w2[:, :, None] * w1[i2]).flatten(1)
    return index, weight


class OutputResize:
    """Resize ``C x h4 x w4`` stride-4 maps to the output: bilinear to ``padded``, crop to ``image``,
    bilinear to ``output`` (skipped when equal to ``image``), as ``F.interpolate`` would do step by step.

    The output is produced pixel-major (``rows x width x C``, channels contiguous): per-pixel
    reductions over the channels (softmax over clusters, top-k, argmax) then read contiguous memory.

    Args:
        source: ``(h4, w4)``, the stride-4 size; padded: the padded input size; image: the image's size
            inside the padding; output: the requested output size.
        max_elements: largest number of output elements (``rows x width x C``) per band.
    """

    def __init__(self, source, padded, image, output, *, max_elements: int = 1 << 22, device=None):
        self.output = tuple(output)
        self.max_elements = int(max_elements)
        taps = []
        for axis in (0, 1):
            t = bilinear_taps(source[axis], padded[axis], device)
            t = (t[0][: image[axis]], t[1][: image[axis]])      # crop
            if output[axis] != image[axis]:
                t = _compose(t, bilinear_taps(image[axis], output[axis], device))
            taps.append(t)
        (self.row_index, self.row_weight), (self.col_index, self.col_weight) = taps

    def rows(self, x_hwc: torch.Tensor, start: int, end: int, out: torch.Tensor = None) -> torch.Tensor:
        """Output rows ``start:end`` of the resized map, ``(end - start) x out_w x C``, from the
        pixel-major source ``x_hwc`` (``h4 x w4 x C``, at least float32); written into ``out`` (a
        contiguous tensor of that shape) when given."""
        index = self.row_index[start:end]
        lo, hi = int(index.min()), int(index.max()) + 1
        src = x_hwc[lo:hi]
        # Columns: each output column is a weighted sum of <= 4 source columns (C-vectors).
        weight = self.col_weight.to(src.dtype)[:, :, None]
        cols = src.index_select(1, self.col_index[:, 0]).mul_(weight[:, 0])
        for t in range(1, self.col_index.shape[1]):
            cols.addcmul_(src.index_select(1, self.col_index[:, t]), weight[:, t])
        # Rows: the band's rows as a small dense matrix (rows x source rows, <= 4 taps per row).
        matrix = cols.new_zeros((end - start, hi - lo))
        matrix.scatter_add_(1, index - lo, self.row_weight[start:end].to(cols.dtype))
        if out is None:
            return torch.matmul(matrix, cols.flatten(1)).view(end - start, *cols.shape[1:])
        torch.matmul(matrix, cols.flatten(1), out=out.view(end - start, -1))
        return out

    def bands(self, x: torch.Tensor, out: torch.Tensor = None) -> Iterator[Tuple[int, torch.Tensor]]:
        """``(start_row, rows x out_w x C)`` bands of the resized ``x`` (``C x h4 x w4``) covering
        the output, each at most ``max_elements`` elements (at least one row); views of ``out``
        (``out_h x out_w x C``) when given."""
        height, width = self.output
        x_hwc = x.permute(1, 2, 0).to(torch.promote_types(x.dtype, torch.float32)).contiguous()
        step = max(1, self.max_elements // max(1, x.shape[0] * width))
        for start in range(0, height, step):
            end = min(height, start + step)
            yield start, self.rows(x_hwc, start, end, None if out is None else out[start:end])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The whole resized map as ``C x out_h x out_w`` (a view of pixel-major memory), written band
        by band."""
        out = x.new_empty(self.output + (x.shape[0],), dtype=torch.promote_types(x.dtype, torch.float32))
        for _ in self.bands(x, out):
            pass
        return out.permute(2, 0, 1)


class ResizedMaps:
    """``resize(x)`` produced on demand: ``.shape`` is the resized ``C x H x W`` shape and ``.bands()``
    yields pixel-major ``(start_row, rows x W x C)`` bands (what the panoptic merges read instead of a
    full tensor)."""

    def __init__(self, resize: OutputResize, x: torch.Tensor):
        self.resize, self.x = resize, x
        self.shape = torch.Size((x.shape[0],) + resize.output)
        self.device = x.device

    def bands(self) -> Iterator[Tuple[int, torch.Tensor]]:
        return self.resize.bands(self.x)
