"""COPS full training stage (paper Sec. 4.2 "Full training") on CPU: what is frozen and trained, frozen
batch norms, the PQ-surrogate loss through the AMWC layer, all-void images, config errors, per-stage
learning rates and unchanged inference."""
import argparse
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.layers import ASPP
from detectron2.modeling import build_model
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cmt_cops_d2.data.mappers import build_train_mapper
from cmt_cops_d2.engine import setup_cfg
from cmt_cops_d2.engine.optimizer import build_optimizer
from cmt_cops_d2.modeling.cops.amwc_layer import AMWCSettings
from cmt_cops_d2.modeling.cops.criterion import loss_slots

from ...conftest import CONFIG_DIR

FULL_CONFIG = os.path.join(CONFIG_DIR, "synthetic", "cops_tiny_full.yaml")
TINY_OPTS = [
    "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('tiny_synthetic_train',)", "DATASETS.TEST",
    "('tiny_synthetic_val',)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "100",
    "INPUT.CROP.SIZE", "(64, 64)", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "80",
    "MODEL.COPS.SIZE_DIVISIBILITY", "64", "MODEL.COPS.SOLVER_THREADS", "1", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.WEIGHTS", "",
]
# The default MODEL.COPS.FULL_TRAINABLE, spelled out as module prefixes (independent of fnmatch).
TRAINED_PREFIXES = ("sem_seg_head.head.", "sem_seg_head.predictor.", "affinity_head.head.",
                    "affinity_head.predictors.")
TRAINED_AFFINES = {"costs.w_s", "costs.w_d", "costs.b_d"}


def full_cfg(*opts):
    return setup_cfg(argparse.Namespace(config_file=FULL_CONFIG, opts=TINY_OPTS + list(opts)))


def build(cfg, seed=0, lambdas=(500.0, 2000.0)):
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.criterion.amwc_settings = AMWCSettings(lambdas=lambdas, num_threads=1)  # deterministic backward
    return model


def no_dropout(model):
    """Deterministic forward in training mode: ASPP dropout and cost dropout off (test only)."""
    for m in model.modules():
        if isinstance(m, (ASPP, nn.Dropout)):
            m.eval()
    model.criterion.cost_dropout = 0.0


def bn_param_names(model):
    names = set()
    for mname, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            names |= {f"{mname}.{n}" for n, _ in m.named_parameters()}
    return names


@pytest.fixture(scope="module")
def cfg(tiny_synthetic):
    return full_cfg()


def mapped_batch(cfg, seed=0):
    np.random.seed(seed)  # the mapper's random crop and flip
    mapper = build_train_mapper(cfg)
    return [mapper(d) for d in DatasetCatalog.get("tiny_synthetic_train")[:2]]


@pytest.fixture(scope="module")
def batch(cfg):
    return mapped_batch(cfg)


def void_copy(x):
    """The same image with an all-void ground truth (as an image of only unlabelled / crowd pixels)."""
    y = dict(x)
    y["panoptic"] = torch.full_like(x["panoptic"], -1)
    y["panoptic_classes"] = x["panoptic_classes"][:0]
    y["panoptic_isthing"] = x["panoptic_isthing"][:0]
    y["panoptic_weights"] = torch.zeros_like(x["panoptic_weights"])
    return y


def test_full_stage_trains_only_the_heads_and_affines(cfg, batch):
    model = build(cfg)
    model.train()
    names = [n for n, _ in model.named_parameters()]
    bn = bn_param_names(model)
    expected = {n for n in names if n.startswith(TRAINED_PREFIXES) and n not in bn} | TRAINED_AFFINES
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    # the paper's frozen parts: backbone, both DeepLabV3+ decoders, every batch norm, b_s (dead)
    assert not any(n.startswith(("backbone.", "sem_seg_head.decoder.", "affinity_head.decoder."))
                   for n in trainable)
    assert not trainable & bn and "costs.b_s" not in trainable
    assert any(n.startswith("sem_seg_head.head.") for n in trainable)

    model.zero_grad()
    losses = model(batch)
    assert set(losses) == {"loss_pq"}
    loss = losses["loss_pq"]
    assert torch.isfinite(loss) and 0 < loss.item() <= cfg.MODEL.COPS.PQ_LOSS_WEIGHT
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, f"{n} received a zero gradient"
        else:
            assert p.grad is None, n


def test_pretrain_stage_is_unchanged(tiny_synthetic, batch):
    model = build(full_cfg("MODEL.COPS.STAGE", "pretrain"))
    model.train()
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["costs.b_d", "costs.b_s", "costs.w_d", "costs.w_s"]
    assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))
    assert model.param_lr_multipliers() == {}
    assert "loss_sem_seg" in model(batch)


