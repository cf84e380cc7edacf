"""Optimizer construction: SGD / Adam / AdamW with per-parameter learning rate and weight decay.

* backbone parameters (a module path component starting with ``backbone``, e.g. ``backbone.res2`` or
  the second copy ``decoder.backbone2`` of an RFN) get ``BASE_LR * BACKBONE_MULTIPLIER``;
* a model with a ``param_lr_multipliers()`` method (``{parameter name: factor}``, e.g. the per-stage
  learning rates of the COPS full stage) has those parameters' learning rates multiplied by the factor;
* parameters of normalization layers get ``WEIGHT_DECAY_NORM``, of ``nn.Embedding`` layers (and
  parameters a module lists in ``no_weight_decay_params``) get ``WEIGHT_DECAY_EMBED``;
* ``SOLVER.CLIP_GRADIENTS`` with ``CLIP_TYPE: full_model`` clips the global gradient norm over all
  parameters at every step; ``value`` / ``norm`` use Detectron2's per-parameter clipping.
"""
import itertools
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups

__all__ = ["build_optimizer", "optimizer_param_groups"]

NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)
OPTIMIZERS = {"SGD", "ADAM", "ADAMW"}


def optimizer_param_groups(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    backbone_multiplier: float = 1.0,
) -> List[Dict[str, Any]]:
    """Parameter groups with the learning rate and weight decay of each trainable parameter."""
    params: List[Dict[str, Any]] = []
    memo = set()
    lr_factors = model.param_lr_multipliers() if hasattr(model, "param_lr_multipliers") else {}
    for module_name, module in model.named_modules():
        no_wd = set(getattr(module, "no_weight_decay_params", ()))
        for param_name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in memo:
                continue
            memo.add(value)
            lr, wd = base_lr, weight_decay
            if any(part.startswith("backbone") for part in module_name.split(".")):
                lr = base_lr * backbone_multiplier
            lr = lr * lr_factors.get(f"{module_name}.{param_name}" if module_name else param_name, 1.0)
            if isinstance(module, NORM_TYPES):
                wd = weight_decay_norm
            elif isinstance(module, torch.nn.Embedding) or param_name in no_wd:
                wd = weight_decay_embed
            params.append({"params": [value], "lr": lr, "weight_decay": wd})
    return reduce_param_groups(params)


def _full_model_clipping(optim_cls, clip_norm: float):
    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, clip_norm)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = f"FullModelClipped{optim_cls.__name__}"
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.SOLVER.OPTIMIZER`` for ``model``."""
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in OPTIMIZERS:
        raise ValueError(
            f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not supported; use one of {sorted(OPTIMIZERS)}"
        )
    params = optimizer_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_embed=cfg.SOLVER.WEIGHT_DECAY_EMBED,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
    )
    if not params:
        raise ValueError("the model has no trainable parameter (check MODEL.BACKBONE.FREEZE_AT)")
    if name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM,
                                              "nesterov": cfg.SOLVER.NESTEROV}
    elif name == "ADAM":
        optim_cls, kwargs = torch.optim.Adam, {}
    else:
        optim_cls, kwargs = torch.optim.AdamW, {}
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return _full_model_clipping(optim_cls, clip.CLIP_VALUE)(params, cfg.SOLVER.BASE_LR, **kwargs)
    if clip.ENABLED and clip.CLIP_TYPE not in ("value", "norm"):
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={clip.CLIP_TYPE!r}: use 'full_model', 'value' or 'norm'"
        )
    return maybe_add_gradient_clipping(cfg, optim_cls)(params, cfg.SOLVER.BASE_LR, **kwargs)
