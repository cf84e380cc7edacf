"""COPS authors' checkpoints -> this project's COPS: a checkpoint written by the authors' own model code
(github:aabbas90/COPS at de324db, ``tools/fixtures/make_cops_fixture.py``: their ``PanopticAffinity``
at a small width with random weights and batch-norm statistics, their fine-tuned checkpoint format),
converted and loaded into the ``COPS`` that the project's Cityscapes config builds (plus the fixture's
widths), gives the authors' semantic logits, affinity logits, node and edge costs, and the same AMWC
instance; the panoptic output equals the project's solver run on the authors' solver inputs. Every
tensor is accounted for, and the errors name the tensor or the file. The authors' code is not needed.

Slot convention. For an even distance ``d > 1`` the authors' classifier output at slot ``(r, c)``
belongs to the vertical edge ``(r - d/2, c)--(r + d/2, c)`` and the horizontal edge
``(r, c - d/2)--(r, c + d/2)`` (centred on the slot); the project's maps hold the edge that *starts*
at the slot (anchor convention). Their maps are therefore moved to anchor slots with
``heads.centered_to_anchor_slots`` and compared where an edge exists (``edge_valid_mask``); the
project's other slots are 0, theirs hold the classifier's output on zero padding, which their solver
never reads. Distance 1 uses the anchor convention on both sides.
"""
import argparse
import functools
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from cmt_cops_d2.checkpoint import (
    COPSCheckpointError,
    convert_cops_state_dict,
    cops_checkpoint_config,
    load_cops_checkpoint,
    skipped_cops_tensors,
)
from cmt_cops_d2.checkpoint.cops import map_cops_name, unit_distance_classifiers
from cmt_cops_d2.engine import setup_cfg
from cmt_cops_d2.modeling.cops.amwc_layer import solve_amwc_maps
from cmt_cops_d2.modeling.cops.heads import centered_to_anchor_slots, edge_valid_mask
from cmt_cops_d2.modeling.cops.meta_arch import COPS
from cmt_cops_d2.solvers.graph import edge_maps_to_flat, grid_edges
from tests.conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data", "cops")
NAME = "cityscapes_tiny"
# float32 round-off through the 50-layer backbone is ~1e-5 of the output scale (a batch of two runs other
# conv kernels than the authors' batch of one; a float64 run differs from both by as much); a wrong
# slot, layer or affine is of order one.
RELATIVE_TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=None)
def _fixture():
    with open(os.path.join(DATA, f"{NAME}.json")) as f:
        meta = json.load(f)
    io = dict(np.load(os.path.join(DATA, meta["files"]["io"])))
    state, extras = load_cops_checkpoint(os.path.join(DATA, meta["files"]["model"]))
    return meta, io, state, extras


def _opts(meta, **extra):
    opts = ["MODEL.DEVICE", "cpu"]
    for key, value in list(meta["project_config"].items()) + list(extra.items()):
        opts += [key, str(tuple(value)) if key == "INPUT.CROP.SIZE" else str(value)]
    return opts


def _cfg(meta, **extra):
    return setup_cfg(argparse.Namespace(config_file=os.path.join(ROOT, meta["project_config_file"]),
                                        opts=_opts(meta, **extra)))


def _model(**extra):
    meta, _, state, _ = _fixture()
    cfg = _cfg(meta, **extra)
    model = COPS(cfg)
    model.load_state_dict(convert_cops_state_dict(state, model.state_dict(),
                                                  signed_node_cost_scale=cfg.MODEL.COPS.SIGNED_NODE_COST_SCALE))
    return model.eval()


def _to_anchor(maps: np.ndarray, distances) -> torch.Tensor:
    """``B x D x 2 x h x w`` maps in the authors' slots -> the project's anchor slots."""
    t = torch.from_numpy(maps)
    return torch.stack([t[:, i] if d == 1 else centered_to_anchor_slots(t[:, i], d)
                        for i, d in enumerate(distances)], dim=1)


def _inputs(io):
    return [{"image": torch.from_numpy(img)} for img in io["images"]]


