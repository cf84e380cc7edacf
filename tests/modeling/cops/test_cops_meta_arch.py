"""COPS meta-architecture on CPU: pretraining step, edge features and their alignment, inference format,
COCOPanopticEvaluator, any input size, and exact reproduction of the GT with perfect logits."""
import argparse
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from cmt_cops_d2.data.mappers import build_train_mapper
from cmt_cops_d2.engine import Trainer, setup_cfg
from cmt_cops_d2.modeling.cops.heads import edge_features, edge_valid_mask
from cmt_cops_d2.modeling.cops.postprocess import affinity_mask_score, panoptic_from_solution, void_small_segments
from cmt_cops_d2.solvers import edge_maps_to_flat, grid_edge_valid_mask, grid_edges
from cmt_cops_d2.solvers.checks import check_amwc_solution

from ...conftest import CONFIG_DIR

CONFIG = os.path.join(CONFIG_DIR, "synthetic", "cops_tiny_pretrain.yaml")
DISTANCES = [1, 2, 4, 8]


def tiny_cfg(*opts):
    return setup_cfg(argparse.Namespace(config_file=CONFIG, opts=[
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('tiny_synthetic_train',)", "DATASETS.TEST",
        "('tiny_synthetic_val',)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "100",
        "INPUT.CROP.SIZE", "(64, 64)", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "80",
        "MODEL.COPS.SIZE_DIVISIBILITY", "64", "MODEL.COPS.SOLVER_THREADS", "1",
        "DATALOADER.NUM_WORKERS", "0", *opts]))


@pytest.fixture(scope="module")
def cfg(tiny_synthetic):
    return tiny_cfg()


