"""The COPS training mapper: targets checked against direct dense computations (explicit loops)."""
import argparse
import copy
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from cmt_cops_d2.data.mappers import MAPPERS, COPSPanopticMapper, build_train_mapper
from cmt_cops_d2.engine import setup_cfg
from cmt_cops_d2.solvers.graph import edge_maps_to_flat, grid_edges

from ..conftest import CONFIG_DIR

COCO_D = (1, 4, 16, 32, 64)


def _pan(record):
    return rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB"))).astype(np.int64)


def _mapper(**kw):
    args = dict(augmentations=[], image_format="BGR", ignore_label=255, thing_ids=[],
                small_instance_area=0, small_instance_weight=3.0)
    args.update(kw)
    return COPSPanopticMapper(**args)


@pytest.fixture()
def record(tiny_synthetic):
    recs = DatasetCatalog.get("tiny_synthetic_train")
    # the record with the most thing segments, so that small / large things and crowd all occur
    rec = max(recs, key=lambda r: sum(s["isthing"] for s in r["segments_info"]))
    return copy.deepcopy(rec)


def _reference(pan, segs, distances, small_area, small_w=3.0, thing_w=4.0):
    """Dense loop reference: (grid segment id or 0, grid pixel weight, affinities, affinity weights)."""
    info = {s["id"]: s for s in segs}
    g = pan[2::4, 2::4]
    h, w = g.shape
    pix = np.zeros((h, w))
    gid = np.zeros((h, w), np.int64)  # 0 = void / crowd
    for i in range(h):
        for j in range(w):
            s = info.get(int(pan[4 * i + 2, 4 * j + 2]))
            if s is None or s["iscrowd"]:
                continue
            gid[i, j] = s["id"]
            # stuff segments of one class share one GT segment
            if not s["isthing"]:
                gid[i, j] = -1000 - s["category_id"]
            area = int((pan == s["id"]).sum())
            pix[i, j] = (thing_w * (small_w if area < small_area else 1.0)) if s["isthing"] else 1.0
    aff = np.zeros((len(distances), 2, h, w))
    wts = np.zeros((len(distances), 2, h, w))
    for k, d in enumerate(distances):
        for r in range(h):
            for c in range(w):
                for ch, (r2, c2) in enumerate(((r + d, c), (r, c + d))):
                    if r2 >= h or c2 >= w:
                        continue
                    aff[k, ch, r, c] = float(gid[r, c] != gid[r2, c2])
                    pu, pv = pix[r, c], pix[r2, c2]
                    wts[k, ch, r, c] = max(pu, pv) if (pu > 0 and pv > 0) else 0.0
    return gid, pix, aff, wts


def _thing_areas(pan, segs):
    return sorted(int((pan == s["id"]).sum()) for s in segs if s["isthing"])


def _with_void(record, tmp_path):
    """A copy of ``record`` whose PNG has an unlabelled (id 0) block, written under ``tmp_path``."""
    rec = copy.deepcopy(record)
    pan = _pan(rec)
    pan[20:31, 30:47] = 0
    path = str(tmp_path / "pan.png")
    Image.fromarray(id2rgb(pan)).save(path)
    rec["pan_seg_file_name"] = path
    rec["segments_info"] = [s for s in rec["segments_info"] if (pan == s["id"]).any()]
    return rec


def test_targets_equal_dense_loop_reference(record, tmp_path):
    record = _with_void(record, tmp_path)
    segs = record["segments_info"]
    things = [s for s in segs if s["isthing"]]
    assert len(things) >= 2
    things[0]["iscrowd"] = 1  # a crowd thing: void on the grid, weight 0, keeps its class in sem_seg
    pan = _pan(record)
    areas = _thing_areas(pan, things[1:])
    small_area = areas[len(areas) // 2] if areas[0] < areas[-1] else areas[0] + 1  # some small, some not
    m = _mapper(small_instance_area=small_area)
    out = m(copy.deepcopy(record))
    H, W = pan.shape
    h, w = len(range(2, H, 4)), len(range(2, W, 4))
    assert (H, W, h, w) == (64, 80, 16, 20)

    gid, pix, aff, wts = _reference(pan, segs, COCO_D, small_area)
    assert out["affinities"].shape == out["affinity_weights"].shape == (5, 2, h, w)
    assert out["affinities"].dtype == out["affinity_weights"].dtype == torch.float32
    assert np.array_equal(out["affinities"].numpy(), aff)
    assert np.array_equal(out["affinity_weights"].numpy(), wts)

    # panoptic: index map equals the sampled full-resolution ids (a bijection on non-void pixels)
    P = out["panoptic"].numpy()
    assert P.shape == (h, w) and out["panoptic"].dtype == torch.long
    assert np.array_equal(P < 0, gid == 0)
    pairs = set(zip(P[P >= 0].tolist(), gid[P >= 0].tolist()))
    S = out["panoptic_classes"].numel()
    assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs) == S
    cls = {s["id"]: s["category_id"] for s in segs}
    th = {s["id"]: s["isthing"] for s in segs}
    for i in range(h):
        for j in range(w):
            sid = int(pan[4 * i + 2, 4 * j + 2])
            if P[i, j] >= 0:
                assert out["panoptic_classes"][P[i, j]] == cls[sid]
                assert bool(out["panoptic_isthing"][P[i, j]]) == th[sid]
    assert np.array_equal(out["panoptic_weights"].numpy(), (gid != 0).astype(np.float32))
    crowd_grid = pan[2::4, 2::4] == things[0]["id"]
    assert crowd_grid.any() and (P[crowd_grid] == -1).all()

    # edge weights: only 0 / 1 / 4 / 12 occur, and both thing weights occur
    vals = set(np.unique(out["affinity_weights"].numpy()).tolist())
    assert vals == {0.0, 1.0, 4.0, 12.0}
    # invalid slots (edge leaves the grid) have weight 0 and target 0
    for k, d in enumerate(COCO_D):
        for t in ("affinities", "affinity_weights"):
            assert (out[t][k, 0, max(h - d, 0):] == 0).all() and (out[t][k, 1, :, max(w - d, 0):] == 0).all()
    assert (out["affinity_weights"][2:, 0] == 0).all()  # d >= 16 = h: no vertical edges at all
    # void / crowd endpoints give weight 0 on every edge
    for k, d in enumerate(COCO_D):
        for r in range(h):
            for c in range(w):
                for ch, (r2, c2) in enumerate(((r + d, c), (r, c + d))):
                    if r2 < h and c2 < w and (P[r, c] < 0 or P[r2, c2] < 0):
                        assert out["affinity_weights"][k, ch, r, c] == 0

    # the flat order of the solver: edge_maps_to_flat gives cut = [segment differs] along grid_edges
    flat = edge_maps_to_flat(out["affinities"].numpy(), COCO_D)
    e = grid_edges(h, w, COCO_D)
    assert np.array_equal(flat, (P.reshape(-1)[e[:, 0]] != P.reshape(-1)[e[:, 1]]).astype(np.float32))

    # sem_seg: the class of every pixel (crowd keeps its class), 255 at void
    sem = out["sem_seg"].numpy()
    sw = out["sem_seg_weights"].numpy()
    assert out["sem_seg"].dtype == torch.long and sem.shape == (H, W)
    for y in range(H):
        for x in range(W):
            sid = int(pan[y, x])
            if sid == 0:
                assert sem[y, x] == 255 and sw[y, x] == 0
                continue
            s = next(s for s in segs if s["id"] == sid)
            assert sem[y, x] == s["category_id"]
            small = s["isthing"] and not s["iscrowd"] and (pan == sid).sum() < small_area
            assert sw[y, x] == (3.0 if small else 1.0)
    assert (pan == 0).any()


