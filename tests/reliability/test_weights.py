"""Weights that do not fit: --eval-only without weights, checkpoints of another model (evaluation and
training), the partial loads that must keep working, and --resume with a broken last checkpoint.

Checkpoints are made here from tiny models (CMT-DeepLab, COPS) of the synthetic configs."""
import argparse
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from cmt_cops_d2.checkpoint.fit import FitPolicy
from cmt_cops_d2.engine import Trainer, load_weights, setup_cfg
from tests.conftest import load_script

from ..conftest import CONFIG_DIR
from ..engine.test_train_loop import TINY_OPTS, tiny_cfg

ROOT = os.path.dirname(CONFIG_DIR)
SYN = os.path.join(CONFIG_DIR, "synthetic")
DATA = ["DATASETS.TRAIN", "('tiny_synthetic_train',)", "DATASETS.TEST", "('tiny_synthetic_val',)",
        "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2"]
MODELS = {
    "cmt": ("cmt_tiny.yaml", DATA + ["INPUT.IMAGE_SIZE", "[64, 64]", "MODEL.CMT.NUM_CLUSTERS", "16"]),
    "cmt_5_classes": ("cmt_tiny.yaml", ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu",
                                        "MODEL.CMT.NUM_CLUSTERS", "16", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"]),
    "cops": ("cops_tiny_pretrain.yaml", DATA + ["INPUT.CROP.ENABLED", "False", "INPUT.MIN_SIZE_TRAIN", "(64,)"]),
    "cops_full": ("cops_tiny_full.yaml", DATA + ["INPUT.CROP.ENABLED", "False", "INPUT.MIN_SIZE_TRAIN", "(64,)"]),
}


def _cfg(name, *opts):
    file, base = MODELS[name]
    return setup_cfg(argparse.Namespace(config_file=os.path.join(SYN, file), opts=base + list(opts)))


def _train_net():
    module = load_script("tools/train_net.py")
    return module


@pytest.fixture(scope="module")
def files(tiny_synthetic, tmp_path_factory):
    """Checkpoint files by name: whole tiny models, and backbone-only files as the DeepLab2 converter and
    Detectron2's ImageNet R-52.pkl lay them out."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    models = {name: build_model(_cfg(name)) for name in ("cmt", "cmt_5_classes", "cops")}
    out = {}
    for name, model in models.items():
        DetectionCheckpointer(model, save_dir=str(d)).save(name)
        out[name] = str(d / f"{name}.pth")

    def backbone(model):
        return {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}

    for name, model in (("cmt", models["cmt"]), ("cops", models["cops"])):
        zoo = {"model": backbone(model), "__author__": "DeepLab2, converted", "matching_heuristics": True,
               "config": {"MODEL.AXIAL_RESNET.BN_EPS": 0.001}}
        out[f"{name}_backbone_marked"] = str(d / f"{name}_backbone_marked.pth")
        torch.save(zoo, out[f"{name}_backbone_marked"])
        del zoo["config"]
        out[f"{name}_backbone_bare"] = str(d / f"{name}_backbone_bare.pth")
        torch.save(zoo, out[f"{name}_backbone_bare"])
    # R-52.pkl layout: numpy arrays without the "backbone." prefix, an ImageNet classifier besides
    r52 = {k[len("backbone."):]: v.numpy() for k, v in backbone(models["cops"]).items()
           if not k.endswith("num_batches_tracked")}
    r52.update({"linear.weight": torch.zeros(1000, 8).numpy(), "linear.bias": torch.zeros(1000).numpy()})
    out["r52_like.pkl"] = str(d / "r52_like.pkl")
    with open(out["r52_like.pkl"], "wb") as f:
        pickle.dump({"model": r52, "__author__": "torchvision", "matching_heuristics": True}, f)
    return out


def _load(files, target, file, *opts):
    cfg = _cfg(target, *opts)
    torch.manual_seed(1)
    model = build_model(cfg)
    load_weights(DetectionCheckpointer(model), files[file], resume=False, policy=FitPolicy.from_config(cfg))
    return model


# (model, file, config overrides, None = loads | regex of the error)
FIT_CASES = [
    ("cmt", "cmt", [], None),
    ("cmt", "cmt_5_classes", [], None),                   # fine-tune: class predictors of another shape
    ("cmt", "cmt_backbone_marked", [], None),             # the DeepLab2 converter's backbone-only file
    ("cmt", "cmt_backbone_bare", ["MODEL.WEIGHTS_PARTIAL", "True"], None),
    ("cops", "r52_like.pkl", ["MODEL.WEIGHTS_PARTIAL", "True"], None),   # the COPS configs' ImageNet init
    ("cops_full", "cops", [], None),                      # COPS full stage from the pretraining checkpoint
    ("cmt", "cops", [], r"only \d+ of its \d+ tensors load \([\d.]+%; MODEL.WEIGHTS_MIN_LOADED is 0.9\)"),
    ("cmt", "cops", ["MODEL.WEIGHTS_PARTIAL", "True"], r"only \d+ of its \d+ tensors load"),
    ("cops", "cmt", [], r"tensors of the model are not in the file"),
    ("cmt", "cmt_backbone_bare", [], r"\d+ tensors of the model are not in the file"),
    ("cops", "r52_like.pkl", [], r"\d+ tensors of the model are not in the file"),
    ("cmt", "cops_backbone_marked", [], r"it is marked backbone-only .* so all must load"),
    ("cmt", "cmt_5_classes", ["MODEL.WEIGHTS_MIN_LOADED", "1.0"], r"shape mismatch \(4\): "
     r"sem_seg_head.predictor.class_head.weight \(6, 64, 1, 1\) in the file, \(8, 64, 1, 1\) in the model"),
]


@pytest.mark.parametrize("target,file,opts,error", FIT_CASES,
                         ids=[f"{c[1]}_into_{c[0]}{'_' + '_'.join(c[2][::2]) if c[2] else ''}" for c in FIT_CASES])
def test_weights_must_fit_the_model_unless_the_load_is_partial(files, target, file, opts, error):
    if error is None:
        model = _load(files, target, file, *opts)
        state = torch.load(files[file], weights_only=False) if file.endswith(".pth") else None
        if state is not None:  # the file's tensors of the model's shapes are in the model
            ours = model.state_dict()
            fitting = [k for k, v in state["model"].items() if k in ours and ours[k].shape == v.shape]
            assert fitting and all(torch.equal(ours[k], state["model"][k]) for k in fitting)
        return
    path = files[file]
    with pytest.raises(RuntimeError, match=rf"could not load MODEL.WEIGHTS='{path}': WeightsFitError: "
                                           rf"checkpoint '{path}' does not fit") as e:
        _load(files, target, file, *opts)
    assert re.search(error, str(e.value)), str(e.value)
    assert "MODEL.WEIGHTS_PARTIAL True" in str(e.value)


def test_foreign_weights_stop_evaluation_and_training_naming_the_file_and_first_mismatches(files, tmp_path):
    train_net = _train_net()
    opts = MODELS["cmt"][1] + ["MODEL.WEIGHTS", files["cops"], "SOLVER.MAX_ITER", "1"]
    for flags in (["--eval-only"], []):
        args = train_net.default_argument_parser().parse_args(
            ["--config-file", os.path.join(SYN, "cmt_tiny.yaml"), *flags, *opts,
             "OUTPUT_DIR", str(tmp_path / ("eval" if flags else "train"))])
        with pytest.raises(RuntimeError, match=r"does not fit CMTDeepLab") as e:
            train_net.main(args)
        message = str(e.value)
        assert files["cops"] in message
        assert re.search(r"tensors of the model are not in the file; only \d+ of its \d+ tensors load", message)
        assert re.search(r"missing in the file \(\d+\): backbone\.res4\.", message)
        assert re.search(r"unexpected \(not in the model\) \(\d+\): affinity_head\.", message)
        assert re.search(r"shape mismatch \(\d+\): backbone\.res2\.0\.conv1\.weight", message)


def test_the_demo_refuses_foreign_weights(files, tmp_path):
    demo = load_script("demo/demo.py")
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (40, 32)).save(image)
    with pytest.raises(RuntimeError, match=rf"could not load MODEL.WEIGHTS='{files['cops']}': WeightsFitError: "
                                           r"checkpoint .* does not fit CMTDeepLab"):
        demo.main(["--config-file", os.path.join(SYN, "cmt_tiny.yaml"), "--input", str(image), "--output",
                   str(tmp_path / "out"), "--opts", *MODELS["cmt"][1], "MODEL.WEIGHTS", files["cops"]])
    assert not (tmp_path / "out").exists()


def test_eval_only_without_weights_exits_non_zero_naming_model_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file",
         os.path.join(SYN, "cmt_tiny.yaml"), "--eval-only", "OUTPUT_DIR", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert ("ValueError: --eval-only with an empty MODEL.WEIGHTS would evaluate an untrained model; give the "
            "weights to evaluate, e.g. `MODEL.WEIGHTS output/run/model_final.pth`") in proc.stderr


def test_paper_configs_starting_from_a_backbone_mark_the_load_partial():
    def cfg(path):
        return setup_cfg(argparse.Namespace(config_file=os.path.join(CONFIG_DIR, path),
                                            opts=["MODEL.DEVICE", "cpu"]))

    for path in ("coco/cops_r50_pretrain.yaml", "cityscapes/cops_r50_pretrain.yaml"):
        c = cfg(path)
        assert c.MODEL.WEIGHTS == "detectron2://DeepLab/R-52.pkl" and c.MODEL.WEIGHTS_PARTIAL
    for path in ("coco/cops_r50_full.yaml", "cityscapes/cops_r50_full.yaml", "coco/cmt_r50.yaml",
                 "coco/max_deeplab_s.yaml", "cityscapes/cmt_r50.yaml"):
        # full stage: the same network; CMT: the converted file marks itself backbone-only
        assert not cfg(path).MODEL.WEIGHTS_PARTIAL


def _broken_resume(out, how):
    """An output folder holding a checkpoint and a ``last_checkpoint`` broken in one way."""
    os.makedirs(out)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(out))
    DetectionCheckpointer(model, save_dir=str(out)).save("model_0000001")
    ckpt, last = os.path.join(out, "model_0000001.pth"), os.path.join(out, "last_checkpoint")
    if how == "truncated":
        data = open(ckpt, "rb").read()
        open(ckpt, "wb").write(data[: len(data) // 2])
        return (rf"could not resume from '{ckpt}' \(named in {last}\): RuntimeError: .*\n"
                rf"Write the name of an intact checkpoint of that folder into {last}, or delete {last}")
    if how == "empty_last_checkpoint":
        open(last, "w").close()
        return (rf"cannot resume: {last} is empty; it should hold the file name of the checkpoint to resume "
                rf"from; write the name of a checkpoint of {out} into it \(there: model_0000001.pth\)")
    os.remove(ckpt)
    return (rf"cannot resume: {last} names 'model_0000001.pth', but {ckpt} does not exist; write the name "
            rf"of a checkpoint of {out} into it \(there: none\), or delete it")


RESUME_CASES = ["truncated", "empty_last_checkpoint", "deleted_checkpoint"]


@pytest.mark.parametrize("how", RESUME_CASES)
@pytest.mark.parametrize("flags", [["--resume"], ["--resume", "--eval-only"]], ids=["train", "eval_only"])
def test_resume_errors_name_the_checkpoint_and_last_checkpoint(tiny_synthetic, tmp_path, how, flags):
    out = tmp_path / "out"
    expected = _broken_resume(out, how)
    train_net = _train_net()
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", os.path.join(SYN, "panoptic_deeplab_tiny.yaml"), *flags, *TINY_OPTS,
         "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)])
    with pytest.raises(RuntimeError, match=expected) as e:
        train_net.main(args)
    assert "MODEL.WEIGHTS=''" not in str(e.value)


def test_resume_needs_a_full_fit_even_with_weights_partial(tiny_synthetic, tmp_path):
    out = tmp_path / "out"
    os.makedirs(out)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(out))
    state = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": state}, out / "model_0000001.pth")
    (out / "last_checkpoint").write_text("model_0000001.pth")
    trainer = Trainer(tiny_cfg(out, "MODEL.WEIGHTS_PARTIAL", "True", "SOLVER.MAX_ITER", "2"))
    with pytest.raises(RuntimeError, match=rf"could not resume from '{out}/model_0000001.pth' .*"
                                           r"tensors of the model are not in the file"):
        trainer.resume_or_load(resume=True)


def test_a_deeplab2_converter_output_loads_into_cmt_deeplab_without_any_key(tiny_synthetic, tmp_path, capsys):
    cli = load_script("tools/convert_deeplab2_checkpoint.py")
    widths = ["MODEL.AXIAL_RESNET.DEPTHS", "[3, 4, 6, 3]", "MODEL.AXIAL_RESNET.STEM_WIDTH", "4",
              "MODEL.AXIAL_RESNET.BASE_WIDTH", "4"]
    output = str(tmp_path / "maxs_relu.pth")
    cli.main([os.path.join(ROOT, "tests", "data", "deeplab2", "maxs_relu.tar.gz"), output,
              "--config-file", os.path.join(SYN, "cmt_tiny.yaml"), *widths])
    capsys.readouterr()
    model = _load({"converted": output}, "cmt", "converted", *widths)
    weights = torch.load(output, weights_only=True)["model"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    # the same file into a model of other widths: marked backbone-only, so every tensor must load
    with pytest.raises(RuntimeError, match=r"it is marked backbone-only .* so all must load"):
        _load({"converted": output}, "cmt", "converted")
