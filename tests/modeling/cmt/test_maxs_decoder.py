"""MaX-DeepLab-S's layout (Table 2c's 61.9M baseline): stage 5 at stride 16 with a dual-path
transformer layer after each axial block, one extra dual-path block."""
import os

import pytest
import torch
from detectron2.modeling import build_model

from cmt_cops_d2.modeling.backbone.axial_resnet import AxialResNet

from ...conftest import CONFIG_DIR
from ..norms import randomize_batch_norms
from .test_meta_arch import SWITCHES, inference_parameters, meta_model, tiny_cfg

MAXS = os.path.join(CONFIG_DIR, "coco", "max_deeplab_s.yaml")
TINY_MAXS = ["MODEL.CMT.TRANSFORMER_DECODER_NAME", "MaXSTransformerDecoder", "MODEL.CMT.STAGE_BLOCKS",
             "[2, 1]", "MODEL.AXIAL_RESNET.OUT_FEATURES", "['res2', 'res3', 'res4']"]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_breakdown_is_deeplab2s_max_deeplab_s():
    """Every part has the count of the same layer in DeepLab2's ``MaXDeepLabS`` with the COCO head
    (measured on its Keras layers; 61,900,200 without the training-only semantic branch); ours adds
    the assignment projections K~p, Q~c of eq. (6) to each of the four transformer layers."""
    model = meta_model(MAXS)
    assert "res5" not in model.backbone.output_shape()
    assert count(model.backbone) == 14_275_232                     # stem .. res4
    head = model.sem_seg_head
    t = head.transformer_decoder
    assign = 2 * (256 * 128 + 128)
    # stage 5 (the first block's shortcut projects res4's 1024 channels to 2048) and the extra block
    assert [count(b.axial) for b in t.stage5] == [9_724_512, 8_671_840, 8_671_840]
    assert [count(b.axial) for b in t.extra] == [8_671_840]
    assert [count(b.cmt) for b in list(t.stage5) + list(t.extra)] == [2_503_712 + assign] * 4
    pd = head.pixel_decoder                                       # starts from 2048 channels at stride 16
    assert [count(pd.fuse8), count(pd.block8), count(pd.fuse4), count(pd.block4)] == \
        [1_049_600, 280_064, 131_584, 70_400]
    assert inference_parameters(model) == 61_900_200 + 4 * assign
    assert abs(inference_parameters(model) / 1e6 - 61.9) / 61.9 < 0.01


def test_table2c_rows_on_max_s():
    """Clustering update: 61.9M like the baseline (Table 2c, within 1%). Location: each of the four
    layers gets the same location parts as a 2048-wide layer of the six-block decoder."""
    base = inference_parameters(meta_model(MAXS))
    clustering = meta_model(MAXS, "MODEL.CMT.USE_CLUSTER_UPDATE", "True", "MODEL.CMT.USE_ASSIGNMENT_RESIDUAL",
                            "True", "MODEL.CMT.USE_PIXEL_UPDATE", "True", "MODEL.CMT.INSDIS_TYPE", "pixel")
    assert abs(inference_parameters(clustering) / 1e6 - 61.9) / 61.9 < 0.01
    location = inference_parameters(meta_model(MAXS, "MODEL.CMT.USE_REFERENCE_MASK", "True",
                                               "MODEL.CMT.USE_COORD_CONV", "True")) - base
    six_block = os.path.join(CONFIG_DIR, "coco", "cmt_r50.yaml")
    off = [x for s in SWITCHES for x in ("MODEL.CMT." + s, "False")]
    on = off[:-4] + ["MODEL.CMT.USE_REFERENCE_MASK", "True", "MODEL.CMT.USE_COORD_CONV", "True"]
    per_2048_layer = [count(a.cmt) - count(b.cmt) for a, b in zip(
        meta_model(six_block, *on).sem_seg_head.transformer_decoder.stage5,
        meta_model(six_block, *off).sem_seg_head.transformer_decoder.stage5)]
    assert len(set(per_2048_layer[1:])) == 1
    # the first layer also projects the initial reference embedding from the centers (eq. 9)
    assert location == per_2048_layer[0] + 3 * per_2048_layer[1]
    print(f"MaX-S + location: {(base + location) / 1e6:.2f}M (Table 2c: 65.5M), parts {location / 1e6:.2f}M")


def test_stage5_at_initialisation_is_the_backbones_dilated_res5(tiny_synthetic):
    """The transformer layers' output norms start at zero, so before training MaX-S's stage 5 computes
    exactly the Axial-ResNet's res5 at output stride 16 (RES5_DILATION 2) with the same weights."""
    torch.manual_seed(0)
    cfg = tiny_cfg(*TINY_MAXS, "MODEL.CMT.STAGE_BLOCKS", "[2, 0]")
    model = build_model(cfg).double().eval()
    c = cfg.MODEL.AXIAL_RESNET
    reference = AxialResNet(depths=c.DEPTHS, stem_width=c.STEM_WIDTH, base_width=c.BASE_WIDTH,
                            num_heads=c.NUM_HEADS, norm="BN", activation=c.ACTIVATION, res5_dilation=2,
                            out_features=("res4", "res5")).double().eval()
    randomize_batch_norms(reference, shift_scale=0.1)
    t = model.sem_seg_head.transformer_decoder
    for i, block in enumerate(t.stage5):
        block.axial.load_state_dict(reference.res5[i].state_dict())
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        features = reference(x)
        out = t({"res4": features["res4"]})
    assert out["pixels"].shape == features["res5"].shape == (1, 256, 4, 6)
    torch.testing.assert_close(out["pixels"], features["res5"], rtol=1e-10, atol=1e-10)
    # and the transformer layers are not idle: their clustering results depend on the pixels
    assert len(out["layers"]) == 2 and out["layers"][1]["logits"].std() > 0


def test_a_training_step_and_inference_with_the_max_s_layout(tiny_synthetic):
    from detectron2.data import DatasetCatalog

    from cmt_cops_d2.data.mappers import build_train_mapper

    torch.manual_seed(0)
    cfg = tiny_cfg(*TINY_MAXS)
    mapper = build_train_mapper(cfg)
    batch = [mapper(d) for d in DatasetCatalog.get("tiny_synthetic_train")[:2]]
    model = build_model(cfg).train()
    losses = model(batch)
    assert "loss_pq_class_2" in losses and "loss_pq_class_3" not in losses   # three CMT layers
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 50, 70), dtype=torch.uint8)}])
    assert out[0]["panoptic_seg"][0].shape == (50, 70)


def test_the_backbone_must_stop_at_res4():
    with pytest.raises(ValueError, match=r"builds stage 5 itself.*OUT_FEATURES"):
        build_model(tiny_cfg("MODEL.CMT.TRANSFORMER_DECODER_NAME", "MaXSTransformerDecoder",
                             "MODEL.CMT.STAGE_BLOCKS", "[2, 1]"))
    with pytest.raises(ValueError, match=r"needs backbone features \['res2', 'res3', 'res4', 'res5'\]"):
        build_model(tiny_cfg("MODEL.AXIAL_RESNET.OUT_FEATURES", "['res2', 'res3', 'res4']"))
