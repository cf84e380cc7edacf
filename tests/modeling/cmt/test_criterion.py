"""CMT-DeepLab matching and losses on hand-made cases with known values."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cmt_cops_d2.modeling.cmt.criterion import (
    CMTCriterion,
    instance_discrimination_loss,
    mask_approximation_loss,
    pixel_instance_discrimination_loss,
    sample_pixels_size_balanced,
)
from cmt_cops_d2.modeling.cmt.matcher import dice_matrix, hungarian_match, pq_similarity, smoothed_dice

K = 3  # classes; index 3 is void


def _target(h=6, w=8):
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, :, :4] = True          # left half: class 2 (stuff)
    masks[1, :3, 4:] = True         # top right: class 0
    masks[2, 3:5, 4:] = True        # below it: class 1; last row on the right stays void
    return {"labels": torch.tensor([2, 0, 1]), "masks": masks}


def _perfect_outputs(t, N=5, scale=30.0):
    G, h, w = t["masks"].shape
    logits = torch.full((1, N, K + 1), -scale)
    logits[0, :, K] = scale                                  # unmatched clusters: void
    masks = torch.full((1, N, h, w), -scale)
    for j, (c, m) in enumerate(zip(t["labels"], t["masks"])):
        logits[0, j + 1, K] = -scale
        logits[0, j + 1, c] = scale
        masks[0, j + 1][m] = scale
    return {"pred_logits": logits, "pred_masks": masks}


def test_hungarian_matches_brute_force():
    torch.manual_seed(0)
    for _ in range(20):
        sim = torch.rand(5, 3)
        src, tgt = hungarian_match(sim)
        best = max(itertools.permutations(range(5), 3), key=lambda p: sum(sim[p[j], j] for j in range(3)))
        assert sim[src, tgt].sum() == pytest.approx(sum(sim[best[j], j] for j in range(3)).item())
        assert tgt.tolist() == [0, 1, 2]


def test_pq_similarity_is_class_prob_times_unsmoothed_dice():
    prob = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.5, 0.5, 1.0]])
    gt = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    dice = dice_matrix(masks, gt)
    assert dice[0, 0] == pytest.approx(2 * 2 / (2 + 2), rel=1e-5)
    assert dice[1, 0] == pytest.approx(2 * 0.5 / (2 + 2), rel=1e-5)
    assert dice_matrix(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0    # empty pair: no NaN
    sim = pq_similarity(prob, masks, torch.tensor([1]), gt)
    assert sim[:, 0].tolist() == pytest.approx([0.8 * dice[0, 0].item(), 0.4 * dice[1, 0].item()])


def test_smoothed_dice_is_the_losses_v_net_dice():
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.5, 0.5, 1.0]])
    gt = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert smoothed_dice(masks, gt).tolist() == pytest.approx([(4 + 1) / (4 + 1), (1 + 1) / (4 + 1)])


def test_small_masks_change_the_matching_without_smoothing():
    """A one-pixel ground-truth mask: a cluster covering it alone beats one that also covers three
    other pixels by Dice 1 vs 0.4; with +1 smoothing they would be 1 vs 0.5 and a class probability
    of 0.9 vs 0.5 would flip the match the other way."""
    gt = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    masks = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]) * 0.5
    class_prob = torch.tensor([[0.5], [0.9]])
    sim = pq_similarity(class_prob, masks, torch.tensor([0]), gt)
    assert sim[:, 0].tolist() == pytest.approx([0.5 * (2 * 0.5 / 1.5), 0.9 * (2 * 0.5 / 3.0)], rel=1e-4)
    assert hungarian_match(sim)[0].tolist() == [0]


def test_perfect_prediction_has_near_zero_pq_and_mask_id_loss():
    t = _target()
    crit = CMTCriterion(num_classes=K, insdis_weight=0, semantic_weight=0)
    losses = crit(_perfect_outputs(t), [t])
    assert losses["loss_pq_class"].item() < 1e-6
    assert losses["loss_pq_dice"].item() < 1e-6
    assert losses["loss_mask_id"].item() < 1e-6
    # matched to clusters 1..3 in ground-truth order
    m = crit.match(_perfect_outputs(t)["pred_logits"], _perfect_outputs(t)["pred_masks"], [t])[0]
    assert m.src.tolist() == [1, 2, 3] and m.tgt.tolist() == [0, 1, 2]


def _imperfect_case():
    """Two clusters over a 1 x 3 image whose last pixel is void; one ground-truth mask (class 1) on
    pixels 0 and 1. Cluster 0 predicts the class with p = 0.5 and has mask probabilities
    (0.75, 0.75, 0.5); cluster 1 is uniform over the 4 classes with (0.25, 0.25, 0.5)."""
    t = {"labels": torch.tensor([1]), "masks": torch.tensor([[[True, True, False]]])}
    logits = torch.log(torch.tensor([[[0.25, 0.5, 1e-12, 0.25], [0.25, 0.25, 0.25, 0.25]]]))
    masks = torch.log(torch.tensor([[[[0.75, 0.75, 0.5]], [[0.25, 0.25, 0.5]]]]))
    return t, {"pred_logits": logits, "pred_masks": masks}


def test_pq_loss_of_a_known_imperfect_prediction_follows_deeplab2():
    """DeepLab2's per-image PQ-style loss, computed by hand:

    * class term: mean over the N = 2 clusters of alpha * Dice * CE for the matched cluster (unsmoothed
      Dice 2 * 1.5 / 3.5) and beta * (void fraction of its mass) * CE for the unmatched one (0.5 / 1.0);
    * mask term: alpha / N * p(c) * (1 - smoothed Dice), smoothed Dice (2 * 1.5 + 1) / (1.5 + 2 + 1).
    """
    t, out = _imperfect_case()
    crit = CMTCriterion(num_classes=3, insdis_weight=0, semantic_weight=0, mask_id_weight=1.0)
    loss = crit(out, [t])
    dice = 2 * 1.5 / 3.5
    class_term = (0.75 * dice * math.log(2) + 0.25 * (0.5 / (1.0 + 1e-5)) * math.log(4)) / 2
    mask_term = 0.75 / 2 * 0.5 * (1 - (2 * 1.5 + 1) / (1.5 + 2 + 1))
    assert loss["loss_pq_class"].item() == pytest.approx(3.0 * class_term, rel=1e-4)
    assert loss["loss_pq_dice"].item() == pytest.approx(3.0 * mask_term, rel=1e-4)
    assert loss["loss_mask_id"].item() == pytest.approx(-math.log(0.75), rel=1e-5)
    m = crit.match(out["pred_logits"], out["pred_masks"], [t])[0]
    assert m.void_fraction.tolist() == pytest.approx([0.5 / 2.0, 0.5 / 1.0], rel=1e-4)


def test_pq_mask_term_is_normalised_by_the_number_of_clusters():
    """Adding clusters that predict nothing (no mask mass, void class) divides the mask term by the
    new N, as DeepLab2's alpha / N, instead of leaving a mean over the matched pairs."""
    t, out = _imperfect_case()
    crit = CMTCriterion(num_classes=3, insdis_weight=0, semantic_weight=0)
    base = crit(out, [t])["loss_pq_dice"].item()
    dead_logits = torch.full((1, 6, 4), -50.0)
    dead_logits[..., 3] = 50.0
    wide = {"pred_logits": torch.cat([out["pred_logits"], dead_logits], 1),
            "pred_masks": torch.cat([out["pred_masks"], torch.full((1, 6, 1, 3), -50.0)], 1)}
    assert crit(wide, [t])["loss_pq_dice"].item() == pytest.approx(base * 2 / 8, rel=1e-4)


