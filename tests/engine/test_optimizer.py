"""Optimizer construction: per-parameter LR and weight decay, optimizer choice, gradient clipping."""
import pytest
import torch
from detectron2.config import get_cfg

from cmt_cops_d2.config import add_cmt_cops_d2_config
from cmt_cops_d2.engine.optimizer import build_optimizer, optimizer_param_groups


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.query = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 2)
        self.norm = torch.nn.LayerNorm(2)
        self.centers = torch.nn.Parameter(torch.zeros(3, 4))
        self.no_weight_decay_params = ("centers",)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _lookup(groups):
    out = {}
    for g in groups:
        for p in g["params"]:
            out[p] = (g["lr"], g["weight_decay"])
    return out


def test_param_groups_lr_and_weight_decay():
    m = Toy()
    table = _lookup(optimizer_param_groups(m, base_lr=1.0, weight_decay=0.5, weight_decay_norm=0.1,
                                           weight_decay_embed=0.2, backbone_multiplier=0.1))
    assert table[m.backbone[0].weight] == (0.1, 0.5)
    assert table[m.backbone[1].weight] == (0.1, 0.1)   # backbone norm: both rules
    assert table[m.query.weight] == (1.0, 0.2)
    assert table[m.centers] == (1.0, 0.2)
    assert table[m.head.weight] == (1.0, 0.5)
    assert table[m.norm.bias] == (1.0, 0.1)
    assert m.frozen.weight not in table
    assert len(table) == sum(p.requires_grad for p in m.parameters())


def _cfg(**solver):
    cfg = get_cfg()
    add_cmt_cops_d2_config(cfg)
    for k, v in solver.items():
        node, key = cfg.SOLVER, k
        if "." in k:
            sub, key = k.split(".")
            node = cfg.SOLVER[sub]
        node[key] = v
    return cfg


@pytest.mark.parametrize("name,cls", [("SGD", torch.optim.SGD), ("ADAM", torch.optim.Adam),
                                      ("ADAMW", torch.optim.AdamW)])
def test_optimizer_choice(name, cls):
    opt = build_optimizer(_cfg(OPTIMIZER=name), Toy())
    assert isinstance(opt, cls)


def test_unknown_optimizer_names_the_key():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='RMSPROP'"):
        build_optimizer(_cfg(OPTIMIZER="RMSPROP"), Toy())


def test_full_model_clipping_clips_the_global_norm():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, WEIGHT_DECAY=0.0, BASE_LR=1.0,
               **{"CLIP_GRADIENTS.ENABLED": True, "CLIP_GRADIENTS.CLIP_TYPE": "full_model",
                  "CLIP_GRADIENTS.CLIP_VALUE": 0.5})
    opt = build_optimizer(cfg, m)
    before = [p.detach().clone() for p in m.parameters()]
    m.weight.grad = torch.full_like(m.weight, 3.0)
    m.bias.grad = torch.full_like(m.bias, 4.0)
    total = torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()]).norm()
    opt.step()
    steps = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())])
    # SGD with lr 1: the step is the clipped gradient, whose global norm is the clip value.
    assert steps.norm().item() == pytest.approx(0.5, rel=1e-4)
    assert steps[0].item() == pytest.approx(3.0 * 0.5 / total.item(), rel=1e-4)


def test_bad_clip_type():
    cfg = _cfg(**{"CLIP_GRADIENTS.ENABLED": True, "CLIP_GRADIENTS.CLIP_TYPE": "sometimes"})
    with pytest.raises(ValueError, match="CLIP_TYPE='sometimes'"):
        build_optimizer(cfg, Toy())