@functools.lru_cache(maxsize=None)
def _ours():
    """The converted model and its logits and costs on the fixture's images (batch of 2)."""
    _, io, _, _ = _fixture()
    model = _model()
    x = (torch.from_numpy(io["images"]).float() - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        sem, aff = model.predict_logits(x)
        node, edge = model.costs(sem, aff)
    return model, sem, aff, node, edge


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.detach() - theirs).abs().max() / theirs.abs().max())


def test_fixture_is_an_authors_checkpoint():
    meta, io, state, extras = _fixture()
    assert meta["commit"] == "de324dbb7199fddea8ad4f6b15ea658b06a1ce9c"
    with open(os.path.join(DATA, meta["files"]["model"]), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == meta["model_sha256"]
    assert extras == {"iteration": 2999}
    assert len(state) == meta["num_state_dict_tensors"] == 483
    assert not any(k.endswith("num_batches_tracked") for k in state)    # FrozenBatchNorm2d, as released
    assert "AFF_EMBED_head.classifiers.2.2.weight" in state and "amwc_layer.edge_costs_weights.5" in state
    B, K, h, w = io["sem_logits"].shape
    assert (B, K, h, w) == (2, 19, 24, 40) and io["aff_logits"].shape == (B, 3, 2, h, w)
    assert min(meta["edge_costs_weights"][0::2]) < 0 < meta["seg_cost_weights"][0]   # |w| for edges


def test_mapping_table():
    assert map_cops_name("backbone.res5.2.conv2.norm.running_var") == ("backbone.res5.2.conv2.norm.running_var", None)
    assert map_cops_name("sem_seg_head.head.1.weight") == ("sem_seg_head.head.1.weight", None)
    assert map_cops_name("AFF_EMBED_head.decoder.res5.project_conv.convs.4.1.bias") == (
        "affinity_head.decoder.res5.project_conv.convs.4.1.bias", None)
    assert map_cops_name("AFF_EMBED_head.affinity_head.0.norm.bias") == ("affinity_head.head.0.norm.bias", None)
    assert map_cops_name("AFF_EMBED_head.classifiers.3.1.weight") == ("affinity_head.predictors.3.convs.1.weight", None)
    assert map_cops_name("AFF_EMBED_head.classifiers.3.2.bias") == ("affinity_head.predictors.3.predictor.bias", None)
    assert map_cops_name("amwc_layer.seg_cost_weights.0") == ("costs.w_s", None)
    assert map_cops_name("amwc_layer.seg_cost_weights.1") == ("costs.b_s", None)
    assert map_cops_name("amwc_layer.edge_costs_weights.4") == ("costs.w_d", 2)
    assert map_cops_name("amwc_layer.edge_costs_weights.5") == ("costs.b_d", 2)
    assert map_cops_name("amwc_layer.training_per_class_areas") is None
    _, _, state, _ = _fixture()
    assert set(skipped_cops_tensors(state)) == {"amwc_layer.training_per_class_areas", "pixel_mean", "pixel_std"}


def test_every_tensor_lands_once_and_every_model_tensor_is_covered():
    meta, _, state, _ = _fixture()
    model = COPS(_cfg(meta))
    target = model.state_dict()
    converted = convert_cops_state_dict(state, target)
    assert list(converted) == list(target)
    sources = [k for k in state if k not in skipped_cops_tensors(state)]
    counters = [k for k in target if k.endswith("num_batches_tracked")]
    # the 6 edge-affine scalars become two (3,) vectors, the counters are filled (frozen batch norms)
    assert len(converted) == len(sources) - 6 + 2 + len(counters)
    assert all(int(converted[k]) == 0 for k in counters)
    for name in sources:
        ours, index = map_cops_name(name)
        got = converted[ours] if index is None else converted[ours][index]
        assert torch.equal(got.reshape(-1), state[name].reshape(-1)), name
    assert torch.equal(converted["costs.w_d"], torch.tensor([state[f"amwc_layer.edge_costs_weights.{2 * i}"].item()
                                                             for i in range(3)]))
    model.load_state_dict(converted, strict=True)
    # what can be read from the weights is the fixture's project config
    inferred = cops_checkpoint_config(state)
    for key, value in meta["project_config"].items():
        if key in inferred:
            assert inferred[key] == value, key
    assert inferred["MODEL.SEM_SEG_HEAD.NUM_CLASSES"] == 19 and inferred["MODEL.RESNETS.DEPTH"] == 50
    assert inferred["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert "MODEL.COPS.EDGE_DISTANCES" not in inferred     # 3 classifiers: not an authors' config
    assert unit_distance_classifiers(state) == [True, False, False]


def test_semantic_and_affinity_logits_equal_the_authors():
    meta, io, _, _ = _fixture()
    _, sem, aff, _, _ = _ours()
    assert _relative(sem, torch.from_numpy(io["sem_logits"])) < RELATIVE_TOLERANCE
    ds = meta["edge_distances"]
    valid = edge_valid_mask(*sem.shape[-2:], ds)
    theirs = _to_anchor(io["aff_logits"], ds)
    for i, d in enumerate(ds):
        err = _relative(aff[:, i][:, valid[i]], theirs[:, i][:, valid[i]])
        assert err < RELATIVE_TOLERANCE, f"distance {d}: {err:.2e}"
    assert torch.all(aff[:, ~valid] == 0)
    # without the move to anchor slots the long distances would not match at all
    raw = torch.from_numpy(io["aff_logits"])
    assert _relative(aff[:, 2][:, valid[2]], raw[:, 2][:, valid[2]]) > 0.1


def test_node_and_edge_costs_equal_the_authors():
    meta, io, _, _ = _fixture()
    _, sem, _, node, edge = _ours()
    assert _relative(node, torch.from_numpy(io["node_costs"])) < RELATIVE_TOLERANCE
    ds = meta["edge_distances"]
    valid = edge_valid_mask(*sem.shape[-2:], ds)
    assert _relative(edge[:, valid], _to_anchor(io["edge_costs"], ds)[:, valid]) < RELATIVE_TOLERANCE


def test_the_authors_solver_inputs_are_the_projects_amwc_instance():
    """Their ``amwc_solver`` arguments: the same grid graph in the same edge order, the same node and
    edge costs as the project's solver gets."""
    meta, io, _, _ = _fixture()
    _, sem, _, node, edge = _ours()
    B, K, h, w = node.shape
    ds = meta["edge_distances"]
    assert np.array_equal(io["solver_edges"], grid_edges(h, w, ds))
    assert np.array_equal(np.flatnonzero(io["partitionable"]), meta["thing_classes"])
    assert np.array_equal(np.flatnonzero(io["partitionable"]), np.flatnonzero(_ours()[0].is_thing))
    ours_node = node.reshape(B, K, h * w).transpose(1, 2)
    assert _relative(ours_node, torch.from_numpy(io["solver_node_costs"])) < RELATIVE_TOLERANCE
    ours_edge = torch.from_numpy(np.stack([edge_maps_to_flat(e.numpy(), ds) for e in edge]))
    assert _relative(ours_edge, torch.from_numpy(io["solver_edge_costs"])) < RELATIVE_TOLERANCE


class _FixedCosts(nn.Module):
    def __init__(self, node, edge):
        super().__init__()
        self.node, self.edge = node, edge

    def forward(self, sem_logits, aff_logits):
        return self.node, self.edge


def test_panoptic_output_equals_the_solver_on_the_authors_costs(monkeypatch):
    """The LPMP solver is not available: the project's solver on the authors' costs stands in for it.
    Equal costs on the same graph give the same solution, so the same panoptic output."""
    meta, io, _, _ = _fixture()
    model, _, _, node, edge = _ours()
    B, K, h, w = node.shape
    ds = meta["edge_distances"]
    ours = model.solve(node, edge, [(h, w)] * B)
    # the authors' solver inputs as they are (edge list), solved by the project's solver
    their_node = torch.from_numpy(io["solver_node_costs"]).transpose(1, 2).reshape(B, K, h, w)
    *_, theirs = solve_amwc_maps(their_node, torch.from_numpy(io["solver_edge_costs"]), io["solver_edges"],
                                 io["partitionable"], 1)
    for (labels, clusters), (t_labels, t_clusters, _) in zip(ours, theirs):
        assert np.array_equal(labels.reshape(-1), t_labels)
        assert np.array_equal(clusters.reshape(-1), t_clusters)
    assert len(np.unique(ours[0][0])) > 2 and len(np.unique(ours[0][1])) > 3     # not a trivial instance

    with torch.no_grad():
        out = model(_inputs(io))
        monkeypatch.setattr(model, "costs", _FixedCosts(torch.from_numpy(io["node_costs"]),
                                                        _to_anchor(io["edge_costs"], ds)))
        ref = model(_inputs(io))
    for a, b in zip(out, ref):
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
        assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
        assert torch.equal(a["sem_seg"], b["sem_seg"])
    assert sum(len(a["panoptic_seg"][1]) for a in out) >= 2


def test_a_negative_node_scale_needs_the_signed_switch():
    """Their node scale is signed; ours takes |w_s| unless MODEL.COPS.SIGNED_NODE_COST_SCALE."""
    meta, io, state, _ = _fixture()
    flipped = dict(state)
    flipped["amwc_layer.seg_cost_weights.0"] = -state["amwc_layer.seg_cost_weights.0"]
    model = COPS(_cfg(meta, **{"MODEL.COPS.SIGNED_NODE_COST_SCALE": True})).eval()
    with pytest.raises(COPSCheckpointError, match=r"amwc_layer\.seg_cost_weights\.0 = -.*SIGNED_NODE_COST_SCALE True"):
        convert_cops_state_dict(flipped, model.state_dict())
    assert cops_checkpoint_config(flipped)["MODEL.COPS.SIGNED_NODE_COST_SCALE"] is True
    model.load_state_dict(convert_cops_state_dict(flipped, model.state_dict(), signed_node_cost_scale=True))
    _, sem, _, _, _ = _ours()
    node = model.costs.node_costs(sem)
    assert _relative(node, torch.from_numpy(io["node_costs_negative_scale"])) < RELATIVE_TOLERANCE


@functools.lru_cache(maxsize=None)
def _target_state():
    meta, _, _, _ = _fixture()
    with torch.device("meta"):
        return COPS(_cfg(meta)).state_dict()


def test_missing_tensor_is_named():
    _, _, state, _ = _fixture()
    broken = {k: v for k, v in state.items() if k != "AFF_EMBED_head.classifiers.1.1.norm.running_var"}
    with pytest.raises(COPSCheckpointError, match=r"affinity_head\.predictors\.1\.convs\.1\.norm\.running_var: "
                                                  r"not covered"):
        convert_cops_state_dict(broken, _target_state())


def test_unknown_tensor_is_named():
    _, _, state, _ = _fixture()
    broken = dict(state, **{"AFF_EMBED_head.offset_head.weight": torch.zeros(2, 16, 1, 1)})
    with pytest.raises(COPSCheckpointError, match=r"no counterpart.*\n  AFF_EMBED_head\.offset_head\.weight"):
        convert_cops_state_dict(broken)           # also without a target model


def test_shape_mismatch_is_named():
    _, _, state, _ = _fixture()
    broken = dict(state, **{"sem_seg_head.predictor.weight": torch.zeros(18, 12, 1, 1)})
    with pytest.raises(COPSCheckpointError,
                       match=r"sem_seg_head\.predictor\.weight -> sem_seg_head\.predictor\.weight: "
                             r"shape \(18, 12, 1, 1\) in the checkpoint, \(19, 12, 1, 1\) in the model"):
        convert_cops_state_dict(broken, _target_state())


def test_classifier_and_affine_counts_must_match_the_distances():
    meta, _, state, _ = _fixture()
    with torch.device("meta"):
        four = COPS(_cfg(meta, **{"MODEL.COPS.EDGE_DISTANCES": [1, 4, 16, 32]})).state_dict()
        shared = COPS(_cfg(meta, **{"MODEL.COPS.PER_DISTANCE_EDGE_AFFINE": False})).state_dict()
    with pytest.raises(COPSCheckpointError, match=r"affinity_head\.predictors\.3\.convs\.0\.weight: not covered"):
        convert_cops_state_dict(state, four)
    with pytest.raises(COPSCheckpointError, match=r"costs\.w_d: the checkpoint has one edge-cost affine per "
                                                  r"distance \(3\).*PER_DISTANCE_EDGE_AFFINE True"):
        convert_cops_state_dict(state, shared)
    broken = {k: v for k, v in state.items() if k != "amwc_layer.edge_costs_weights.4"}
    with pytest.raises(COPSCheckpointError,
                       match=r"costs\.w_d: amwc_layer\.edge_costs_weights\.\* give entries \[0, 1\]"):
        convert_cops_state_dict(broken)


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(COPSCheckpointError, match=rf"{text}: not a PyTorch checkpoint"):
        load_cops_checkpoint(str(text))
    no_model = tmp_path / "optimizer_only.pth"
    torch.save({"optimizer": {}, "iteration": 3}, no_model)
    with pytest.raises(COPSCheckpointError, match=rf"{no_model}: no \"model\" entry \(keys: optimizer, iteration\)"):
        load_cops_checkpoint(str(no_model))
    bare = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), bare)
    with pytest.raises(COPSCheckpointError, match=rf"{bare}: holds a Tensor"):
        load_cops_checkpoint(str(bare))
    with pytest.raises(COPSCheckpointError, match="no such file"):
        load_cops_checkpoint(str(tmp_path / "missing.pth"))
    truncated = tmp_path / "truncated.pth"
    with open(os.path.join(DATA, _fixture()[0]["files"]["model"]), "rb") as f:
        truncated.write_bytes(f.read(1000))
    with pytest.raises(COPSCheckpointError, match=rf"{truncated}: not a PyTorch checkpoint"):
        load_cops_checkpoint(str(truncated))

    pickled = tmp_path / "pickled.pth"   # an object that is neither a tensor nor a plain value
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(COPSCheckpointError, match=rf"{pickled}: holds pickled objects.*allow_pickle=True"):
        load_cops_checkpoint(str(pickled))


