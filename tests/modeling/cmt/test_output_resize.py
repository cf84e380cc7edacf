"""Band-by-band resize of the stride-4 predictions equals F.interpolate step by step."""
import pytest
import torch
import torch.nn.functional as F

from cmt_cops_d2.modeling.cmt.output_resize import OutputResize, bilinear_taps


def _step_by_step(x, padded, image, output):
    t = F.interpolate(x[None], size=padded, mode="bilinear", align_corners=False)
    t = t[:, :, : image[0], : image[1]]
    if tuple(output) != tuple(image):
        t = F.interpolate(t, size=output, mode="bilinear", align_corners=False)
    return t[0]


@pytest.mark.parametrize("in_size,out_size", [(5, 20), (8, 3), (7, 7), (1, 4), (6, 13)])
def test_bilinear_taps_are_f_interpolate_along_one_axis(in_size, out_size):
    torch.manual_seed(0)
    x = torch.randn(in_size, dtype=torch.float64)
    index, weight = bilinear_taps(in_size, out_size)
    ours = (x[index] * weight).sum(1)
    ref = F.interpolate(x[None, None, :, None], size=(out_size, 1), mode="bilinear",
                        align_corners=False)[0, 0, :, 0]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert (weight >= 0).all() and torch.allclose(weight.sum(1), torch.ones(out_size, dtype=x.dtype))


@pytest.mark.parametrize("source,padded,image,output", [
    ((8, 10), (32, 40), (30, 37), (30, 37)),     # crop only (the usual case)
    ((8, 10), (32, 40), (30, 37), (61, 20)),     # then up along H, down along W
    ((8, 8), (32, 32), (29, 31), (7, 9)),        # then down
    ((5, 6), (20, 24), (20, 24), (20, 24)),      # nothing to crop
    ((1, 1), (4, 4), (3, 2), (5, 5)),            # a single stride-4 cell
])
@pytest.mark.parametrize("max_elements", [1, 50, 1 << 22])
def test_resize_equals_f_interpolate_step_by_step(source, padded, image, output, max_elements):
    torch.manual_seed(1)
    x = torch.randn(3, *source, dtype=torch.float64)
    resize = OutputResize(source, padded, image, output, max_elements=max_elements)
    ref = _step_by_step(x, padded, image, output)
    torch.testing.assert_close(resize(x), ref, rtol=1e-10, atol=1e-10)
    # the bands tile the output rows exactly once, each within the element budget
    starts, rows = zip(*[(s, b.shape[0]) for s, b in resize.bands(x)])  # rows x W x C
    assert list(starts) == [sum(rows[:i]) for i in range(len(rows))] and sum(rows) == output[0]
    assert all(r == 1 or 3 * r * output[1] <= max_elements for r in rows)


def test_float32_input_matches_within_float_precision():
    torch.manual_seed(2)
    x = torch.randn(16, 9, 11) * 10
    resize = OutputResize((9, 11), (36, 44), (33, 41), (33, 41), max_elements=1000)
    torch.testing.assert_close(resize(x), _step_by_step(x, (36, 44), (33, 41), (33, 41)),
                               rtol=1e-5, atol=1e-5)
