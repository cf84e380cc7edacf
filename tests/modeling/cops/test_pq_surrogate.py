"""Tests of the COPS PQ surrogate (eq. 5-6): hard limit == panopticapi, gradients, hand-made cases."""
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmt_cops_d2.modeling.cops.pq_surrogate import (
    PQSums,
    area_thresholds_from_isthing,
    match_segments,
    pool_pq_sums,
    pq_from_sums,
    pq_sums_single_image,
    pq_surrogate_loss,
    smooth_threshold,
    soft_iou_matrix,
)

IS_THING = [True, True, True, False, False]  # classes 0-2 things, 3-4 stuff
K = len(IS_THING)


# ------------------------------------------------------------------------------------------------
# random small panoptic maps
# ------------------------------------------------------------------------------------------------
def _rect(rng, H, W, mask):
    h, w = rng.integers(2, H // 2 + 1), rng.integers(2, W // 2 + 1)
    r, c = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
    mask[r:r + h, c:c + w] = True


def _random_pair(rng, H=12, W=16):
    """Returns (gt ids, gt segs {id: (class, iscrowd)}, pred ids, pred segs {id: class}); id 0 = void."""
    gt = np.zeros((H, W), np.int64)
    segs = {}
    a, b = rng.choice([3, 4], 2)
    x = rng.integers(3, W - 3)
    gt[:, :x], segs[1] = 1, (int(a), 0)
    if a != b:
        gt[:, x:], segs[2] = 2, (int(b), 0)
    else:
        gt[:, x:] = 1
    nid = 3
    for _ in range(rng.integers(1, 5)):
        m = np.zeros((H, W), bool)
        _rect(rng, H, W, m)
        gt[m], segs[nid] = nid, (int(rng.integers(0, 3)), 0)
        nid += 1
    if rng.random() < 0.6:                                   # one crowd region of a thing class
        m = np.zeros((H, W), bool)
        _rect(rng, H, W, m)
        gt[m], segs[nid] = nid, (int(rng.integers(0, 3)), 1)
        nid += 1
    # prediction: a perturbed copy of the full map (crowd becomes an ordinary segment)
    pred = gt.copy()
    psegs = {i: c for i, (c, _) in segs.items()}
    for i in list(psegs):
        if psegs[i] < 3 and rng.random() < 0.25:             # wrong thing class
            psegs[i] = int(rng.integers(0, 3))
    for _ in range(rng.integers(1, 4)):                      # grow a segment or add a new one
        m = np.zeros((H, W), bool)
        _rect(rng, H, W, m)
        u = rng.random()
        if u < 0.4:
            pid = int(rng.choice(list(psegs)))
        elif u < 0.8:
            pid, psegs[nid] = nid, int(rng.integers(0, 3))
            nid += 1
        else:                                                # stuff: one segment per class
            c = int(rng.choice([3, 4]))
            pid = next((i for i, cc in psegs.items() if cc == c), None)
            if pid is None:
                pid, psegs[nid] = nid, c
                nid += 1
        pred[m] = pid
    pred[rng.random((H, W)) < 0.05] = 0                      # unlabelled prediction pixels
    gt[rng.random((H, W)) < 0.1] = 0                         # void ground truth pixels
    if rng.random() < 0.5:                                   # a void block
        m = np.zeros((H, W), bool)
        _rect(rng, H, W, m)
        gt[m] = 0
        if rng.random() < 0.7:                               # a prediction mostly/partly on it
            r, c = np.nonzero(m)
            pred[r.min():r.max() + 1, c.min():c.max() + 1 + rng.integers(0, 4)] = nid
            psegs[nid] = int(rng.integers(0, 3))
            nid += 1
    segs = {i: v for i, v in segs.items() if (gt == i).any()}
    psegs = {i: v for i, v in psegs.items() if (pred == i).any()}
    return gt, segs, pred, psegs


def _id2rgb(ids):
    rgb = np.zeros(ids.shape + (3,), np.uint8)
    x = ids.copy()
    for k in range(3):
        rgb[..., k] = x % 256
        x //= 256
    return rgb


def _panopticapi_stats(tmp_path, images, area_thresholds):
    from panopticapi.evaluation import pq_compute_single_core

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    categories = {c + 1: {"id": c + 1, "name": str(c), "isthing": int(IS_THING[c])} for c in range(K)}
    annotation_set = []
    for n, (gt, segs, pred, psegs) in enumerate(images):
        pred = pred.copy()
        for i, c in list(psegs.items()):                    # small-segment removal (hard size gate)
            if (pred == i).sum() < area_thresholds[c]:
                pred[pred == i] = 0
        name = f"{n}.png"
        Image.fromarray(_id2rgb(gt)).save(gt_dir / name)
        Image.fromarray(_id2rgb(pred)).save(pred_dir / name)
        gt_ann = {"image_id": n, "file_name": name, "segments_info": [
            {"id": i, "category_id": c + 1, "iscrowd": cr, "area": int((gt == i).sum())}
            for i, (c, cr) in segs.items()]}
        pred_ann = {"image_id": n, "file_name": name, "segments_info": [
            {"id": i, "category_id": c + 1} for i, c in psegs.items() if (pred == i).any()]}
        annotation_set.append((gt_ann, pred_ann))
    json.dumps(annotation_set)  # plain types only
    stat = pq_compute_single_core(0, annotation_set, str(gt_dir), str(pred_dir), categories)
    return stat, categories


def _tensors(gt, segs, pred, psegs, dtype=torch.float64):
    pid = sorted(psegs)
    gid = sorted(segs)
    Z = torch.as_tensor(np.stack([pred == i for i in pid]) if pid else np.zeros((0,) + pred.shape),
                        dtype=dtype)
    return dict(
        Z=Z,
        pred_classes=torch.tensor([psegs[i] for i in pid], dtype=torch.long),
        gt_masks=torch.as_tensor(np.stack([gt == i for i in gid])),
        gt_classes=torch.tensor([segs[i][0] for i in gid], dtype=torch.long),
        gt_iscrowd=torch.tensor([bool(segs[i][1]) for i in gid]),
        weights=torch.as_tensor(gt != 0, dtype=dtype),
    )


@pytest.mark.parametrize("thresholds", [(0, 0), (6, 30)])
def test_hard_limit_equals_panopticapi(tmp_path, thresholds):
    rng = np.random.default_rng(7)
    images = [_random_pair(rng) for _ in range(12)]
    t = torch.tensor([thresholds[0] if th else thresholds[1] for th in IS_THING], dtype=torch.float64)
    stat, categories = _panopticapi_stats(tmp_path, images, t.tolist())
    sums = pool_pq_sums([pq_sums_single_image(**_tensors(*im), is_thing=IS_THING, area_thresholds=t,
                                              hard=True) for im in images])
    for c in range(K):
        s = stat[c + 1]
        assert sums.tp[c].item() == s.tp, c
        assert sums.fp[c].item() == s.fp, c
        assert sums.fn[c].item() == s.fn, c
        assert sums.iou_sum[c].item() == pytest.approx(s.iou, abs=1e-12), c
        assert bool(sums.present[c]) == (s.tp + s.fp + s.fn > 0), c
    ref = stat.pq_average(categories, isthing=None)[0]["pq"]
    pq, present = pq_from_sums(sums)
    assert pq[present].mean().item() == pytest.approx(ref, abs=1e-12)
    assert pq_surrogate_loss(sums).item() == pytest.approx(1 - ref, abs=1e-12)
    # the test is not vacuous: matches, FP and FN all occur
    assert sums.tp.sum() > 0 and sums.fp.sum() > 0 and sums.fn.sum() > 0


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    H, W = 5, 6
    gt = np.full((H, W), 1)                  # stuff class 3
    gt[0:3, 0:3] = 2                         # thing class 0
    gt[2:5, 3:6] = 3                         # thing class 0
    gt[4, 0:2] = 4                           # crowd, class 1
    gt[0, 5] = 0                             # void
    segs = {1: (3, 0), 2: (0, 0), 3: (0, 0), 4: (1, 1)}
    gid = sorted(segs)
    gt_masks = torch.as_tensor(np.stack([gt == i for i in gid]))
    gt_classes = torch.tensor([segs[i][0] for i in gid])
    gt_iscrowd = torch.tensor([bool(segs[i][1]) for i in gid])
    weights = torch.as_tensor(gt != 0, dtype=torch.float64)
    pred_classes = torch.tensor([0, 0, 1, 3, 3])             # two stuff channels of class 3 are merged
    logits = torch.randn(len(pred_classes) + 1, H, W, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([4.0, 4.0, 4.0, 10.0, 10.0], dtype=torch.float64)

    def loss(lg):
        Z = torch.softmax(lg, 0)[:-1]                         # last channel: unlabelled
        s = pq_sums_single_image(Z, pred_classes, gt_masks, gt_classes, weights, IS_THING,
                                 gt_iscrowd=gt_iscrowd, area_thresholds=t, gate_slope=0.5, iou_eps=0.1)
        return pq_surrogate_loss(s, weight=2.0, pq_eps=0.1)

    g, = torch.autograd.grad(loss(logits), logits)
    assert g.abs().max() > 1e-4                               # the check is not vacuous
    eps = 1e-6
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        idx = torch.randperm(logits.numel(), generator=gen)[:12].tolist()
        dirs = [torch.nn.functional.one_hot(torch.tensor(i), logits.numel()).view_as(logits).double()
                for i in idx]
        dirs += [torch.randn(logits.shape, generator=gen, dtype=torch.float64) for _ in range(3)]
        for d in dirs:                                        # central differences along d
            fd = (loss(logits + eps * d) - loss(logits - eps * d)) / (2 * eps)
            assert fd.item() == pytest.approx((g * d).sum().item(), abs=1e-7, rel=1e-5)


def _maps_to_inputs(gt, segs, pred, psegs):
    return _tensors(gt, segs, pred, psegs)


def _hand_case():
    """8 x 8, stuff class 3 everywhere except thing squares A (class 0) and B (class 0)."""
    gt = np.ones((8, 8), np.int64)
    gt[0:4, 0:4] = 2
    gt[5:8, 5:8] = 3
    return gt, {1: (3, 0), 2: (0, 0), 3: (0, 0)}


def test_perfect_prediction_has_zero_loss():
    gt, segs = _hand_case()
    x = _tensors(gt, segs, gt, {i: c for i, (c, _) in segs.items()})
    zero_t = torch.zeros(K, dtype=torch.float64)
    assert pq_surrogate_loss(pq_sums_single_image(**x, is_thing=IS_THING, area_thresholds=zero_t,
                                                  hard=True)).item() == 0.0
    # soft surrogate: h(1) = 1 and, far above the area thresholds, sigma ~ 1
    s = pq_sums_single_image(**x, is_thing=IS_THING, area_thresholds=zero_t - 1000)
    assert pq_surrogate_loss(s).item() == pytest.approx(0.0, abs=1e-12)
    # default thresholds (COCO, stride 4: 12.5 / 256) on this tiny image: the stuff gate is ~0, so the
    # stuff segment counts as missed
    s = pq_sums_single_image(**x, is_thing=IS_THING)
    assert s.fn[3].item() == pytest.approx(1.0, abs=1e-6) and s.fp[3].item() < 1e-6


def test_one_false_positive_and_one_false_negative():
    gt, segs = _hand_case()
    zero_t = torch.zeros(K, dtype=torch.float64)
    # FP: an extra 2 x 2 thing of class 0 cut out of the stuff; A and B are perfect
    pred = gt.copy()
    pred[5:7, 0:2] = 9
    psegs = {1: 3, 2: 0, 3: 0, 9: 0}
    s = pq_sums_single_image(**_tensors(gt, segs, pred, psegs), is_thing=IS_THING, area_thresholds=zero_t,
                             hard=True)
    assert (s.tp[0].item(), s.fp[0].item(), s.fn[0].item()) == (2, 1, 0)
    stuff_iou = (39 - 4) / 39
    expected = 1 - (2 / 2.5 + stuff_iou) / 2
    assert pq_surrogate_loss(s).item() == pytest.approx(expected, abs=1e-12)
    # FN: B is not predicted (its pixels are unlabelled in the prediction)
    pred = gt.copy()
    pred[pred == 3] = 0
    s = pq_sums_single_image(**_tensors(gt, segs, pred, {1: 3, 2: 0}), is_thing=IS_THING,
                             area_thresholds=zero_t, hard=True)
    assert (s.tp[0].item(), s.fp[0].item(), s.fn[0].item()) == (1, 0, 1)
    assert pq_surrogate_loss(s).item() == pytest.approx(1 - (1 / 1.5 + 1) / 2, abs=1e-12)
    # a prediction of an absent class: that class enters the mean with PQ 0
    pred = gt.copy()
    pred[5:7, 0:2] = 9
    s = pq_sums_single_image(**_tensors(gt, segs, pred, {1: 3, 2: 0, 3: 0, 9: 2}), is_thing=IS_THING,
                             area_thresholds=zero_t, hard=True)
    assert s.present.tolist() == [True, False, True, True, False]
    assert pq_surrogate_loss(s).item() == pytest.approx(1 - (1 + 0 + stuff_iou) / 3, abs=1e-12)
    # soft version of the FP case: the soft FP count is sigma (1 - h) with h ~ 0 for the extra segment
    soft = pq_sums_single_image(**_tensors(gt, segs, pred, {1: 3, 2: 0, 3: 0, 9: 0}), is_thing=IS_THING,
                                area_thresholds=zero_t)
    assert soft.fp[0].item() == pytest.approx(1 / (1 + np.exp(-0.4)), rel=1e-9)


def test_a_failed_match_is_a_false_positive_and_a_false_negative():
    """B (9 px) predicted as a 4-px square inside it (IoU 4/9 < 1/2): the pair is matched, a TP with
    probability h sigma, otherwise B is a FN and the prediction a FP (the public code counts no FP for a
    matched pair; then the hard limit would not be PQ)."""
    gt, segs = _hand_case()
    pred = gt.copy()
    pred[gt == 3] = 1
    pred[5:7, 5:7] = 3
    x = _tensors(gt, segs, pred, {1: 3, 2: 0, 3: 0})
    hard = pq_sums_single_image(**x, is_thing=IS_THING, area_thresholds=torch.zeros(K), hard=True)
    assert (hard.tp[0].item(), hard.fp[0].item(), hard.fn[0].item()) == (1, 1, 1)
    assert hard.iou_sum[0].item() == 1.0                      # only A's IoU counts
    u = 4 / 9
    h = u**4 / (u**4 + (1 - u) ** 4)
    for t in (-1000.0, 2.0):                                  # sigma ~ 1, and sigma of 4 px at t = 2
        sig = 1 / (1 + np.exp(-0.1 * (4 - t)))
        sig_a = 1 / (1 + np.exp(-0.1 * (16 - t)))
        s = pq_sums_single_image(**x, is_thing=IS_THING, area_thresholds=torch.full((K,), t))
        assert s.tp[0].item() == pytest.approx(sig_a + h * sig, rel=1e-9)
        assert s.fp[0].item() == pytest.approx(sig * (1 - h), rel=1e-9)
        assert s.fn[0].item() == pytest.approx((1 - sig_a) + (1 - h * sig), rel=1e-9)
        assert s.iou_sum[0].item() == pytest.approx(sig_a * 1.0 + h * sig * u, rel=1e-9)


def test_void_pixels_do_not_contribute():
    gt, segs = _hand_case()
    gt[3:6, 2:6] = 0                                          # void band
    rng = np.random.default_rng(0)
    pred = gt.copy()
    pred[0, 0:2] = 1                                          # some errors on labelled pixels
    x = _tensors(gt, segs, pred, {1: 3, 2: 0, 3: 0})
    void = x["weights"] == 0
    # the same prediction with garbage on void pixels, and ground truth masks spilling into void
    y = {k: v.clone() for k, v in x.items()}
    garbage = torch.as_tensor(rng.random(y["Z"].shape)) * void
    y["Z"] = torch.where(void, garbage / garbage.sum(0).clamp_min(1), y["Z"])
    y["gt_masks"] = y["gt_masks"] | void
    far = torch.full((K,), -1000.0, dtype=torch.float64)      # sigma = 1: areas do not matter
    a = pq_sums_single_image(**x, is_thing=IS_THING, area_thresholds=far)
    b = pq_sums_single_image(**y, is_thing=IS_THING, area_thresholds=far)
    for f in ("iou_sum", "tp", "fn"):  # fp: void enters only the ignore fraction (panopticapi rule)
        assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-12, rtol=0), f
    iou = soft_iou_matrix(x["Z"], x["gt_masks"].double(), x["weights"])
    assert torch.allclose(iou, soft_iou_matrix(y["Z"], y["gt_masks"].double(), y["weights"]))
    # the IoU terms have no gradient on void pixels
    Z = y["Z"].clone().requires_grad_(True)
    s = pq_sums_single_image(Z, y["pred_classes"], y["gt_masks"], y["gt_classes"], y["weights"], IS_THING,
                             area_thresholds=far)
    g, = torch.autograd.grad((s.iou_sum + s.tp).sum(), Z)
    assert g[:, void].abs().max() == 0 and g.abs().max() > 0


def test_prediction_mostly_on_void_is_not_a_false_positive():
    gt, segs = _hand_case()
    gt[5:7, 0:2] = 0
    pred = gt.copy()
    pred[5:7, 0:3] = 9                                        # 4 of 6 pixels on void
    zero_t = torch.zeros(K, dtype=torch.float64)
    s = pq_sums_single_image(**_tensors(gt, segs, pred, {1: 3, 2: 0, 3: 0, 9: 1}), is_thing=IS_THING,
                             area_thresholds=zero_t, hard=True)
    assert s.fp[1].item() == 0 and not s.present[1]
    pred[5:8, 0:3] = 9                                        # 4 of 9 pixels on void: a FP
    s = pq_sums_single_image(**_tensors(gt, segs, pred, {1: 3, 2: 0, 3: 0, 9: 1}), is_thing=IS_THING,
                             area_thresholds=zero_t, hard=True)
    assert s.fp[1].item() == 1 and s.present[1]


def test_empty_prediction_channel_is_not_a_segment():
    gt, segs = _hand_case()
    x = _tensors(gt, segs, gt, {i: c for i, (c, _) in segs.items()})
    x["Z"] = torch.cat([x["Z"], torch.zeros(1, 8, 8, dtype=torch.float64)])
    x["pred_classes"] = torch.cat([x["pred_classes"], torch.tensor([1])])
    s = pq_sums_single_image(**x, is_thing=IS_THING, area_thresholds=torch.zeros(K), hard=True)
    assert s.fp.sum().item() == 0 and not s.present[1] and pq_surrogate_loss(s).item() == 0


def test_an_empty_slot_adds_neither_a_false_positive_nor_a_gradient():
    """With the size gate on, sigma(0) = sigmoid(-0.1 t) > 0; an empty slot must still count nothing."""
    gt, segs = _hand_case()
    x = _tensors(gt, segs, gt, {i: c for i, (c, _) in segs.items()})
    t = torch.full((K,), 3.0)
    base = pq_sums_single_image(**x, is_thing=IS_THING, area_thresholds=t)
    Z = torch.cat([x["Z"], torch.zeros(1, 8, 8, dtype=torch.float64)]).requires_grad_(True)
    with_slot = pq_sums_single_image(**{**x, "Z": Z, "pred_classes": torch.cat([x["pred_classes"],
                                                                                   torch.tensor([1])])},
                                     is_thing=IS_THING, area_thresholds=t)
    for name in ("iou_sum", "tp", "fp", "fn"):
        torch.testing.assert_close(getattr(with_slot, name), getattr(base, name))
    pq_surrogate_loss(with_slot).backward()
    assert not Z.grad[-1].any()


def _brute_force(iou, key):
    S, G = iou.shape
    best = None
    if S >= G:
        cands = (list(zip(p, range(G))) for p in itertools.permutations(range(S), G))
    else:
        cands = (list(zip(range(S), p)) for p in itertools.permutations(range(G), S))
    for pairs in cands:
        v = key([iou[i, j] for i, j in pairs])
        best = v if best is None or v > best else best
    return best


@pytest.mark.parametrize("shape", [(4, 3), (3, 5), (4, 4)])
def test_matching_maximises_iou(shape):
    torch.manual_seed(shape[0] * 10 + shape[1])
    S, G = shape
    H, W = 6, 7
    P = torch.softmax(3 * torch.randn(S + 1, H, W, dtype=torch.float64), 0)[:S]
    lab = torch.randint(0, G + 1, (H, W))
    Gm = torch.stack([(lab == j).double() for j in range(G)])
    weights = (torch.rand(H, W) > 0.1).double()
    iou = soft_iou_matrix(P, Gm, weights).numpy()
    r, c = match_segments(iou, force_pq_matches=False)
    assert len(r) == min(S, G)
    assert iou[r, c].sum() == pytest.approx(_brute_force(iou, sum), abs=1e-12)
    r, c = match_segments(iou, force_pq_matches=True)
    lex = lambda v: (sum(x > 0.5 for x in v), sum(v))  # noqa: E731
    got = lex(list(iou[r, c]))
    ref = _brute_force(iou, lex)
    assert got[0] == ref[0] and got[1] == pytest.approx(ref[1], abs=1e-12)


def test_matching_keeps_pq_matches():
    # p1-g1 IoU 1/1.9 > 0.5; the crossing pairs (0.31 each) have a larger IoU sum
    iou = np.array([[1 / 1.9, 0.45 / 1.45], [0.45 / 1.45, 0.0]])
    r, c = match_segments(iou, force_pq_matches=False)
    assert sorted(zip(r.tolist(), c.tolist())) == [(0, 1), (1, 0)]
    r, c = match_segments(iou, force_pq_matches=True)
    assert (0, 0) in list(zip(r.tolist(), c.tolist()))


def test_pooling_and_thresholds():
    a = PQSums.zeros(K, torch.float64)
    b = PQSums(*(torch.ones(K, dtype=torch.float64) for _ in range(4)), torch.tensor([1, 0, 0, 0, 1]).bool())
    s = pool_pq_sums([a, b, b])
    assert s.tp.tolist() == [2.0] * K and s.present.tolist() == [True, False, False, False, True]
    t = area_thresholds_from_isthing(IS_THING)
    assert t.tolist() == [12.5, 12.5, 12.5, 256.0, 256.0]
    t = area_thresholds_from_isthing(IS_THING, stuff_area=2048, stride=1)
    assert t.tolist() == [200.0, 200.0, 200.0, 2048.0, 2048.0]
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(smooth_threshold(u), torch.tensor([0.0, 1 / 82, 0.5, 81 / 82, 1.0]))


def test_bad_input_raises():
    gt, segs = _hand_case()
    x = _tensors(gt, segs, gt, {i: c for i, (c, _) in segs.items()})

    def call(**kw):
        return pq_sums_single_image(**{**x, **kw}, is_thing=IS_THING)

    Z = x["Z"].clone()
    Z[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^Z"):
        call(Z=Z)
    with pytest.raises(ValueError, match="^Z"):
        call(Z=x["Z"] * 2)
    with pytest.raises(ValueError, match="^gt_masks"):
        call(gt_masks=x["gt_masks"][:, :-1])
    with pytest.raises(ValueError, match="^pred_classes"):
        call(pred_classes=x["pred_classes"][:-1])
    with pytest.raises(ValueError, match="^gt_classes"):
        call(gt_classes=x["gt_classes"] + 10)
    w = x["weights"].clone()
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="^weights"):
        call(weights=w)
    with pytest.raises(ValueError, match="^weights"):
        call(weights=w[:-1])
