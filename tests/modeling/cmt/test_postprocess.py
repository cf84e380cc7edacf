"""Mask-wise and per-pixel merging on hand-made cluster predictions."""
import pytest
import torch

from cmt_cops_d2.modeling.cmt.postprocess import panoptic_inference, semantic_inference

K = 3          # classes 0, 1 things; 2 stuff; index 3 = void
BIG = 20.0


def _cls(*rows):
    """rows of (class, prob): logits whose softmax gives prob on that class, rest spread evenly."""
    out = torch.zeros(len(rows), K + 1)
    for i, (c, p) in enumerate(rows):
        out[i] = torch.log(torch.full((K + 1,), (1 - p) / K))
        out[i, c] = torch.log(torch.tensor(p))
    return out


def _masks(*regions, h=4, w=6):
    m = torch.full((len(regions), h, w), -BIG)
    for i, r in enumerate(regions):
        if r is not None:
            m[i][r] = BIG
    return m


@pytest.mark.parametrize("merge", ["mask", "pixel"])
def test_things_stuff_and_void(merge):
    left = (slice(None), slice(0, 3))
    right_top = (slice(0, 2), slice(3, 6))
    right_bottom = (slice(2, 4), slice(3, 6))
    cls = _cls((0, 0.9), (2, 0.8), (2, 0.9), (1, 0.3))
    masks = _masks(left, right_top, right_bottom, None)
    pan, segs = panoptic_inference(cls, masks, thing_ids=[0, 1], merge=merge)
    by_id = {s["id"]: s for s in segs}
    assert len(segs) == 2                                    # two stuff clusters of class 2 merged
    thing = by_id[int(pan[0, 0])]
    stuff = by_id[int(pan[0, 5])]
    assert (thing["category_id"], thing["isthing"]) == (0, True)
    assert (stuff["category_id"], stuff["isthing"]) == (2, False)
    assert (pan[:, :3] == thing["id"]).all() and (pan[:, 3:] == stuff["id"]).all()


@pytest.mark.parametrize("merge", ["mask", "pixel"])
def test_low_confidence_clusters_leave_void(merge):
    cls = _cls((0, 0.6), (2, 0.45))                           # below 0.7 (thing) and 0.5 (stuff)
    masks = _masks((slice(None), slice(0, 3)), (slice(None), slice(3, 6)))
    pan, segs = panoptic_inference(cls, masks, thing_ids=[0, 1], merge=merge)
    assert segs == [] and (pan == 0).all()


def test_mask_wise_drops_a_cluster_whose_mask_is_mostly_taken():
    """Cluster 1 overlaps cluster 0 (both above 0.4 there); the better-ranked one keeps the overlap."""
    h, w = 4, 6
    logits = torch.full((3, h, w), -BIG)
    logits[0, :, :4] = 0.0
    logits[1, :, :4] = 0.0          # 0 and 1 tie at 0.5 on columns 0..3
    logits[1, :, 4] = 0.0           # 1 also shares column 4 with 2 (0.5 / 0.5)
    logits[2, :, 4:] = 0.0
    cls = _cls((0, 0.95), (1, 0.9), (2, 0.9))
    pan, segs = panoptic_inference(cls, logits, thing_ids=[0, 1], merge="mask")
    cats = sorted(s["category_id"] for s in segs)
    assert cats == [0, 2]           # cluster 1 had 0 % of its mask free after cluster 0: dropped
    # lowering the overlap threshold does not rescue it: nothing of it is free
    pan, segs = panoptic_inference(cls, logits, thing_ids=[0, 1], merge="mask", overlap_threshold=0.0)
    assert sorted(s["category_id"] for s in segs) == [0, 2]


def _deeplab2_pixelwise(cls, logits, class_threshold, pixel_threshold):
    """DeepLab2's pixelwise mask-ID map, written pixel by pixel from its formulas: dropped clusters'
    logits become -99999; confidence = max softmax of the masked logits; a pixel is kept if that
    exceeds the pixel threshold and the masked maximum equals the unmasked maximum."""
    prob = cls.softmax(-1)[:, :-1]
    keep = prob.max(-1).values >= class_threshold
    N, H, W = logits.shape
    ids = torch.full((H, W), -1, dtype=torch.long)
    for y in range(H):
        for x in range(W):
            v = logits[:, y, x]
            masked = torch.where(keep, v, torch.full_like(v, -99999.0))
            conf = masked.softmax(0).max()
            if conf > pixel_threshold and masked.max() == v.max():
                ids[y, x] = int(masked.argmax())
    return ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_wise_merge_equals_deeplab2s_rule(seed):
    g = torch.Generator().manual_seed(seed)
    N, H, W = 9, 7, 8
    cls = torch.randn(N, K + 1, generator=g) * 3
    logits = torch.randn(N, H, W, generator=g) * 2
    expected = _deeplab2_pixelwise(cls, logits, 0.5, 0.4)
    assert (expected >= 0).any() and (expected < 0).any()
    pan, segs = panoptic_inference(cls, logits, thing_ids=[0, 1], merge="pixel", class_threshold=0.5,
                                   pixel_threshold=0.4)
    assert torch.equal(pan == 0, expected < 0)
    labels = cls.softmax(-1)[:, :-1].argmax(-1)
    by_id = {s["id"]: s for s in segs}
    for y in range(H):
        for x in range(W):
            if expected[y, x] >= 0:
                seg = by_id[int(pan[y, x])]
                assert seg["category_id"] == int(labels[expected[y, x]])
    # thing pixels of the same cluster form one segment; different thing clusters different segments
    thing_pixels = [(int(expected[y, x]), int(pan[y, x])) for y in range(H) for x in range(W)
                    if expected[y, x] >= 0 and by_id[int(pan[y, x])]["isthing"]]
    assert len(set(thing_pixels)) == len({c for c, _ in thing_pixels}) == len({i for _, i in thing_pixels})