def _tool():
    module = load_script("tools/convert_cops_checkpoint.py")
    return module


def test_cli_writes_detectron2_weights_that_reproduce_the_authors(tmp_path, capsys):
    meta, io, _, _ = _fixture()
    out = tmp_path / "cops_tiny.pth"
    tool = _tool()
    # the fixture's own config keys are read from the weights; only the distances and the crop are not
    result = tool.main([os.path.join(DATA, meta["files"]["model"]), str(out),
                        "--config-file", os.path.join(ROOT, meta["project_config_file"]),
                        "MODEL.COPS.EDGE_DISTANCES", "[1, 4, 16]", "INPUT.CROP.SIZE", "(48, 80)"])
    printed = capsys.readouterr().out
    assert "skipped amwc_layer.training_per_class_areas (19,)" in printed
    assert "MODEL.COPS.AFFINITY_HEAD.CONVS_DIM 24   <- your config: 256" in printed
    assert "MODEL.COPS.EDGE_DISTANCES [1, 4, 16]\n" in printed
    saved = torch.load(out, weights_only=True)
    assert saved["__author__"].startswith("COPS authors") and saved["matching_heuristics"] is False
    assert saved["config"]["MODEL.COPS.EDGE_DISTANCES"] == [1, 4, 16]
    assert set(saved["model"]) == set(result["model"])

    model = COPS(_cfg(meta)).eval()     # a fresh model: the weights come from the file only
    DetectionCheckpointer(model).load(str(out))
    x = (torch.from_numpy(io["images"][:1]).float() - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        sem, _ = model.predict_logits(x)
    assert _relative(sem[0], torch.from_numpy(io["sem_logits"][0])) < RELATIVE_TOLERANCE


def test_cli_errors_name_the_problem(tmp_path):
    meta, _, _, _ = _fixture()
    tool = _tool()
    checkpoint = os.path.join(DATA, meta["files"]["model"])
    with pytest.raises(SystemExit, match=r"3 edge classifiers \(distance 1 at positions \[0\]\), but "
                                         r"MODEL.COPS.EDGE_DISTANCES is \[1, 4, 16, 32, 64, 128\]"):
        tool.main([checkpoint, str(tmp_path / "x.pth")])        # default Cityscapes config: six distances
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(SystemExit, match=rf"error: {text}: not a PyTorch checkpoint"):
        tool.main([str(text), str(tmp_path / "y.pth")])
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "y.pth").exists()
