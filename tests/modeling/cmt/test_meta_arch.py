"""CMTDeepLab end to end on CPU: parameter counts (Table 1), a training step, inference format, sizes."""
import argparse
import os

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOPanopticEvaluator, inference_on_dataset
from detectron2.modeling import build_model

from cmt_cops_d2.data.mappers import build_train_mapper
from cmt_cops_d2.engine import Trainer, setup_cfg

from ...conftest import CONFIG_DIR
from ..norms import randomize_batch_norms

TINY = os.path.join(CONFIG_DIR, "synthetic", "cmt_tiny.yaml")
SWITCHES = ["USE_CLUSTER_UPDATE", "USE_ASSIGNMENT_RESIDUAL", "USE_PIXEL_UPDATE", "USE_REFERENCE_MASK",
            "USE_COORD_CONV"]


def cfg_of(path, *opts):
    return setup_cfg(argparse.Namespace(config_file=path, opts=["MODEL.DEVICE", "cpu", *opts]))


def tiny_cfg(*opts):
    return cfg_of(TINY, "DATASETS.TRAIN", "('tiny_synthetic_train',)", "DATASETS.TEST",
                  "('tiny_synthetic_val',)", "INPUT.IMAGE_SIZE", "[64, 64]", "MODEL.CMT.NUM_CLUSTERS", "16",
                  *opts)