def test_pixel_won_by_a_dropped_cluster_stays_void():
    """Column 0: cluster 1 (class confidence 0.5, dropped) has the largest logit; among the kept
    clusters cluster 0 would win with probability 1. DeepLab2 leaves the pixel void."""
    cls = _cls((0, 0.9), (1, 0.5))
    logits = torch.tensor([[[2.0, 5.0]], [[3.0, 0.0]]])
    pan, segs = panoptic_inference(cls, logits, thing_ids=[0, 1], merge="pixel")
    assert pan.tolist() == [[0, 1]] and [s["category_id"] for s in segs] == [0]


def test_pixel_wise_merge_uses_one_class_threshold_for_things_and_stuff():
    """A stuff cluster with confidence 0.6 passes the mask-wise stuff threshold (0.5) but not the
    pixel-wise class threshold (0.7)."""
    cls = _cls((2, 0.6))
    masks = _masks((slice(None), slice(None)))
    assert panoptic_inference(cls, masks, thing_ids=[0, 1], merge="pixel")[1] == []
    assert len(panoptic_inference(cls, masks, thing_ids=[0, 1], merge="mask")[1]) == 1
    assert len(panoptic_inference(cls, masks, thing_ids=[0, 1], merge="pixel",
                                  class_threshold=0.6)[1]) == 1


@pytest.mark.parametrize("merge", ["mask", "pixel"])
def test_area_limits_void_small_segments(merge):
    """A 2-pixel thing and a 4-pixel stuff region made of two clusters of the same class (merged
    before the limit applies); a segment of exactly the limit is kept (DeepLab2's count > limit - 0.5)."""
    cls = _cls((0, 0.9), (2, 0.9), (2, 0.9), (1, 0.9))
    masks = _masks((0, slice(0, 2)), (1, slice(0, 2)), (2, slice(0, 2)), (slice(None), slice(2, 6)))
    _, segs = panoptic_inference(cls, masks, thing_ids=[0, 1], merge=merge)
    assert sorted((s["category_id"], s["isthing"]) for s in segs) == [(0, True), (1, True), (2, False)]
    pan, segs = panoptic_inference(cls, masks, thing_ids=[0, 1], merge=merge, thing_area_limit=3,
                                   stuff_area_limit=5)
    assert sorted(s["category_id"] for s in segs) == [1]
    assert (pan[:3, :2] == 0).all() and (pan[:, 2:] == segs[0]["id"]).all()
    pan, segs = panoptic_inference(cls, masks, thing_ids=[0, 1], merge=merge, thing_area_limit=2,
                                   stuff_area_limit=4)
    assert sorted(s["category_id"] for s in segs) == [0, 1, 2]


def test_semantic_inference_is_class_prob_weighted_masks():
    torch.manual_seed(0)
    cls, masks = torch.randn(5, K + 1), torch.randn(5, 3, 4)
    sem = semantic_inference(cls, masks)
    expected = torch.zeros(K, 3, 4)
    for n in range(5):
        expected += cls[n].softmax(-1)[:K, None, None] * masks.softmax(0)[n]
    assert torch.allclose(sem, expected, atol=1e-6)


def test_unknown_merge():
    with pytest.raises(ValueError, match="MERGE='argmax'"):
        panoptic_inference(torch.zeros(1, 2), torch.zeros(1, 2, 2), [0], merge="argmax")


def _dense_mask_wise_merge(class_logits, mask_logits, thing_ids, thing_threshold, stuff_threshold,
                           pixel_threshold, overlap_threshold):
    """Reference: N dense binary masks, pasted in rank order (MaskFormer's merge, written plainly)."""
    N, H, W = mask_logits.shape
    scores, labels = class_logits.softmax(-1)[:, :-1].max(-1)
    prob = mask_logits.softmax(0)
    binary = prob > pixel_threshold
    area = binary.flatten(1).sum(1)
    mask_score = (prob * binary).flatten(1).sum(1) / area.clamp(min=1)
    pan = torch.zeros(H, W, dtype=torch.int32)
    segs, stuff = [], {}
    for n in torch.argsort(scores * mask_score, descending=True).tolist():
        label, isthing = int(labels[n]), int(labels[n]) in thing_ids
        if area[n] == 0 or scores[n] < (thing_threshold if isthing else stuff_threshold):
            continue
        free = binary[n] & (pan == 0)
        if free.sum() <= overlap_threshold * area[n]:
            continue
        if not isthing and label in stuff:
            pan[free] = stuff[label]
            continue
        pan[free] = len(segs) + 1
        if not isthing:
            stuff[label] = len(segs) + 1
        segs.append((len(segs) + 1, label, isthing))
    return pan, segs