def test_losses_are_per_image_means_averaged_over_the_batch():
    """A batch's losses equal the mean of its images' losses (DeepLab2), not pixel or cluster pools;
    an image without any mask counts in the mean."""
    torch.manual_seed(0)
    t1 = _target()
    t2 = {"labels": torch.tensor([0]), "masks": torch.zeros(1, 6, 8, dtype=torch.bool)}
    t2["masks"][0, 1:3, 1:3] = True                  # a small mask: pools would weigh it by its size
    t3 = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 6, 8, dtype=torch.bool)}
    out = {"pred_logits": torch.randn(3, 5, K + 1), "pred_masks": torch.randn(3, 5, 6, 8),
           "pixel_features": torch.randn(3, 4, 6, 8), "sem_logits": torch.randn(3, K, 6, 8),
           "ref_points": torch.rand(3, 5, 8)}
    crit = CMTCriterion(num_classes=K, insdis_num_pixels=10000)
    batch = crit(out, [t1, t2, t3])
    single = [crit({k: v[i : i + 1] for k, v in out.items()}, [t]) for i, t in enumerate([t1, t2, t3])]
    for key in ["loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_insdis", "loss_sem_seg",
                "loss_mask_approx"]:
        assert batch[key].item() == pytest.approx(sum(s[key].item() for s in single) / 3, rel=1e-5), key
    assert single[2]["loss_pq_class"].item() > 0          # all clusters are asked for void
    assert single[2]["loss_pq_dice"].item() == 0.0


