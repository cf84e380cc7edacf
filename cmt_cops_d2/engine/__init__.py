from .launch import launch
from .optimizer import build_optimizer, optimizer_param_groups
from .trainer import (
    Trainer,
    check_cfg,
    create_ddp_model,
    default_setup_plugin,
    load_weights,
    setup_cfg,
    weights_error_context,
)

__all__ = ["launch", "build_optimizer", "optimizer_param_groups", "Trainer", "check_cfg",
           "create_ddp_model", "default_setup_plugin", "setup_cfg", "weights_error_context",
           "load_weights"]