@pytest.fixture(scope="module")
def batch(cfg):
    mapper = build_train_mapper(cfg)
    return [mapper(d) for d in DatasetCatalog.get("tiny_synthetic_train")[:2]]


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def test_training_step_losses_and_gradients(model, batch):
    model.train()
    model.zero_grad()
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg"} | {f"loss_affinity_d{d}" for d in DISTANCES}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    # Stop-gradient: the affinity loss alone reaches no parameter of the semantic branch.
    sem_params = list(model.sem_seg_head.parameters())
    aff_loss = sum(v for k, v in losses.items() if k.startswith("loss_affinity"))
    grads = torch.autograd.grad(aff_loss, sem_params, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    sum(losses.values()).backward()
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    # The cost affines are trained only by the full stage (through the AMWC layer): frozen here.
    assert frozen == ["costs.b_d", "costs.b_s", "costs.w_d", "costs.w_s"]
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_edge_features_follow_anchor_convention():
    torch.manual_seed(1)
    feat = torch.randn(2, 3, 6, 7)
    for d in [1, 2, 4, 6, 7, 9]:
        out = edge_features(feat, d)
        ref = torch.zeros(2, 6, 6, 7)
        for r in range(6):
            for c in range(7):
                if r + d < 6:
                    ref[:, :3, r, c] = feat[:, :, r + d, c] - feat[:, :, r, c]
                if c + d < 7:
                    ref[:, 3:, r, c] = feat[:, :, r, c + d] - feat[:, :, r, c]
        torch.testing.assert_close(out, ref)
        assert np.array_equal(edge_valid_mask(6, 7, [d]).numpy(), grid_edge_valid_mask(6, 7, [d]))


def _affinities(model, batch):
    model.eval()
    images = torch.stack([(x["image"].float() - model.pixel_mean) / model.pixel_std for x in batch])
    with torch.no_grad():
        features = model.backbone(images)
        sem = model.sem_seg_head.layers(features)
        return model.affinity_head(features, sem), model.affinity_head.affinity_features(features, sem)


def test_anchor_alignment_predicts_from_the_edges_starting_at_each_slot(tiny_synthetic, batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.COPS.AFFINITY_HEAD.EDGE_ALIGNMENT", "anchor"))
    aff, feat = _affinities(model, batch)
    h, w = feat.shape[-2:]
    assert aff.shape == (2, len(DISTANCES), 2, h, w)
    mask = torch.from_numpy(grid_edge_valid_mask(h, w, DISTANCES))
    assert not aff[:, ~mask].any()
    for k, d in enumerate(DISTANCES):
        x = feat if d == 1 else edge_features(feat, d)
        ref = model.affinity_head.predictors[k](x) * mask[k]
        torch.testing.assert_close(aff[:, k], ref)


def test_center_alignment_is_the_public_plus_moved_to_anchor_slots(model, batch):
    """The public code builds ``ZeroPad2d``-padded centred differences, so its slot (r, c) holds the
    vertical edge (r - d/2, c)-(r + d/2, c) and the horizontal edge (r, c - d/2)-(r, c + d/2), and the
    predictor's last 1x1 conv mixes these two (a "+"). Our slot (r, c) holds the edges starting at
    (r, c): the same vertical edge sits at public (r + d/2, c), the horizontal one at (r, c + d/2)."""
    assert model.affinity_head.edge_alignment == "center"
    aff, feat = _affinities(model, batch)
    h, w = feat.shape[-2:]
    for k, d in enumerate(DISTANCES):
        predictor = model.affinity_head.predictors[k]
        with torch.no_grad():
            if d == 1:
                public = predictor(feat)
            else:
                e = d // 2
                rows = torch.nn.ZeroPad2d((0, 0, e, e))(feat[:, :, d:] - feat[:, :, :-d])
                cols = torch.nn.ZeroPad2d((e, e, 0, 0))(feat[:, :, :, d:] - feat[:, :, :, :-d])
                public = predictor(torch.cat([rows, cols], 1))
        e = d // 2 if d > 1 else 0
        for r in range(h):
            for c in range(w):
                vertical = public[:, 0, r + e, c] if r + d < h else torch.zeros(2)
                horizontal = public[:, 1, r, c + e] if c + d < w else torch.zeros(2)
                torch.testing.assert_close(aff[:, k, 0, r, c], vertical)
                torch.testing.assert_close(aff[:, k, 1, r, c], horizontal)
    # the "+" and the "L" give different logits for d > 1 with the same weights
    with torch.no_grad():
        anchor = model.affinity_head.predictors[1](edge_features(feat, 2))
    mask = torch.from_numpy(grid_edge_valid_mask(h, w, [2]))[0]
    assert (anchor * mask - aff[:, 1]).abs().max() > 0.1 * aff[:, 1].abs().max()


def test_center_alignment_needs_even_distances(tiny_synthetic):
    with pytest.raises(ValueError, match=r"EDGE_DISTANCES .*\[3\] are odd.*EDGE_ALIGNMENT anchor"):
        build_model(tiny_cfg("MODEL.COPS.EDGE_DISTANCES", "[1, 2, 3]"))
    build_model(tiny_cfg("MODEL.COPS.EDGE_DISTANCES", "[1, 2, 3]", "MODEL.COPS.AFFINITY_HEAD.EDGE_ALIGNMENT", "anchor"))
    with pytest.raises(ValueError, match=r"EDGE_ALIGNMENT='middle'"):
        build_model(tiny_cfg("MODEL.COPS.AFFINITY_HEAD.EDGE_ALIGNMENT", "middle"))


def test_panoptic_from_solution_rules():
    labels = np.array([[0, 0, 1, 1], [0, 2, 1, 1], [2, 2, 2, 0]])
    clusters = np.array([[0, 5, 1, 1], [0, 2, 3, 3], [4, 4, 4, 6]])
    is_thing = np.array([False, True, True])
    pan, infos = panoptic_from_solution(labels, clusters, is_thing, 3)
    # stuff 0: one segment over 3 clusters; thing 1: clusters 1 (2 px) and 3 (2 px) dropped;
    # thing 2: cluster 2 (1 px) dropped, cluster 4 (3 px) kept.
    assert infos == [{"id": 1, "category_id": 0, "isthing": False}, {"id": 2, "category_id": 2, "isthing": True}]
    assert np.array_equal(pan, [[1, 1, 0, 0], [1, 0, 0, 0], [2, 2, 2, 1]])


def test_small_segments_become_void():
    pan = torch.tensor([[1, 1, 1, 2], [1, 1, 3, 2], [4, 4, 4, 4]], dtype=torch.int32)
    infos = [{"id": 1, "category_id": 0, "isthing": False}, {"id": 2, "category_id": 1, "isthing": True},
             {"id": 3, "category_id": 1, "isthing": True}, {"id": 4, "category_id": 2, "isthing": False}]
    # things need 2 px (id 2: 2 kept, id 3: 1 dropped), stuff 5 (id 1: 5 kept, id 4: 4 dropped)
    out, kept = void_small_segments(pan, infos, thing_area=2, stuff_area=5)
    assert [s["id"] for s in kept] == [1, 2]
    assert out.tolist() == [[1, 1, 1, 2], [1, 1, 0, 2], [0, 0, 0, 0]]
    assert pan[2, 0] == 4                                       # the input is not changed
    out, kept = void_small_segments(pan, infos, thing_area=0, stuff_area=0)
    assert kept == infos and torch.equal(out, pan)


def test_inference_applies_the_size_gate_at_the_input_resolution(tiny_synthetic, batch):
    """Gate on: exactly the gate-off segments with at least THING_AREA / STUFF_AREA pixels remain."""
    torch.manual_seed(0)
    ungated = build_model(tiny_cfg("MODEL.COPS.INFERENCE_AREA_GATE", "False")).eval()
    inputs = [{"image": x["image"]} for x in batch]
    with torch.no_grad():
        off = ungated(inputs)
    areas = {True: [], False: []}
    for b in off:
        pan, infos = b["panoptic_seg"]
        for s in infos:
            areas[s["isthing"]].append(int((pan == s["id"]).sum()))
    # thresholds between the smallest and the largest segment of each kind: some go, some stay
    limits = {k: (min(v) + max(v)) / 2 if v else 0.0 for k, v in areas.items()}
    assert len(areas[False]) > 1 and min(areas[False]) < limits[False]
    gated = build_model(tiny_cfg("MODEL.COPS.THING_AREA", str(limits[True]), "MODEL.COPS.STUFF_AREA",
                                 str(limits[False]))).eval()
    gated.load_state_dict(ungated.state_dict())
    with torch.no_grad():
        on = gated(inputs)
    for a, b in zip(on, off):
        (pan_on, infos_on), (pan_off, infos_off) = a["panoptic_seg"], b["panoptic_seg"]
        big = [s for s in infos_off if int((pan_off == s["id"]).sum()) >= limits[s["isthing"]]]
        assert infos_on == big
        keep = torch.isin(pan_off, torch.tensor([s["id"] for s in big] or [-1], dtype=pan_off.dtype))
        assert torch.equal(pan_on, torch.where(keep, pan_off, torch.zeros_like(pan_off)))


def _public_mask_score(mask, centred_logits, distances):
    """The public code's MaskScore, written as it is there (centred ZeroPad2d layout)."""
    m = mask.double()
    cut_logits = join_logits = 0.0
    for i, d in enumerate(distances):
        rows = (0, 0, 0, 1) if d == 1 else (0, 0, d // 2, d // 2)
        cols = (0, 1, 0, 0) if d == 1 else (d // 2, d // 2, 0, 0)
        cut = torch.stack([torch.nn.ZeroPad2d(rows)((m[d:] - m[:-d]).abs()),
                           torch.nn.ZeroPad2d(cols)((m[:, d:] - m[:, :-d]).abs())])
        joined = torch.stack([torch.nn.ZeroPad2d(rows)((m[d:] + m[:-d] == 2).double()),
                              torch.nn.ZeroPad2d(cols)((m[:, d:] + m[:, :-d] == 2).double())])
        cut_logits += (centred_logits[i] * cut).mean()
        join_logits += (centred_logits[i] * joined).mean()
    return -1.0 * (join_logits - cut_logits)


def test_affinity_mask_score_is_the_public_mask_score():
    from cmt_cops_d2.modeling.cops.heads import centered_to_anchor_slots

    g = torch.Generator().manual_seed(0)
    distances = [1, 2, 4, 6]
    centred = torch.randn(len(distances), 2, 11, 13, generator=g, dtype=torch.float64)
    anchor = torch.stack([centred[k] if d == 1 else centered_to_anchor_slots(centred[k][None], d)[0]
                          for k, d in enumerate(distances)])
    for _ in range(5):
        mask = torch.rand(11, 13, generator=g) > 0.6
        mask[3:8, 4:9] = True
        torch.testing.assert_close(affinity_mask_score(mask, anchor, distances),
                                   _public_mask_score(mask, centred, distances))


def test_instances_and_sem_seg_outputs(model, batch):
    model.eval()
    with torch.no_grad():
        outs = model([{"image": x["image"]} for x in batch])
    found = 0
    for out in outs:
        pan, infos = out["panoptic_seg"]
        labels = out["sem_seg"].argmax(0)
        assert out["sem_seg"].sum(0).eq(1).all()                          # one-hot node labels
        for seg in infos:                                                  # the labelling PQ scores
            assert (labels[pan == seg["id"]] == seg["category_id"]).all()
        inst = out["instances"]
        things = [seg for seg in infos if seg["isthing"]]
        assert len(inst) == len(things) and inst.image_size == tuple(pan.shape)
        for k, seg in enumerate(things):
            assert torch.equal(inst.pred_masks[k], pan == seg["id"])
            assert inst.pred_classes[k] == seg["category_id"]
        assert torch.isfinite(inst.scores).all()
        found += len(inst)
    assert found > 0
    # the score of the first image's instances, recomputed from the logits
    images = ImageList.from_tensors([(batch[0]["image"].float() - model.pixel_mean) / model.pixel_std],
                                    model.size_divisibility)
    with torch.no_grad():
        sem, aff = model.predict_logits(images.tensor)
    H, W = batch[0]["image"].shape[-2:]
    logits = F.interpolate(sem, scale_factor=4, mode="bilinear", align_corners=False)[0, :, :H, :W]
    pan, infos = outs[0]["panoptic_seg"]
    assert len(outs[0]["instances"]) > 0
    for k, seg in enumerate(s for s in infos if s["isthing"]):
        grid = F.pad(pan[::4, ::4] == seg["id"], (0, aff.shape[-1] - pan[::4, ::4].shape[1],
                                                  0, aff.shape[-2] - pan[::4, ::4].shape[0]))
        expected = logits[seg["category_id"]][pan == seg["id"]].mean() + affinity_mask_score(
            grid, aff[0], DISTANCES)
        torch.testing.assert_close(outs[0]["instances"].scores[k], expected)


def test_inference_is_feasible_and_accepted_by_evaluator(cfg, model, tmp_path):
    model.eval()
    meta = MetadataCatalog.get("tiny_synthetic_val")
    calls = []
    solve = model.solve

    def checked_solve(node_costs, edge_costs, grid_sizes):
        sols = solve(node_costs, edge_costs, grid_sizes)
        for b, ((h, w), (lab, cid)) in enumerate(zip(grid_sizes, sols)):
            theta = node_costs[b, :, :h, :w].double().reshape(node_costs.shape[1], -1).T.numpy()
            costs = edge_maps_to_flat(edge_costs[b, :, :, :h, :w].double().numpy(), DISTANCES)
            check_amwc_solution(theta, grid_edges(h, w, DISTANCES), costs, model.is_thing, lab.reshape(-1),
                                cid.reshape(-1))
            calls.append(b)
        return sols

    outputs = []
    inference = model.inference

    def recording_inference(*args):
        res = inference(*args)
        outputs.append((args[2], copy.deepcopy(res)))  # the evaluator pops "isthing" from its copy
        return res

    model.solve, model.inference = checked_solve, recording_inference
    try:
        loader = Trainer.build_test_loader(cfg, "tiny_synthetic_val")
        res = inference_on_dataset(model, loader, COCOPanopticEvaluator("tiny_synthetic_val", str(tmp_path)))
    finally:
        del model.solve, model.inference
    assert len(calls) == len(DatasetCatalog.get("tiny_synthetic_val"))
    assert "PQ" in res["panoptic_seg"] and np.isfinite(res["panoptic_seg"]["PQ"])
    thing_ids = set(meta.thing_dataset_id_to_contiguous_id.values())
    x, (out, *_) = outputs[0]
    pan, infos = out["panoptic_seg"]
    assert pan.dtype == torch.int32 and pan.shape == (x[0]["height"], x[0]["width"])
    assert out["sem_seg"].shape == (7, x[0]["height"], x[0]["width"])
    assert set(torch.unique(pan).tolist()) - {0} == {s["id"] for s in infos}
    stuff = [s["category_id"] for s in infos if not s["isthing"]]
    assert len(stuff) == len(set(stuff))
    assert all(s["isthing"] == (s["category_id"] in thing_ids) for s in infos)


@pytest.mark.parametrize("size,out", [((37, 53), None), ((64, 80), (128, 160)), ((70, 129), None)])
def test_any_input_size(model, size, out):
    model.eval()
    x = {"image": torch.randint(0, 256, (3, *size), dtype=torch.uint8)}
    if out is not None:
        x["height"], x["width"] = out
    with torch.no_grad():
        r = model([x])[0]
    pan, infos = r["panoptic_seg"]
    assert pan.shape == (out or size) and r["sem_seg"].shape == (7, *(out or size))
    assert set(torch.unique(pan).tolist()) - {0} == {s["id"] for s in infos}


def test_perfect_logits_reproduce_ground_truth(model, batch, monkeypatch):
    model.eval()
    x = dict(batch[0])
    H, W = x["image"].shape[-2:]
    x["height"], x["width"] = H, W
    gt, classes = x["panoptic"].numpy(), x["panoptic_classes"].numpy()
    h, w = gt.shape
    sem_grid = x["sem_seg"].numpy()[2::4, 2::4]
    sem = torch.full((1, 7, 16, 16), -10.0)  # padded grid (64 / 4)
    for c in range(7):
        sem[0, c, :h, :w][torch.from_numpy(sem_grid == c)] = 10.0
    aff = torch.where(x["affinities"] > 0, 10.0, -10.0)
    aff = torch.nn.functional.pad(aff, (0, 16 - w, 0, 16 - h))[None]
    monkeypatch.setattr(model.sem_seg_head, "layers", lambda features: sem)
    monkeypatch.setattr(model.affinity_head, "forward", lambda features, s: aff)
    with torch.no_grad():
        pan, infos = model([x])[0]["panoptic_seg"]
    grid = pan.numpy()[2::4, 2::4]
    cat = {s["id"]: s["category_id"] for s in infos}
    checked = 0
    for s in range(len(classes)):
        m = gt == s
        if m.sum() < 3:
            continue
        ids = np.unique(grid[m])
        assert len(ids) == 1 and ids[0] != 0 and cat[ids[0]] == classes[s]
        assert (grid == ids[0])[gt >= 0].sum() == m.sum()  # no other GT segment shares the id
        checked += 1
    assert checked >= 2


def test_inference_checks_the_costs_at_the_solver_entry(tiny_synthetic, batch):
    """Inference goes through the same checked entry as training: a NaN cost is an error naming it."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    with torch.no_grad():
        model.costs.b_d.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"edge_costs contains NaN or inf"):
        with torch.no_grad():
            model([{"image": batch[0]["image"]}])