def test_mask_approximation_loss_of_a_known_point_set():
    h, w, M = 5, 7, 4
    m = torch.zeros(1, h, w, dtype=torch.bool)
    m[0, 1:4, 2:6] = True                    # rows 1..3 -> 0.25..0.75, cols 2..5 -> 2/6..5/6
    ys, xs = [0.25, 0.75, 0.5, 0.5], [2 / 6, 5 / 6, 3.5 / 6, 3.5 / 6]
    exact = torch.tensor([ys + xs])
    assert mask_approximation_loss(exact, m).item() == pytest.approx(0.0, abs=1e-6)
    shifted = exact.clone()
    shifted[0, :M] += 0.1                    # every h coordinate moves down by 0.1
    # L_ext: |dmin_h| + |dmax_h| = 0.2 over 4 terms; L_cen: |davg_h| = 0.1 over 2 terms
    assert mask_approximation_loss(shifted, m).item() == pytest.approx(0.2 / 4 + 0.1 / 2, rel=1e-5)


def test_pixel_instance_discrimination_matches_eq14_by_loops():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(7, 4), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    t = 0.3
    total = 0.0
    for a in range(7):
        denom = sum(math.exp(f[a] @ f[b] / t) for b in range(7))
        pos = [p for p in range(7) if ids[p] == ids[a]]
        total += -sum(math.log(math.exp(f[a] @ f[p] / t) / denom) for p in pos) / len(pos)
    assert pixel_instance_discrimination_loss(f, ids, t).item() == pytest.approx(total / 7, rel=1e-5)


def test_instance_discrimination_prefers_features_near_their_mask():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    good = F.normalize(torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3) + 0.01 * torch.randn(6, 2), dim=1)
    bad = F.normalize(torch.randn(6, 2), dim=1)
    assert instance_discrimination_loss(good, ids, 0.3) < instance_discrimination_loss(bad, ids, 0.3)
    # exact value for the clean case: each pixel's logits are (1/t, 0) -> CE = log(1 + exp(-1/t))
    clean = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    assert instance_discrimination_loss(clean, ids, 0.3).item() == pytest.approx(
        math.log(1 + math.exp(-1 / 0.3)), rel=1e-5)


def test_size_balanced_sampling_gives_each_mask_similar_mass():
    ids = torch.cat([torch.zeros(10000, dtype=torch.long), torch.ones(100, dtype=torch.long),
                     torch.full((50,), -1)])                    # -1: void, never sampled
    g = torch.Generator().manual_seed(0)
    sel = sample_pixels_size_balanced(ids, 100, generator=g)
    assert len(sel) == 100 and len(set(sel.tolist())) == 100
    assert (ids[sel] >= 0).all()
    small = (ids[sel] == 1).sum().item()
    assert 30 <= small <= 70        # proportional sampling would give about 1
    assert len(sample_pixels_size_balanced(ids, 20000)) == 10100


