"""DeepLab2 -> Axial-ResNet conversion: checkpoints written by DeepLab2's own TensorFlow code
(tools/fixtures/make_deeplab2_fixture.py), converted and loaded into the project's backbone, reproduce
DeepLab2's endpoints; every variable is accounted for; the CLI writes Detectron2-loadable weights."""
import functools
import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone

from cmt_cops_d2.checkpoint import (
    convert_deeplab2_axial_resnet,
    deeplab2_axial_resnet_config,
    read_tf_checkpoint,
    skipped_deeplab2_variables,
)
from cmt_cops_d2.config import add_axial_resnet_config
from cmt_cops_d2.modeling.backbone import AxialResNet
from cmt_cops_d2.modeling.layers import set_inference_shortcuts
from tests.conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data", "deeplab2")
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# float32 round-off is ~1e-6 of the output scale; a batch-norm epsilon of 1e-5 instead of DeepLab2's
# 1e-3 is already ~1e-3 (checked below), a wrong table or term order ~1e-1.
RELATIVE_TOLERANCE = 2e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=None)
def _fixture(name):
    with open(os.path.join(DATA, f"{name}.json")) as f:
        meta = json.load(f)
    io = dict(np.load(os.path.join(DATA, f"{name}_io.npz")))
    return read_tf_checkpoint(os.path.join(DATA, f"{name}.tar.gz")), meta, io


def _cfg(meta, **overrides):
    cfg = get_cfg()
    add_axial_resnet_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_axial_resnet_backbone"
    for key, value in meta["project_config"].items():
        cfg.merge_from_list([key, str(value)])
    c = cfg.MODEL.AXIAL_RESNET
    c.NORM, c.OUT_FEATURES = "BN", ["stem", "res2", "res3", "res4", "res5"]
    for key, value in overrides.items():
        c[key] = value
    return cfg