def test_batch_norms_stay_frozen(cfg, batch):
    model = build(cfg)
    model.eval()
    model.train()
    assert model.training
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(m.training for m in bns)
    aspp = [m for m in model.modules() if isinstance(m, ASPP)]
    assert aspp and all(m.training for m in aspp)  # only BN is pinned (ASPP dropout stays active)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(batch)["loss_pq"].backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, params_before[n])}
    assert changed and changed <= {n for n, p in model.named_parameters() if p.requires_grad}


def test_per_stage_learning_rates(cfg):
    model = build(cfg)
    base = cfg.SOLVER.BASE_LR
    lr_of = {}
    for group in build_optimizer(cfg, model).param_groups:
        for p in group["params"]:
            lr_of[p] = group["lr"]
    params = dict(model.named_parameters())
    expect = {
        "sem_seg_head.head.0.weight": base / 40,
        "sem_seg_head.predictor.weight": base / 20,
        "costs.w_s": base,
        "affinity_head.head.0.weight": base / 60,
        "affinity_head.predictors.1.convs.0.weight": base / 40,
        "affinity_head.predictors.1.predictor.bias": base / 20,
        "costs.w_d": base,
        "costs.b_d": base,
    }
    for name, lr in expect.items():
        assert lr_of[params[name]] == pytest.approx(lr), name
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("opts,match", [
    (("MODEL.COPS.STAGE", "finetune"), "MODEL.COPS.STAGE"),
    (("MODEL.COPS.FULL_TRAINABLE", "['sem_seg_head.predictor', 'no_such_module']",
      "MODEL.COPS.FULL_LR_MULTIPLIERS", "[1.0, 1.0]"), "MODEL.COPS.FULL_TRAINABLE"),
    (("MODEL.COPS.FULL_LR_MULTIPLIERS", "[1.0]"), "MODEL.COPS.FULL_LR_MULTIPLIERS"),
    (("MODEL.COPS.LAMBDA_MIN", "10.0", "MODEL.COPS.LAMBDA_MAX", "1.0"), "MODEL.COPS.LAMBDA_MIN"),
    (("MODEL.COPS.COST_DROPOUT", "1.0"), "MODEL.COPS.COST_DROPOUT"),
    (("MODEL.COPS.BACKWARD_SOLVER", "lpmp"), "MODEL.COPS.+BACKWARD_SOLVER.+'warm' or 'cold'"),
    (("MODEL.COPS.BACKWARD_WARM_ROUNDS", "0"), "MODEL.COPS.+BACKWARD_WARM_ROUNDS.+positive integer"),
    (("MODEL.COPS.MIN_THING_CLUSTER_SIZE", "-1"), "MODEL.COPS.+MIN_THING_CLUSTER_SIZE.+non-negative integer"),
])
def test_bad_config_raises_naming_the_key(tiny_synthetic, opts, match):
    with pytest.raises(ValueError, match=match if ".+" in match else match.replace(".", r"\.")):
        build_model(full_cfg(*opts))


def test_backward_solver_settings_come_from_the_config(tiny_synthetic):
    default = build_model(full_cfg()).criterion.amwc_settings
    assert (default.backward_solver, default.warm_rounds) == ("warm", 1)
    cold = build_model(full_cfg("MODEL.COPS.BACKWARD_SOLVER", "cold", "MODEL.COPS.BACKWARD_WARM_ROUNDS", "2"))
    assert (cold.criterion.amwc_settings.backward_solver, cold.criterion.amwc_settings.warm_rounds) == ("cold", 2)
    # small thing clusters get no slot in the loss as at inference (public code: 3 grid pixels in both)
    assert default.min_thing_size == 3
    assert build_model(full_cfg("MODEL.COPS.MIN_THING_CLUSTER_SIZE", "5")).criterion.amwc_settings.min_thing_size == 5


def test_all_void_images(cfg, batch):
    model = build(cfg)
    model.train()
    no_dropout(model)
    # every image void: exactly zero loss, yet every trainable parameter gets a (zero) gradient
    loss = model([void_copy(x) for x in batch])["loss_pq"]
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)
    # a void image next to a normal one is skipped: same loss and gradient as the normal one alone
    # (logits computed image by image, so that batching does not change them by float rounding)
    predict = model.predict_logits
    model.predict_logits = lambda images: tuple(
        torch.cat(t) for t in zip(*[predict(images[i:i + 1]) for i in range(len(images))]))
    model.zero_grad()
    single = model(batch[:1])["loss_pq"]
    single.backward()
    ref = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    mixed = model([batch[0], void_copy(batch[1])])["loss_pq"]
    mixed.backward()
    torch.testing.assert_close(mixed, single)
    for g, r in zip([p.grad for p in model.parameters() if p.requires_grad], ref):
        torch.testing.assert_close(g, r)