@pytest.mark.parametrize("pixel_threshold", [0.1, 0.2, 0.3, 0.4, 0.5, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_mask_wise_merge_equals_dense_masks(pixel_threshold, seed):
    """The sparse candidates (top ceil(1/t)-1 clusters per pixel) give exactly the dense merge."""
    g = torch.Generator().manual_seed(seed)
    N, H, W = 12, 17, 23
    cls = torch.randn(N, K + 1, generator=g) * 3
    # smooth, overlapping blobs so that masks compete and several clusters pass at some pixels
    logits = torch.nn.functional.interpolate(torch.randn(1, N, 5, 6, generator=g) * 4, size=(H, W),
                                             mode="bilinear", align_corners=False)[0]
    args = dict(thing_threshold=0.3, stuff_threshold=0.3, pixel_threshold=pixel_threshold,
                overlap_threshold=0.6)
    pan, segs = panoptic_inference(cls, logits, thing_ids=[0, 1], merge="mask", **args)
    ref_pan, ref_segs = _dense_mask_wise_merge(cls, logits, [0, 1], **args)
    assert len(ref_segs) >= 2                          # the case is not trivial
    assert torch.equal(pan, ref_pan)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segs] == ref_segs


@pytest.mark.parametrize("t,k", [(0.4, 2), (0.5, 1), (0.34, 2), (1 / 3, 2), (0.3, 3), (0.0, 7), (0.9, 1)])
def test_max_clusters_per_pixel(t, k):
    from cmt_cops_d2.modeling.cmt.postprocess import max_clusters_per_pixel
    assert max_clusters_per_pixel(t, 7) == k


@pytest.mark.parametrize("merge", ["mask", "pixel"])
@pytest.mark.parametrize("output", [(30, 37), (45, 20)])
def test_merges_on_bands_of_resized_logits_equal_merges_on_the_dense_upsampled_logits(merge, output):
    """Inference resizes the stride-4 logits band by band (ResizedMaps); the merges must give what
    they give on the full upsampled tensor (F.interpolate to the padded size, crop, resize)."""
    from cmt_cops_d2.modeling.cmt.output_resize import OutputResize, ResizedMaps

    g = torch.Generator().manual_seed(3)
    N, padded, image = 12, (32, 40), (30, 37)
    cls = torch.randn(N, K + 1, generator=g) * 3
    stride4 = torch.randn(N, 8, 10, generator=g) * 4
    dense = torch.nn.functional.interpolate(stride4[None], size=padded, mode="bilinear",
                                            align_corners=False)[:, :, : image[0], : image[1]]
    if output != image:
        dense = torch.nn.functional.interpolate(dense, size=output, mode="bilinear",
                                                align_corners=False)
    resize = OutputResize((8, 10), padded, image, output, max_elements=N * output[1] * 3)
    banded = ResizedMaps(resize, stride4)
    assert len(list(banded.bands())) > 5                          # many bands, 3 rows each
    args = dict(thing_threshold=0.3, stuff_threshold=0.3, class_threshold=0.3, pixel_threshold=0.3)
    if merge == "mask":
        args["overlap_threshold"] = 0.6
    pan, segs = panoptic_inference(cls, banded, thing_ids=[0, 1], merge=merge, **args)
    ref_pan, ref_segs = panoptic_inference(cls, dense[0], thing_ids=[0, 1], merge=merge, **args)
    assert len(ref_segs) >= 2
    assert pan.shape == output and torch.equal(pan, ref_pan)
    drop_score = [{k: v for k, v in s.items() if k != "score"} for s in segs]
    assert drop_score == [{k: v for k, v in s.items() if k != "score"} for s in ref_segs]
    # mask scores are means over the mask: float32 summation order differs
    assert [s["score"] for s in segs] == pytest.approx([s["score"] for s in ref_segs], rel=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_probabilities_equal_softmax_topk(k):
    from cmt_cops_d2.modeling.cmt.postprocess import top_probabilities

    g = torch.Generator().manual_seed(k)
    logits = torch.randn(500, 9, generator=g, dtype=torch.float64) * 3
    logits[0] = 0.0                                      # all tied: any k columns, prob 1/9 each
    prob, idx = top_probabilities(logits, k)
    ref_prob, ref_idx = logits.softmax(1).topk(k, dim=1)
    torch.testing.assert_close(prob, ref_prob, rtol=1e-12, atol=1e-12)
    assert torch.equal(idx[1:], ref_idx[1:])             # no ties elsewhere
    assert len(set(idx[0].tolist())) == k                # distinct columns even when tied