@pytest.mark.parametrize("distances", [(1,), (1, 2, 3), (1, 4, 16, 32), COCO_D, (8, 3, 25)])
def test_shapes_for_distance_sets(record, distances):
    out = _mapper(edge_distances=distances)(copy.deepcopy(record))
    for t in ("affinities", "affinity_weights"):
        assert out[t].shape == (len(distances), 2, 16, 20)
    assert out["panoptic"].shape == out["panoptic_weights"].shape == (16, 20)
    assert out["image"].shape == (3, 64, 80) and out["image"].dtype == torch.uint8
    assert out["sem_seg"].shape == out["sem_seg_weights"].shape == (64, 80)
    S = int(out["panoptic"].max()) + 1
    assert out["panoptic_classes"].shape == out["panoptic_isthing"].shape == (S,)
    assert set(out["panoptic"].unique().tolist()) <= set(range(-1, S))
    _, _, aff, wts = _reference(_pan(record), record["segments_info"], distances, 0)
    assert np.array_equal(out["affinities"].numpy(), aff)
    assert np.array_equal(out["affinity_weights"].numpy(), wts)


def test_flip_keeps_targets_consistent_with_flipped_png(record):
    pan = _pan(record)
    flip = _mapper(augmentations=[T.RandomFlip(prob=1.0, horizontal=True)], small_instance_area=200)
    plain = _mapper(small_instance_area=200)
    out, ref = flip(copy.deepcopy(record)), plain(copy.deepcopy(record))
    assert torch.equal(out["image"], ref["image"].flip(-1))
    assert torch.equal(out["sem_seg"], ref["sem_seg"].flip(-1))
    assert torch.equal(out["sem_seg_weights"], ref["sem_seg_weights"].flip(-1))
    # grid targets equal a dense reference on the flipped PNG (the sampled pixels shift under a flip)
    fpan = pan[:, ::-1].copy()
    gid, _, aff, wts = _reference(fpan, record["segments_info"], COCO_D, 200)
    assert np.array_equal(out["affinities"].numpy(), aff)
    assert np.array_equal(out["affinity_weights"].numpy(), wts)
    P = out["panoptic"].numpy()
    assert np.array_equal(P < 0, gid == 0)
    cls = {s["id"]: s["category_id"] for s in record["segments_info"]}
    g = fpan[2::4, 2::4]
    assert all(out["panoptic_classes"][P[i, j]] == cls[int(g[i, j])]
               for i, j in zip(*np.nonzero(P >= 0)))


def test_registered_and_built_from_config(tiny_synthetic):
    assert MAPPERS["cops_panoptic"] is COPSPanopticMapper
    cfg = setup_cfg(argparse.Namespace(
        config_file=os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml"),
        opts=["DATASETS.TRAIN", "('tiny_synthetic_train',)", "INPUT.DATASET_MAPPER_NAME", "cops_panoptic",
              "INPUT.CROP.SIZE", "(48, 48)"]))
    assert tuple(cfg.MODEL.COPS.EDGE_DISTANCES) == COCO_D       # the MODEL.COPS defaults
    m = build_train_mapper(cfg)
    assert isinstance(m, COPSPanopticMapper)
    assert m.edge_distances == COCO_D and m.target_stride == 4 and m.thing_edge_weight == 4.0
    assert m.small_instance_area == cfg.INPUT.SMALL_INSTANCE_AREA and m.ignore_label == 255
    out = m(copy.deepcopy(DatasetCatalog.get("tiny_synthetic_train")[0]))
    assert out["image"].shape == (3, 48, 48)
    assert out["affinities"].shape == (5, 2, 12, 12) and out["panoptic"].shape == (12, 12)