def test_loss_slots():
    # slots: stuff 0 (pred), thing 1 x2 (pred), then extras for GT classes [0, 1, 1, 1, 2], padding
    seg_cls = np.array([0, 1, 1, 1, 1, 1, 2, -1])
    is_pred = np.array([True, True, True, False, False, False, False, False])
    gt = np.array([0, 1, 1, 1, 2])
    # class 1: 3 GT, 2 predictions -> one extra; class 2: one extra; stuff 0 has its prediction
    assert loss_slots(seg_cls, is_pred, gt).tolist() == [0, 1, 2, 3, 6]
    assert loss_slots(seg_cls, is_pred, np.array([1])).tolist() == [0, 1, 2]
    assert loss_slots(seg_cls[:0], is_pred[:0], gt[:0]).tolist() == []


PRETRAIN_STEPS, FULL_STEPS = 60, 10  # passed for all of seeds 0-31 (40 pretraining steps: 9 of 12)


def test_training_lowers_the_surrogate_on_a_fixed_batch(cfg, seed=0):
    """After a short pretraining on one batch, a few full-stage Adam steps (no dropout, fixed lambdas)
    lower the PQ surrogate on it (with the gradient's sign flipped it climbs to the maximum instead)."""
    batch = mapped_batch(cfg, seed)
    pre = build(full_cfg("MODEL.COPS.STAGE", "pretrain"), seed=seed)
    pre.train()
    opt = torch.optim.Adam([p for p in pre.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(PRETRAIN_STEPS):
        opt.zero_grad()
        sum(pre(batch).values()).backward()
        opt.step()
    model = build(cfg, seed=seed, lambdas=(1000.0, 3000.0))
    model.load_state_dict(pre.state_dict())
    model.train()
    no_dropout(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    history = []
    for _ in range(FULL_STEPS):
        opt.zero_grad()
        loss = model(batch)["loss_pq"]
        loss.backward()
        opt.step()
        history.append(loss.item())
    with torch.no_grad():
        history.append(model(batch)["loss_pq"].item())
    assert min(history[-3:]) < history[0] - 0.05 * cfg.MODEL.COPS.PQ_LOSS_WEIGHT, history


def test_inference_does_not_depend_on_the_stage(tiny_synthetic, cfg):
    full = build(cfg)
    pre = build(full_cfg("MODEL.COPS.STAGE", "pretrain"))
    pre.load_state_dict(full.state_dict())
    full.eval()
    pre.eval()
    x = {"image": torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)}
    with torch.no_grad():
        a, b = full([x])[0], pre([x])[0]
    assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
    assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
    torch.testing.assert_close(a["sem_seg"], b["sem_seg"])


def test_node_cost_scale_enters_by_its_absolute_value():
    """A step of w_s through 0 must not turn the node costs around (most likely class = cheapest)."""
    from cmt_cops_d2.modeling.cops.heads import COPSCosts

    costs = COPSCosts(2)
    logits = torch.randn(1, 5, 3, 4)
    with torch.no_grad():
        costs.w_s.fill_(-0.5)
        costs.w_d.fill_(-2.0)
    node, edge = costs(logits, torch.randn(1, 2, 2, 3, 4))
    assert torch.equal(node.argmin(1), logits.argmax(1))
    assert torch.allclose(node, 0.5 * -logits)


def test_edge_costs_have_one_affine_per_distance():
    """|w_d[k]| * (-a[:, k]) + b_d[k] for distance k (public code); one shared pair with 0 distances."""
    from cmt_cops_d2.modeling.cops.heads import COPSCosts

    costs = COPSCosts(3)
    aff = torch.randn(2, 3, 2, 4, 5)
    with torch.no_grad():
        costs.w_d.copy_(torch.tensor([1.5, -0.5, 2.0]))
        costs.b_d.copy_(torch.tensor([0.1, 0.2, -0.3]))
    edge = costs.edge_costs(aff)
    for k, (w, b) in enumerate([(1.5, 0.1), (0.5, 0.2), (2.0, -0.3)]):
        torch.testing.assert_close(edge[:, k], w * -aff[:, k] + b)
    with pytest.raises(ValueError, match="3 edge-cost affines for 2 distances"):
        costs.edge_costs(aff[:, :2])
    shared = COPSCosts(0)
    assert shared.w_d.shape == () and torch.equal(shared.edge_costs(aff), -aff)