def _relative_errors(model, io, res5_key="res5"):
    x = torch.from_numpy(io["input"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(x)
    pairs = {"stem": "res1", "res2": "res2", "res3": "res3", "res4": "res4", "res5": res5_key}
    errors = {}
    for ours, theirs in pairs.items():
        got, ref = out[ours].permute(0, 2, 3, 1).numpy(), io[theirs]
        assert got.shape == ref.shape, ours
        errors[ours] = float(np.abs(got - ref).max() / np.abs(ref).max())
    return errors


@pytest.mark.parametrize("name,os16", [("maxs_gelu", False), ("maxs_gelu", True), ("maxs_relu", False)])
def test_converted_backbone_reproduces_deeplab2(name, os16):
    tf_vars, meta, io = _fixture(name)
    cfg = _cfg(meta, RES5_DILATION=2 if os16 else 1)
    model = build_backbone(cfg)
    state = convert_deeplab2_axial_resnet(tf_vars, model_state=model.state_dict(), prefix="")
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    model.eval()
    res5 = "res5_os16" if os16 else "res5"
    errors = _relative_errors(model, io, res5)
    print(f"\n{name} os{16 if os16 else 32}: max |ours - DeepLab2| / max |DeepLab2| = "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < RELATIVE_TOLERANCE, errors
    # The inference shortcuts (batch norms folded, as CMTDeepLab.eval() runs) give the same result.
    set_inference_shortcuts(model, True)
    assert max(_relative_errors(model, io, res5).values()) < RELATIVE_TOLERANCE


def test_fixture_detects_the_batch_norm_epsilon():
    tf_vars, meta, io = _fixture("maxs_relu")
    model = build_backbone(_cfg(meta, BN_EPS=1e-5))
    model.load_state_dict(convert_deeplab2_axial_resnet(tf_vars, prefix=""), strict=False)
    assert max(_relative_errors(model.eval(), io).values()) > 20 * RELATIVE_TOLERANCE


def test_bn_eps_reaches_every_batch_norm_frozen_ones_included():
    kwargs = dict(depths=(1, 1, 2, 2), stem_width=8, base_width=8, norm="BN", max_span=5)

    def norms(model):
        return [m for m in model.modules()
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))]

    assert {m.eps for m in norms(AxialResNet(**kwargs))} == {1e-5}  # the default is unchanged
    model = AxialResNet(**kwargs, bn_eps=1e-3, freeze_at=3)
    assert {m.eps for m in norms(model)} == {1e-3}
    assert any(isinstance(m, FrozenBatchNorm2d) for m in norms(model))


@pytest.mark.parametrize("name", ["maxs_gelu", "maxs_relu"])
def test_architecture_read_from_the_checkpoint(name):
    tf_vars, meta, _ = _fixture(name)
    config = deeplab2_axial_resnet_config(tf_vars)
    expected = {k.split(".")[-1]: v for k, v in meta["project_config"].items()}
    assert {k: config[k] for k in expected if k in config} == {
        k: v for k, v in expected.items() if k in config}
    assert set(expected) - set(config) == {"ACTIVATION", "RES5_DILATION"}
    assert config["ATTENTION_BOTTLENECK_EXPANSION"] == 2 and config["KEY_EXPANSION"] == 1
    assert config["VALUE_EXPANSION"] == 2


def test_training_state_is_skipped_with_reasons():
    tf_vars, _, _ = _fixture("maxs_gelu")
    skipped = skipped_deeplab2_variables(tf_vars)
    slot = "encoder/_stem/_conv1_bn_act/_conv/kernel/.OPTIMIZER_SLOT/optimizer/m" + SUFFIX
    assert skipped[slot].startswith("optimizer slot")
    assert skipped["save_counter" + SUFFIX].startswith("tf.train.Checkpoint's save counter")
    assert skipped["global_step" + SUFFIX] == "training step counter"
    assert skipped["optimizer/iter" + SUFFIX].startswith("optimizer state")
    assert len(skipped) == 9 and all(not k.startswith("encoder/") or "OPTIMIZER_SLOT" in k
                                     for k in skipped)
    state = convert_deeplab2_axial_resnet(tf_vars)
    assert len(state) == len(tf_vars) - 9 and all(k.startswith("backbone.") for k in state)
    assert state["backbone.res4.1.attention.width_axis.qkv.weight"].shape == (64, 32, 1, 1)
    assert state["backbone.res5.0.attention.height_axis.output_norm.running_var"].shape == (128,)


def _model_state(meta):
    with torch.device("meta"):
        return build_backbone(_cfg(meta)).state_dict()


def test_unmapped_variables_are_errors_naming_them():
    tf_vars, meta, _ = _fixture("maxs_relu")
    state = _model_state(meta)
    odd = "backbone/_encoder/_stage4/_block2/_attention/_height_axis/_extra_rpe/embeddings" + SUFFIX
    head = "head/_classifier/kernel" + SUFFIX
    bad = {**tf_vars, odd: np.zeros((509, 4), np.float32), head: np.zeros((128, 10), np.float32)}
    with pytest.raises(ValueError, match="2 checkpoint variables have no counterpart") as e:
        convert_deeplab2_axial_resnet(bad, model_state=state)
    assert odd in str(e.value) and head in str(e.value)
    with pytest.raises(ValueError, match="_extra_rpe"):
        convert_deeplab2_axial_resnet(bad, model_state=state, skip=["^head/"])
    assert len(convert_deeplab2_axial_resnet(bad, model_state=state, skip=["^head/", "_extra_rpe"])) \
        == len(tf_vars) - 1


def test_shape_mismatch_and_missing_or_extra_model_tensors():
    tf_vars, meta, _ = _fixture("maxs_relu")
    state = _model_state(meta)
    kernel = "backbone/_encoder/_stem/_conv2_bn_act/_conv/kernel" + SUFFIX
    wrong = {**tf_vars, kernel: tf_vars[kernel][:, :, :, :3]}
    with pytest.raises(ValueError, match="1 shape mismatches") as e:
        convert_deeplab2_axial_resnet(wrong, model_state=state)
    assert kernel in str(e.value) and "stem.conv2.weight" in str(e.value)
    # Another head count: every attention norm and table is the wrong shape.
    with torch.device("meta"):
        heads8 = build_backbone(_cfg(meta, NUM_HEADS=8)).state_dict()
    with pytest.raises(ValueError, match="_batch_norm_similarity/gamma"):
        convert_deeplab2_axial_resnet(tf_vars, model_state=heads8)

    gamma = "backbone/_encoder/_stage3/_block2/_conv3_bn/_batch_norm/gamma" + SUFFIX
    fewer = {k: v for k, v in tf_vars.items() if k != gamma}
    missing = r"1 model tensors have no checkpoint variable.*\n  res3.1.conv3.norm.weight"
    with pytest.raises(ValueError, match=missing):
        convert_deeplab2_axial_resnet(fewer, model_state=state)
    # A backbone that stops at res4 (MaX-S's layout in configs/coco/max_deeplab_s.yaml).
    with torch.device("meta"):
        to_res4 = AxialResNet(**_backbone_kwargs(meta), out_features=("res2", "res3", "res4"))
    with pytest.raises(ValueError, match="map to keys the model does not have") as e:
        convert_deeplab2_axial_resnet(tf_vars, model_state=to_res4.state_dict())
    assert "_stage5/_block1" in str(e.value) and "res5.0." in str(e.value)
    assert convert_deeplab2_axial_resnet(tf_vars, model_state=to_res4.state_dict(), skip=["/_stage5/"])


def _backbone_kwargs(meta):
    c = {k.split(".")[-1]: v for k, v in meta["project_config"].items()}
    return dict(depths=c["DEPTHS"], stem_width=c["STEM_WIDTH"], base_width=c["BASE_WIDTH"],
                num_heads=c["NUM_HEADS"], activation=c["ACTIVATION"], bn_eps=c["BN_EPS"], norm="BN")


def test_encoder_root_errors():
    tf_vars, _, _ = _fixture("maxs_gelu")
    with pytest.raises(ValueError, match="no DeepLab2 encoder variables"):
        convert_deeplab2_axial_resnet({"save_counter" + SUFFIX: np.int64(1), "x/y" + SUFFIX: np.ones(1)})
    both = {**tf_vars, "backbone/_encoder/_stem/_conv1_bn_act/_conv/kernel" + SUFFIX: np.ones(1)}
    with pytest.raises(ValueError, match="both encoder/ and backbone/_encoder/"):
        convert_deeplab2_axial_resnet(both)


class _WithBackbone(nn.Module):
    """Stands for a meta-architecture: the backbone under ``backbone.`` (as in CMTDeepLab)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_cli_writes_detectron2_loadable_weights(tmp_path, capsys, suffix):
    cli = load_script("tools/convert_deeplab2_checkpoint.py")
    output = str(tmp_path / f"maxs_gelu{suffix}")
    cli.main([os.path.join(DATA, "maxs_gelu.tar.gz"), output, "--activation", "gelu"])
    printed = capsys.readouterr().out
    assert "MODEL.AXIAL_RESNET.BN_EPS 0.001" in printed and "ACTIVATION gelu" in printed
    assert "skipped    2: optimizer slot variable" in printed
    if suffix == ".pth":
        saved = torch.load(output, weights_only=True)  # plain tensors and builtins only
        assert saved["matching_heuristics"] and "DeepLab2" in saved["__author__"]
        assert saved["config"]["MODEL.AXIAL_RESNET.BN_EPS"] == 1e-3
        assert saved["config"]["MODEL.AXIAL_RESNET.ACTIVATION"] == "gelu"
        assert saved["config"]["MODEL.PIXEL_MEAN"] == [127.5] * 3

    tf_vars, meta, io = _fixture("maxs_gelu")
    model = _WithBackbone(AxialResNet(**_backbone_kwargs(meta), out_features=(
        "stem", "res2", "res3", "res4", "res5")))
    DetectionCheckpointer(model).load(output)
    expected = convert_deeplab2_axial_resnet(tf_vars)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert max(_relative_errors(model.backbone.eval(), io).values()) < RELATIVE_TOLERANCE


def test_cli_checks_the_weights_against_a_config(tmp_path, capsys):
    cli = load_script("tools/convert_deeplab2_checkpoint.py")
    config = os.path.join(ROOT, "configs", "synthetic", "cmt_tiny.yaml")  # STEM_WIDTH 16, 4 heads
    archive = os.path.join(DATA, "maxs_relu.tar.gz")
    with pytest.raises(ValueError, match="shape mismatches"):
        cli.main([archive, str(tmp_path / "a.pth"), "--config-file", config])
    output = str(tmp_path / "b.pth")
    cli.main([archive, output, "--config-file", config, "MODEL.AXIAL_RESNET.DEPTHS", "[3, 4, 6, 3]",
              "MODEL.AXIAL_RESNET.STEM_WIDTH", "4", "MODEL.AXIAL_RESNET.BASE_WIDTH", "4",
              "--prefix", "backbone.", "--prefix", "sem_seg_head.backbone2."])
    printed = capsys.readouterr().out
    assert "MODEL.AXIAL_RESNET.BN_EPS 0.001  (your config: 1e-05)" in printed
    keys = torch.load(output, weights_only=True)["model"]
    assert len(keys) == 2 * 491 and "sem_seg_head.backbone2.res5.2.conv3.weight" in keys


def test_cli_places_stage5_in_the_maxs_decoder(tmp_path, capsys):
    """With a MaX-S config (backbone to res4, stage 5 in MaXSTransformerDecoder) the checkpoint's stage 5
    goes to the axial halves of the decoder's dual-path blocks, with DeepLab2's batch-norm epsilon: the
    converted model's stage 5 (its transformer layers' output norms start at zero) reproduces DeepLab2's
    res5 at output stride 16 from DeepLab2's res4."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from cmt_cops_d2.config import add_cmt_cops_d2_config

    cli = load_script("tools/convert_deeplab2_checkpoint.py")
    _, meta, io = _fixture("maxs_gelu")
    opts = ["MODEL.CMT.TRANSFORMER_DECODER_NAME", "MaXSTransformerDecoder", "MODEL.CMT.STAGE_BLOCKS", "[3, 1]",
            "MODEL.AXIAL_RESNET.OUT_FEATURES", "['res2', 'res3', 'res4']", "MODEL.CMT.NUM_HEADS", "8",
            "MODEL.CMT.ACTIVATION", "gelu", "MODEL.AXIAL_RESNET.NORM", "BN", "MODEL.CMT.NORM", "BN"]
    for key, value in meta["project_config"].items():
        if key.split(".")[-1] not in ("RES5_DILATION",):
            opts += [key, str(value)]
    config = os.path.join(ROOT, "configs", "synthetic", "cmt_tiny.yaml")
    output = str(tmp_path / "maxs.pth")
    cli.main([os.path.join(DATA, "maxs_gelu.tar.gz"), output, "--config-file", config] + opts)
    assert "res5 blocks go to the axial halves" in capsys.readouterr().out
    weights = torch.load(output, weights_only=True)["model"]
    assert not any(k.startswith("backbone.res5.") for k in weights)

    cfg = get_cfg()
    add_cmt_cops_d2_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    model = META_ARCH_REGISTRY.get("CMTDeepLab")(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not any(k.startswith("backbone.") or ".stage5." in k and ".axial." in k
                                      for k in missing if not k.endswith("num_batches_tracked"))
    decoder = model.sem_seg_head.transformer_decoder.eval()
    res4 = torch.from_numpy(io["res4"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        x = res4
        for block in decoder.stage5:
            x = block.axial(x)
    ref = io["res5_os16"]
    got = x.permute(0, 2, 3, 1).numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() / np.abs(ref).max() < RELATIVE_TOLERANCE
