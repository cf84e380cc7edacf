"""COPS is the public COPS network (github:aabbas90/COPS, its Cityscapes and COCO configs): the count of
every part equals the public model's, built from the public code with this project's Detectron2 and
counted layer by layer (34,004,668 parameters on Cityscapes, 33,964,444 on COCO). Ours has the same
tensors except the public model's K-vector ``training_per_class_areas``, which its code never reads."""
import argparse
import os

import pytest
import torch
from detectron2.layers import Conv2d, DepthwiseSeparableConv2d

from cmt_cops_d2.engine import setup_cfg
from cmt_cops_d2.modeling.cops.meta_arch import COPS

from ...conftest import CONFIG_DIR

PUBLIC_DISTANCES = {"cityscapes": "[1, 4, 16, 32, 64]", "coco": "[1, 4, 16, 32]"}


def meta_model(dataset, *opts):
    cfg = setup_cfg(argparse.Namespace(config_file=os.path.join(CONFIG_DIR, dataset, "cops_r50_full.yaml"),
                                       opts=["MODEL.DEVICE", "cpu", *opts]))
    with torch.device("meta"):
        return COPS(cfg)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("dataset,classes,head_in,public", [
    ("cityscapes", 19, 634_112, 34_004_668), ("coco", 133, 896_768, 33_964_444)])
def test_every_part_has_the_public_count(dataset, classes, head_in, public):
    model = meta_model(dataset, "MODEL.COPS.EDGE_DISTANCES", PUBLIC_DISTANCES[dataset])
    assert count(model.backbone) == 23_631_808
    sem, aff = model.sem_seg_head, model.affinity_head
    for decoder in (sem.decoder, aff.decoder):
        assert count(decoder["res5"]) == 3_019_520                # ASPP with separable 3x3 branches
        assert count(decoder["res3"]) == 123_968 and count(decoder["res2"]) == 90_272
    assert count(sem.head) == 1_180_672                           # two dense 3x3 convs
    assert count(sem.predictor) == 256 * classes + classes
    assert [count(m) for m in aff.head] == [head_in, 590_336]
    distances = len(PUBLIC_DISTANCES[dataset].split(","))
    assert [count(p) for p in aff.predictors] == [166_146] + [332_290] * (distances - 1)
    assert count(model.costs) == 2 + 2 * distances                # node pair, one edge pair per distance
    assert count(model) == public - classes
    print(f"{dataset}: {count(model) / 1e6:.2f}M (public {public / 1e6:.2f}M with K unused scalars)")


def test_separable_decoders_and_a_dense_semantic_head():
    model = meta_model("cityscapes")
    sem = model.sem_seg_head
    aspp = sem.decoder["res5"]["project_conv"]
    assert sum(isinstance(m, DepthwiseSeparableConv2d) for m in aspp.modules()) == 3
    assert isinstance(sem.decoder["res3"]["fuse_conv"], DepthwiseSeparableConv2d)
    assert isinstance(model.affinity_head.decoder["res2"]["fuse_conv"], DepthwiseSeparableConv2d)
    assert [type(m) for m in sem.head] == [Conv2d, Conv2d]
    assert [m.kernel_size for m in sem.head] == [(3, 3), (3, 3)] and [m.groups for m in sem.head] == [1, 1]
    # the paper's six Cityscapes distances (this config's): one more d > 1 predictor and edge affine
    assert count(model) == 34_004_668 - 19 + 332_290 + 2


def test_the_semantic_head_must_be_the_cops_head():
    with pytest.raises(ValueError, match=r"MODEL.SEM_SEG_HEAD.NAME='PanopticDeepLabSemSegHead'.*COPSSemSegHead"):
        meta_model("coco", "MODEL.SEM_SEG_HEAD.NAME", "PanopticDeepLabSemSegHead")


def test_the_affinity_branch_is_built_by_name():
    from cmt_cops_d2.modeling.cops.heads import COPS_AFFINITY_HEAD_REGISTRY, COPSAffinityHead

    @COPS_AFFINITY_HEAD_REGISTRY.register()
    class WiderAffinityHead(COPSAffinityHead):
        pass

    try:
        model = meta_model("coco", "MODEL.COPS.AFFINITY_HEAD.NAME", "WiderAffinityHead",
                           "MODEL.COPS.AFFINITY_HEAD.HEAD_CHANNELS", "128")
        assert type(model.affinity_head) is WiderAffinityHead
        assert model.affinity_head.head[1].out_channels == 128
    finally:
        COPS_AFFINITY_HEAD_REGISTRY._obj_map.pop("WiderAffinityHead")
    with pytest.raises(KeyError, match="NoSuchHead"):
        meta_model("coco", "MODEL.COPS.AFFINITY_HEAD.NAME", "NoSuchHead")


def test_predictor_init_is_xavier_as_public_or_normal():
    """The last 1x1 conv of every edge predictor: Detectron2's c2_xavier_fill by default (public code:
    uniform in +-sqrt(3 / fan_in), zero bias), N(0, 0.001) with PREDICTOR_INIT normal."""
    def build(*opts):
        cfg = setup_cfg(argparse.Namespace(config_file=os.path.join(CONFIG_DIR, "cityscapes", "cops_r50_full.yaml"),
                                           opts=["MODEL.DEVICE", "cpu", *opts]))
        torch.manual_seed(0)
        return COPS(cfg).affinity_head.predictors

    for p in build():
        w, fan_in = p.predictor.weight, p.predictor.weight.shape[1]
        bound = (3 / fan_in) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and w.std() > 0.4 * bound
        assert not p.predictor.bias.any()
    for p in build("MODEL.COPS.AFFINITY_HEAD.PREDICTOR_INIT", "normal"):
        assert 0.0007 < p.predictor.weight.std() < 0.0013 and not p.predictor.bias.any()
    with pytest.raises(ValueError, match="MODEL.COPS.AFFINITY_HEAD.PREDICTOR_INIT='kaiming'"):
        build("MODEL.COPS.AFFINITY_HEAD.PREDICTOR_INIT", "kaiming")