def inference_parameters(model) -> int:
    """Parameters used at inference: the auxiliary semantic head (training only) is left out, as the
    paper counts (DeepLab2's MaX-S head gives exactly Table 2c's 61.9M that way)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".semantic_head." not in n)


def meta_model(path, *opts):
    cfg = cfg_of(path, *opts)
    with torch.device("meta"):
        from cmt_cops_d2.modeling.cmt.meta_arch import CMTDeepLab

        return CMTDeepLab(cfg)


SWITCHES_OFF = [x for s in SWITCHES for x in ("MODEL.CMT." + s, "False")]


@pytest.mark.parametrize("name,paper_millions", [("cmt_r50", 94.9), ("cmt_r104", 135.2),
                                                 ("cmt_r104_rfn", 270.3)])
def test_parameter_count_matches_table1(name, paper_millions):
    model = meta_model(os.path.join(CONFIG_DIR, "coco", f"{name}.yaml"))
    millions = inference_parameters(model) / 1e6
    print(f"{name}: {millions:.2f}M parameters (paper {paper_millions}M)")
    assert abs(millions - paper_millions) / paper_millions < 0.01


def test_parameter_breakdown_is_deeplab2s_stronger_decoder_plus_the_cmt_parts():
    """Table 2c: the six-block decoder without the CMT parts is 91.0M, the location parts 3.9M.
    Every part of the switches-off model has DeepLab2's count for the same layer (measured on
    DeepLab2's Keras layers: axial blocks, dual-path transformer layers, ResizedFuse, decoder blocks,
    MaX-DeepLab heads); ours adds the assignment projections K~p, Q~c of eq. (6) per layer."""
    path = os.path.join(CONFIG_DIR, "coco", "cmt_r50.yaml")
    base = meta_model(path, *SWITCHES_OFF)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    head = base.sem_seg_head
    t = head.transformer_decoder
    assign = 2 * (256 * 128 + 128)                                 # K~p, Q~c with biases
    assert count(base.backbone) == 41_343_424
    assert [count(b.axial) for b in t.stage5] == [8_671_840] * 3
    assert [count(b.cmt) for b in t.stage5] == [2_503_712 + assign] * 3
    assert [count(b.axial) for b in t.stage4] == [2_238_816] * 3
    assert [count(b.cmt) for b in t.stage4] == [1_977_376 + assign] * 3
    assert count(t.fuse4) == 2_099_200 and count(t.centers) == 32_768
    pd = head.pixel_decoder
    assert [count(pd.fuse8), count(pd.block8), count(pd.fuse4), count(pd.block4)] == \
        [525_312, 280_064, 131_584, 70_400]
    pr = head.predictor
    assert count(pr.class_feature) + count(pr.mask_feature) == 132_096
    assert count(pr) - count(pr.class_feature) - count(pr.mask_feature) - count(pr.semantic_head) == 173_576
    deeplab2 = 90_963_656                                          # DeepLab2's six-block decoder model
    assert inference_parameters(base) == deeplab2 + 6 * assign
    assert abs(inference_parameters(base) / 1e6 - 91.0) / 91.0 < 0.01
    # The CMT parts: location (reference-mask MLP and embedding, coord-convs) and the clustering
    # update (its own norm and projection, minus MaX's pixel queries that eq. 8 replaces).
    full = meta_model(path)
    no_location = meta_model(path, "MODEL.CMT.USE_REFERENCE_MASK", "False", "MODEL.CMT.USE_COORD_CONV",
                             "False")
    location = inference_parameters(full) - inference_parameters(no_location)
    print(f"location parts {location / 1e6:.3f}M (Table 2c: 3.9M)")
    assert abs(location / 1e6 - 3.9) / 3.9 < 0.05
    cluster_parts = inference_parameters(no_location) - inference_parameters(
        meta_model(path, "MODEL.CMT.USE_REFERENCE_MASK", "False", "MODEL.CMT.USE_COORD_CONV", "False",
                   "MODEL.CMT.USE_CLUSTER_UPDATE", "False", "MODEL.CMT.USE_PIXEL_UPDATE", "False"))
    # + cluster norm and projection, - pixel queries and their similarity norm (2 x 8 heads)
    assert cluster_parts == 6 * ((256 * 256 + 2 * 256) + 2 * 256 - (256 * 128 + 2 * 128) - 2 * 8)


def test_inference_without_autograd_equals_the_unfolded_network(tiny_synthetic):
    # eval() switches the inference shortcuts on; without autograd batch norms are folded into convs
    # and the axial attention, activations and residual adds work in place. The result must be the
    # network's ordinary eval-mode output.
    torch.manual_seed(0)
    model = randomize_batch_norms(build_model(tiny_cfg()).double().eval(), shift_scale=0.1)
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)

    def network():
        return model.network(x)

    with torch.no_grad():
        fast = network()
    reference = network()
    assert reference["pred_masks"].requires_grad
    for key in ("pred_logits", "pred_masks", "stride4_features"):
        torch.testing.assert_close(fast[key], reference[key].detach(), rtol=1e-9, atol=1e-9)
    for a, b in zip(fast["aux_outputs"], reference["aux_outputs"]):
        torch.testing.assert_close(a["pred_masks"], b["pred_masks"].detach(), rtol=1e-9, atol=1e-9)


def test_eval_switches_the_inference_shortcuts_on_and_train_off(tiny_synthetic):
    from cmt_cops_d2.modeling.layers import InferenceShortcuts

    model = build_model(tiny_cfg())
    layers = [m for m in model.modules() if isinstance(m, InferenceShortcuts)]
    assert len(layers) > 50 and not any(m.inference_shortcuts for m in layers)
    model.eval()
    assert all(m.inference_shortcuts for m in layers)
    model.train()
    assert not any(m.inference_shortcuts for m in layers)


@pytest.fixture(scope="module")
def batch(tiny_synthetic):
    cfg = tiny_cfg()
    mapper = build_train_mapper(cfg)
    return [mapper(d) for d in DatasetCatalog.get("tiny_synthetic_train")[:2]]


def test_training_step_gives_every_parameter_a_gradient(batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    losses = model(batch)
    assert {"loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_insdis", "loss_sem_seg",
            "loss_pq_class_0", "loss_mask_approx_0", "loss_mask_approx_3"} <= set(losses)
    # each layer's reference masks are supervised once, with its own clustering result
    assert "loss_mask_approx" not in losses and "loss_mask_approx_4" not in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_off_still_trains(batch, switch):
    opts = ["MODEL.CMT." + switch, "False"]
    if switch == "USE_REFERENCE_MASK":
        opts += ["MODEL.CMT.USE_COORD_CONV", "False"]
    model = build_model(tiny_cfg(*opts)).train()
    losses = model(batch)
    sum(losses.values()).backward()
    assert ("loss_mask_approx_0" in losses) == (switch != "USE_REFERENCE_MASK")
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_all_switches_off_is_the_maxdeeplab_baseline(batch):
    opts = [x for s in SWITCHES for x in ("MODEL.CMT." + s, "False")]
    model = build_model(tiny_cfg(*opts)).train()
    losses = model(batch)
    assert "loss_mask_approx_0" not in losses
    t = model.sem_seg_head.transformer_decoder
    for block in list(t.stage5) + list(t.stage4):
        layer = block.cmt
        assert not (layer.use_cluster_update or layer.use_assignment_residual or layer.use_pixel_update
                    or layer.use_reference_mask or layer.use_coord_conv)


def test_inference_any_size_including_smaller_than_the_stride():
    model = build_model(tiny_cfg()).eval()
    inputs = [{"image": torch.randint(0, 255, (3, 37, 53), dtype=torch.uint8), "height": 74, "width": 106},
              {"image": torch.randint(0, 255, (3, 20, 30), dtype=torch.uint8)}]
    with torch.no_grad():
        out = model(inputs)
    assert out[0]["panoptic_seg"][0].shape == (74, 106) and out[0]["sem_seg"].shape == (7, 74, 106)
    assert out[1]["panoptic_seg"][0].shape == (20, 30)


def test_a_mixed_size_batch_gives_each_image_its_single_image_result(tiny_synthetic):
    """Zero padding to the batch's largest image changes a small image's attention and coordinates;
    images that pad to different sizes therefore run separately."""
    torch.manual_seed(0)
    cfg = tiny_cfg("MODEL.CMT.TEST.THING_THRESHOLD", "0.0", "MODEL.CMT.TEST.STUFF_THRESHOLD", "0.0",
                   "MODEL.CMT.TEST.THING_AREA_LIMIT", "0", "MODEL.CMT.TEST.STUFF_AREA_LIMIT", "0",
                   "MODEL.CMT.TEST.PIXEL_THRESHOLD", "0.0")
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    small = {"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8, generator=g)}
    large = {"image": torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8, generator=g)}
    same = {"image": torch.randint(0, 255, (3, 60, 90), dtype=torch.uint8, generator=g)}  # pads to 64 x 96
    with torch.no_grad():
        together = model([small, large, same])
        alone = [model([x])[0] for x in (small, large, same)]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"], rtol=1e-5, atol=1e-6)
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
    assert len(alone[0]["panoptic_seg"][1]) > 0


def test_mapper_padding_becomes_the_pixel_mean(tiny_synthetic):
    model = build_model(tiny_cfg())
    image = torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8)
    pad = torch.zeros(8, 8, dtype=torch.bool)
    pad[5:] = True
    pad[:, 6:] = True
    out = model.normalized_images([{"image": image, "padding_mask": pad}])[0]
    expected = (image.float() - model.pixel_mean) / model.pixel_std
    assert (out[:, pad] == 0).all()
    torch.testing.assert_close(out[:, ~pad], expected[:, ~pad])


def test_output_is_accepted_by_coco_panoptic_evaluator(tiny_synthetic, tmp_path):
    cfg = tiny_cfg("MODEL.CMT.TEST.THING_THRESHOLD", "0.0", "MODEL.CMT.TEST.STUFF_THRESHOLD", "0.0")
    model = build_model(cfg).eval()
    loader = Trainer.build_test_loader(cfg, "tiny_synthetic_val")
    res = inference_on_dataset(model, loader, COCOPanopticEvaluator("tiny_synthetic_val", str(tmp_path)))
    assert 0.0 <= res["panoptic_seg"]["PQ"] <= 100.0


def test_rfn_stacks_two_models_connected_at_stride_4_and_averages_outputs(batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.CMT.RFN", "True")).train()
    single = sum(p.numel() for p in build_model(tiny_cfg()).parameters())
    connect = sum(p.numel() for p in model.sem_seg_head.connect.parameters())
    assert sum(p.numel() for p in model.parameters()) == 2 * single + connect
    losses = model(batch)
    # 4 CMT layers per copy, plus the first copy's final output: 9 auxiliary outputs
    assert "loss_pq_class_8" in losses and "loss_pq_class_9" not in losses
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # the backbone LR multiplier reaches the second copy's backbone
    from cmt_cops_d2.engine.optimizer import optimizer_param_groups

    groups = optimizer_param_groups(model, 1.0, 0.0, 0.0, 0.0, backbone_multiplier=0.1)
    lr = {p: g["lr"] for g in groups for p in g["params"]}
    rfn = model.sem_seg_head
    assert lr[rfn.backbone2.stem.conv1.weight] == 0.1
    assert lr[rfn.head2.predictor.class_head.weight] == 1.0
    # outputs are the average of the two copies
    model.eval()
    with torch.no_grad():
        images = torch.randn(1, 3, 64, 64)
        feats = model.backbone(images)
        out = rfn(feats, images)
        out1 = rfn.head1(feats)
        from cmt_cops_d2.modeling.cmt.rfn import run_backbone_with_injection

        link = rfn.connect(out1["stride4_features"])
        out2 = rfn.head2(run_backbone_with_injection(rfn.backbone2, images, link))
    assert torch.allclose(out["pred_masks"], (out1["pred_masks"] + out2["pred_masks"]) / 2, atol=1e-6)