def test_sampling_temperature_sets_the_bias_towards_small_masks():
    """Weight area^-t: t = 0 samples uniformly (about 1 of 100 from the 1% mask), t = 1.5 takes
    more from the small mask than t = 1."""
    ids = torch.cat([torch.zeros(10000, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    counts = {}
    for t in (0.0, 1.0, 1.5):
        g = torch.Generator().manual_seed(0)
        counts[t] = sum((ids[sample_pixels_size_balanced(ids, 100, t, generator=g)] == 1).sum().item()
                        for _ in range(20)) / 20
    assert counts[0.0] < 4
    assert counts[1.0] < counts[1.5]


def test_instance_wise_discrimination_counts_thing_pixels_only():
    """MaX-DeepLab's variant: every mask (thing or stuff) is a candidate, but only thing pixels carry
    a loss; an image with stuff only gives 0."""
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    clean = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    noisy = clean.clone()
    noisy[4] = F.normalize(torch.tensor([1.0, 0.2]), dim=0)          # a stuff pixel near the thing
    thing_only = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    # By hand: the stuff center moves with the noisy pixel; pixels 0..2 (the thing) carry the loss.
    g0 = torch.tensor([1.0, 0.0])
    g1 = F.normalize(noisy[3:].sum(0), dim=0)
    expected = sum(-math.log(math.exp(noisy[p] @ g0 / 0.3)
                             / (math.exp(noisy[p] @ g0 / 0.3) + math.exp(noisy[p] @ g1 / 0.3)))
                   for p in range(3)) / 3
    assert instance_discrimination_loss(noisy, ids, 0.3, thing_only).item() == pytest.approx(expected,
                                                                                             rel=1e-5)
    t = _target()                                                    # classes 2, 0, 1
    out = {"pred_logits": torch.randn(1, 5, K + 1), "pred_masks": torch.randn(1, 5, 6, 8),
           "pixel_features": torch.randn(1, 4, 6, 8)}
    stuff_only = CMTCriterion(num_classes=K, insdis_type="instance", thing_classes=[])
    with_things = CMTCriterion(num_classes=K, insdis_type="instance", thing_classes=[0, 1])
    assert stuff_only(out, [t])["loss_insdis"].item() == 0.0
    assert with_things(out, [t])["loss_insdis"].item() > 0.0


def test_semantic_loss_is_cross_entropy_over_labelled_pixels():
    t = _target()
    torch.manual_seed(0)
    sem_logits = torch.randn(1, K, 6, 8)
    crit = CMTCriterion(num_classes=K)
    sem = torch.full((1, 6, 8), 255)
    for c, m in zip(t["labels"], t["masks"]):
        sem[0][m] = c
    assert crit.semantic_loss(sem_logits, [t]).item() == pytest.approx(
        F.cross_entropy(sem_logits, sem, ignore_index=255).item(), rel=1e-6)


def test_more_masks_than_clusters_is_handled_and_warned(caplog):
    t = _target()
    out = {"pred_logits": torch.randn(1, 2, K + 1, requires_grad=True),
           "pred_masks": torch.randn(1, 2, 6, 8, requires_grad=True),
           "pixel_features": torch.randn(1, 4, 6, 8, requires_grad=True),
           "sem_logits": torch.randn(1, K, 6, 8, requires_grad=True)}
    with caplog.at_level("WARNING"):
        losses = CMTCriterion(num_classes=K)(out, [t])
    assert "3 ground-truth masks but the model has only 2 clusters" in caplog.text
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(out[k].grad is not None for k in out)


def test_deep_supervision_adds_one_set_per_auxiliary_output():
    t = _target()
    torch.manual_seed(0)
    aux = [{"pred_logits": torch.randn(1, 5, K + 1), "pred_masks": torch.randn(1, 5, 3, 4),
            "ref_points": torch.rand(1, 5, 8)} for _ in range(2)]
    out = {"pred_logits": torch.randn(1, 5, K + 1), "pred_masks": torch.randn(1, 5, 6, 8),
           "ref_points": torch.rand(1, 5, 8), "aux_outputs": aux}
    losses = CMTCriterion(num_classes=K)(out, [t])
    assert {"loss_pq_class_0", "loss_pq_dice_0", "loss_mask_id_0", "loss_mask_approx_0",
            "loss_pq_class_1"} <= set(losses)
    assert "loss_pq_class_0" not in CMTCriterion(num_classes=K, deep_supervision=False)(out, [t])


def test_bad_insdis_type():
    with pytest.raises(ValueError, match="INSDIS_TYPE='both'"):
        CMTCriterion(num_classes=K, insdis_type="both")
