"""Checkpoints of the COPS authors' model (github:aabbas90/COPS, meta-architecture ``PanopticAffinity``)
-> state dict of this project's :class:`~cmt_cops_d2.modeling.cops.meta_arch.COPS`.

The authors' released models are Detectron2 checkpoints (``torch.save`` of a dict with ``"model"``,
their ``PanopticAffinity`` state dict, and possibly ``"iteration"``, ``"optimizer"``, ``"scheduler"``).
Both networks are the same layer for layer (``docs/cops_public_differences.md``); only the names and
the layout of the cost affines differ. The mapping, from their name to ours:

=============================================================  ==============================================
theirs                                                          ours
=============================================================  ==============================================
``backbone.*``                                                  ``backbone.*``
``sem_seg_head.{decoder,head,predictor}.*``                     ``sem_seg_head.{decoder,head,predictor}.*``
``AFF_EMBED_head.decoder.*``                                    ``affinity_head.decoder.*``
``AFF_EMBED_head.affinity_head.{0,1}.*``                        ``affinity_head.head.{0,1}.*``
``AFF_EMBED_head.classifiers.{i}.{0,1}.*``                      ``affinity_head.predictors.{i}.convs.{0,1}.*``
``AFF_EMBED_head.classifiers.{i}.2.{weight,bias}``              ``affinity_head.predictors.{i}.predictor.*``
``amwc_layer.seg_cost_weights.0`` / ``.1`` (shape ``(1,)``)     ``costs.w_s`` / ``costs.b_s`` (shape ``()``)
``amwc_layer.edge_costs_weights.{2i}`` / ``.{2i+1}`` (``(1,)``) ``costs.w_d[i]`` / ``costs.b_d[i]`` (``(D,)``)
=============================================================  ==============================================

Batch-norm entries (``weight``, ``bias``, ``running_mean``, ``running_var`` and, when present,
``num_batches_tracked``) keep their names under these prefixes. The classifier index ``i`` is the
index of the distance in ``MODEL.COPS.EDGE_DISTANCES``, as in the authors' ``EDGE_DISTANCES``; the
distances themselves are not in the weights (:func:`cops_checkpoint_config` reads what is).

Semantics that make the copy exact (checked against the authors' code in ``tests/checkpoint``):

* Their classifiers see, for even ``d > 1``, the differences of the vertical and horizontal edges
  *centred* at a slot and write the logits there; this project's ``EDGE_ALIGNMENT center`` computes
  the same and moves the logits to its anchor slots (``heads.centered_to_anchor_slots``). Same
  weights, same numbers at every edge.
* Edge costs: theirs ``(-a_i) * |edge_costs_weights[2i]| + edge_costs_weights[2i+1]``, ours
  ``|w_d[i]| * (-a_i) + b_d[i]`` with ``MODEL.COPS.PER_DISTANCE_EDGE_AFFINE True``; the stored scale is
  copied with its sign (both sides take the absolute value).
* Node costs: theirs ``(-s) * seg_cost_weights[0] + seg_cost_weights[1]``, a *signed* scale; ours
  ``|w_s| * (-s) + b_s`` unless ``MODEL.COPS.SIGNED_NODE_COST_SCALE True``. The two agree whenever the
  stored scale is positive; for a negative one the conversion is refused unless
  ``signed_node_cost_scale=True`` (and the model is built with that key).
* Their fine-tuned checkpoints hold ``FrozenBatchNorm2d`` entries (their ``MODEL.FREEZE_BN``), which
  have no ``num_batches_tracked``; those counters are then filled with 0 (they only matter for a
  batch norm with ``momentum=None``). The result is a plain dict without the checkpoint's
  ``_metadata``, so no batch-norm version conversion runs when it is loaded.

Deliberately skipped, each with its reason (:func:`skipped_cops_tensors`):
``amwc_layer.training_per_class_areas`` (a K-vector ``nn.Parameter`` their code never reads) and the
``pixel_mean`` / ``pixel_std`` buffers (ours are config values, ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``,
not saved in the state dict; :func:`cops_checkpoint_config` reports the stored values). Every other
tensor must map to exactly one tensor of ours, and with ``model_state`` given, every tensor of ours
must be covered with the same shape; otherwise :class:`COPSCheckpointError` names the tensors.
"""
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "COPSCheckpointError",
    "convert_cops_state_dict",
    "cops_checkpoint_config",
    "skipped_cops_tensors",
    "unit_distance_classifiers",
    "map_cops_name",
    "load_cops_checkpoint",
    "PUBLIC_EDGE_DISTANCES",
]

# The authors' yamls: Cityscapes five distances, COCO four (the paper's text lists one more each).
PUBLIC_EDGE_DISTANCES = {5: [1, 4, 16, 32, 64], 4: [1, 4, 16, 32]}

_SKIPPED = {
    "amwc_layer.training_per_class_areas": "never read by the authors' code (a K-vector of per-class "
                                           "area thresholds stored as a parameter); no counterpart",
    "pixel_mean": "input normalisation: MODEL.PIXEL_MEAN in this project (not a state-dict entry)",
    "pixel_std": "input normalisation: MODEL.PIXEL_STD in this project (not a state-dict entry)",
}

_RULES = [
    (re.compile(r"^backbone\.(?P<rest>.+)$"), "backbone.{rest}"),
    (re.compile(r"^sem_seg_head\.(?P<rest>(?:decoder|head|predictor)\..+)$"), "sem_seg_head.{rest}"),
    (re.compile(r"^AFF_EMBED_head\.decoder\.(?P<rest>.+)$"), "affinity_head.decoder.{rest}"),
    (re.compile(r"^AFF_EMBED_head\.affinity_head\.(?P<j>[01])\.(?P<rest>.+)$"), "affinity_head.head.{j}.{rest}"),
    (re.compile(r"^AFF_EMBED_head\.classifiers\.(?P<i>\d+)\.(?P<j>[01])\.(?P<rest>.+)$"),
     "affinity_head.predictors.{i}.convs.{j}.{rest}"),
    (re.compile(r"^AFF_EMBED_head\.classifiers\.(?P<i>\d+)\.2\.(?P<rest>weight|bias)$"),
     "affinity_head.predictors.{i}.predictor.{rest}"),
]
_SEG_COST = re.compile(r"^amwc_layer\.seg_cost_weights\.(?P<k>[01])$")
_EDGE_COST = re.compile(r"^amwc_layer\.edge_costs_weights\.(?P<k>\d+)$")
_CLASSIFIER = re.compile(r"^AFF_EMBED_head\.classifiers\.(?P<i>\d+)\.")
_COUNTER = "num_batches_tracked"


class COPSCheckpointError(ValueError):
    """A COPS checkpoint that cannot be converted; the message names the tensors or the file."""


def map_cops_name(name: str) -> Optional[Tuple[str, Optional[int]]]:
    """Our name for their tensor ``name``: ``(our name, None)``, or ``(our name, i)`` for entry ``i``
    of a per-distance vector (the edge-cost affines); None if no rule matches (skipped tensors
    included)."""
    for pattern, target in _RULES:
        m = pattern.match(name)
        if m:
            return target.format(**m.groupdict()), None
    m = _SEG_COST.match(name)
    if m:
        return ("costs.w_s", "costs.b_s")[int(m.group("k"))], None
    m = _EDGE_COST.match(name)
    if m:
        k = int(m.group("k"))
        return ("costs.w_d", "costs.b_d")[k % 2], k // 2
    return None


def skipped_cops_tensors(their_state_dict) -> Dict[str, str]:
    """``{name: reason}`` for the tensors of the authors' state dict that are deliberately not
    converted."""
    return {k: _SKIPPED[k] for k in their_state_dict if k in _SKIPPED}


def _num_classifiers(names) -> int:
    idx = {int(m.group("i")) for m in map(_CLASSIFIER.match, names) if m}
    if idx and idx != set(range(len(idx))):
        raise COPSCheckpointError(f"the checkpoint's edge classifiers are numbered {sorted(idx)}, expected "
                                  f"0..{len(idx) - 1} (AFF_EMBED_head.classifiers.<i>)")
    return len(idx)


def _shape_str(t) -> str:
    return str(tuple(t.shape))


def _join(items: List[str], limit: int = 20) -> str:
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n  " + "\n  ".join(items[:limit]) + more


def convert_cops_state_dict(their_state_dict: Mapping[str, torch.Tensor],
                            model_state: Optional[Mapping[str, torch.Tensor]] = None, *,
                            signed_node_cost_scale: bool = False) -> Dict[str, torch.Tensor]:
    """The authors' ``PanopticAffinity`` state dict -> this project's ``COPS`` state dict.

    Args:
        their_state_dict: ``checkpoint["model"]`` of an authors' checkpoint (name -> tensor).
        model_state: the state dict (or name -> tensor of the right shape, e.g. from a model built on
            the meta device) of the ``COPS`` model the weights must fit. With it, every tensor of
            ours must be covered with the same shape (the batch-norm counters are filled with 0 when
            the checkpoint has none), and the result follows its key order and dtypes. Without it,
            only the mapping itself is checked.
        signed_node_cost_scale: the target model uses the stored node-cost scale with its sign
            (``MODEL.COPS.SIGNED_NODE_COST_SCALE True``). Without it a negative
            ``amwc_layer.seg_cost_weights.0`` is refused (ours would use its absolute value).

    Returns:
        ``{our name: tensor}``: new tensors (no storage shared with the input).

    Raises:
        COPSCheckpointError: naming every tensor with no rule, a duplicate or incomplete per-distance
            affine, a shape mismatch, a tensor of ours that nothing covers, or one of theirs without
            a counterpart in ``model_state``.
    """
    errors: List[str] = []
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    source: Dict[str, str] = {}
    vectors: Dict[str, Dict[int, Tuple[str, torch.Tensor]]] = {"costs.w_d": {}, "costs.b_d": {}}
    skipped = skipped_cops_tensors(their_state_dict)
    unmapped = []
    for name, value in their_state_dict.items():
        if name in skipped:
            continue
        if not isinstance(value, torch.Tensor):
            errors.append(f"{name}: not a tensor ({type(value).__name__})")
            continue
        mapped = map_cops_name(name)
        if mapped is None:
            unmapped.append(name)
            continue
        target, index = mapped
        if index is not None:
            if value.numel() != 1:
                errors.append(f"{name}: shape {_shape_str(value)}, expected one value (shape (1,))")
            else:
                vectors[target][index] = (name, value.detach().reshape(()))
            continue
        if target in source:
            errors.append(f"{name} and {source[target]} both map to {target}")
            continue
        if target in ("costs.w_s", "costs.b_s"):
            if value.numel() != 1:
                errors.append(f"{name}: shape {_shape_str(value)}, expected one value (shape (1,))")
                continue
            value = value.reshape(())
        source[target] = name
        out[target] = value.detach().clone()
    if unmapped:
        errors.append("no counterpart in this project's COPS (not a tensor of the authors' "
                      "PanopticAffinity?):" + _join(unmapped))

    num_d = _num_classifiers(their_state_dict.keys())
    for target, entries in vectors.items():
        stored = "amwc_layer.edge_costs_weights"
        if not entries:
            if num_d:
                errors.append(f"{target}: the checkpoint has {num_d} edge classifiers but no {stored}.* entries")
            continue
        if sorted(entries) != list(range(len(entries))) or len(entries) != num_d:
            errors.append(f"{target}: {stored}.* give entries {sorted(entries)} for {num_d} edge classifiers "
                          f"(expected {2 * num_d} scalars {stored}.0..{2 * num_d - 1})")
            continue
        out[target] = torch.stack([entries[i][1] for i in range(len(entries))]).clone()
        source[target] = f"{stored}.{{{','.join(e[0].rsplit('.', 1)[1] for _, e in sorted(entries.items()))}}}"

    if "costs.w_s" in out and not signed_node_cost_scale and float(out["costs.w_s"]) < 0:
        errors.append(f"amwc_layer.seg_cost_weights.0 = {float(out['costs.w_s']):.6g} < 0: the authors' node "
                      "costs use this scale with its sign, (-s) * w + b, while this project's default takes "
                      "|w_s|; build the model with MODEL.COPS.SIGNED_NODE_COST_SCALE True and pass "
                      "signed_node_cost_scale=True")

    if model_state is not None:
        has_counters = any(k.endswith(_COUNTER) for k in their_state_dict)
        extra = [f"{source[k]} -> {k}" for k in out if k not in model_state]
        if extra:
            errors.append("not in the target model (e.g. more edge classifiers than MODEL.COPS.EDGE_DISTANCES, "
                          "or another architecture):" + _join(extra))
        for k, v in model_state.items():
            if k in out:
                if k in ("costs.w_d", "costs.b_d") and v.dim() == 0 and out[k].numel() > 1:
                    errors.append(f"{source[k]} -> {k}: the checkpoint has one edge-cost affine per distance "
                                  f"({out[k].numel()}), the model one shared scalar; build it with "
                                  "MODEL.COPS.PER_DISTANCE_EDGE_AFFINE True")
                elif k in ("costs.w_d", "costs.b_d") and v.dim() == 0:
                    out[k] = out[k].reshape(())   # one distance, one shared affine: the same thing
                elif tuple(out[k].shape) != tuple(v.shape):
                    errors.append(f"{source[k]} -> {k}: shape {_shape_str(out[k])} in the checkpoint, "
                                  f"{_shape_str(v)} in the model")
            elif k.endswith(_COUNTER) and not has_counters:
                out[k] = torch.zeros((), dtype=torch.long)
            else:
                errors.append(f"{k}: not covered by any tensor of the checkpoint")
    if errors:
        raise COPSCheckpointError("cannot convert the COPS checkpoint:\n- " + "\n- ".join(errors))
    if model_state is None:
        return dict(out)
    return {k: out[k].to(dtype=model_state[k].dtype) for k in model_state}


def _shape0(sd, name) -> Optional[int]:
    t = sd.get(name)
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() else None


def unit_distance_classifiers(their_state_dict: Mapping[str, torch.Tensor]) -> List[bool]:
    """One flag per edge classifier of the checkpoint (their order = the order of the distances): True
    for a distance-1 classifier. It sees ``F`` itself (one group), a ``d > 1`` one the two difference
    maps (two groups), so its first conv has half as many output channels."""
    num_d = _num_classifiers(their_state_dict.keys())
    widths = [_shape0(their_state_dict, f"AFF_EMBED_head.classifiers.{i}.0.weight") for i in range(num_d)]
    if None in widths:
        missing = [i for i, w in enumerate(widths) if w is None]
        raise COPSCheckpointError(f"AFF_EMBED_head.classifiers.{missing[0]}.0.weight: missing (edge classifier "
                                  f"{missing[0]} of {num_d} has no first conv)")
    return [w < max(widths) for w in widths]


def cops_checkpoint_config(their_state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """The project config values that can be read from the authors' weights.

    Returns ``{config key: value}`` with the architecture (number of classes, backbone and decoder
    widths, separable decoders, and the edge distances when the classifiers are those of the authors'
    Cityscapes (5) or COCO (4) configs: the distances themselves are not in the weights, see
    :func:`unit_distance_classifiers`), the cost layout, and the pixel normalisation.
    Keys whose tensors are absent are left out.
    """
    sd = their_state_dict
    cfg: Dict[str, Any] = {}
    k = _shape0(sd, "sem_seg_head.predictor.weight")
    if k is not None:
        cfg["MODEL.SEM_SEG_HEAD.NUM_CLASSES"] = k
    stem = _shape0(sd, "backbone.stem.conv3.weight")
    if stem is not None:
        cfg["MODEL.RESNETS.STEM_OUT_CHANNELS"] = stem
    res2 = _shape0(sd, "backbone.res2.0.conv3.weight")
    if res2 is not None:
        cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"] = res2
    width = _shape0(sd, "backbone.res2.0.conv1.weight")
    if width is not None:
        cfg["MODEL.RESNETS.WIDTH_PER_GROUP"] = width   # NUM_GROUPS 1 (ResNet, not ResNeXt)
    blocks = {int(m.group(1)) for m in (re.match(r"^backbone\.res4\.(\d+)\.", n) for n in sd) if m}
    depth = {6: 50, 23: 101, 36: 152}.get(len(blocks))
    if depth:
        cfg["MODEL.RESNETS.DEPTH"] = depth
    for theirs, ours in (("sem_seg_head", "MODEL.SEM_SEG_HEAD"), ("AFF_EMBED_head", "MODEL.COPS.AFFINITY_HEAD")):
        dec = f"{theirs}.decoder"
        proj = [_shape0(sd, f"{dec}.{f}.project_conv.weight") for f in ("res2", "res3")]
        if None not in proj:
            cfg[f"{ours}.PROJECT_CHANNELS"] = proj
        aspp = _shape0(sd, f"{dec}.res5.project_conv.project.weight")
        if aspp is not None:
            cfg[f"{ours}.ASPP_CHANNELS"] = aspp
        fuse = (_shape0(sd, f"{dec}.res2.fuse_conv.pointwise.weight")
                or _shape0(sd, f"{dec}.res2.fuse_conv.1.weight"))
        if fuse is not None:
            cfg[f"{ours}.CONVS_DIM"] = fuse
        head = "head" if theirs == "sem_seg_head" else "affinity_head"
        hc = _shape0(sd, f"{theirs}.{head}.1.weight")
        if hc is not None:
            cfg[f"{ours}.HEAD_CHANNELS"] = hc
    if any(n.startswith("sem_seg_head.decoder.") for n in sd):
        cfg["MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV"] = (
            "sem_seg_head.decoder.res5.project_conv.convs.1.depthwise.weight" in sd)
    unit = unit_distance_classifiers(sd)
    public = PUBLIC_EDGE_DISTANCES.get(len(unit))
    if public and unit == [d == 1 for d in public]:
        cfg["MODEL.COPS.EDGE_DISTANCES"] = list(public)
    if any(_EDGE_COST.match(n) for n in sd):
        cfg["MODEL.COPS.PER_DISTANCE_EDGE_AFFINE"] = True
    if unit:
        cfg["MODEL.COPS.AFFINITY_HEAD.EDGE_ALIGNMENT"] = "center"
    w_s = sd.get("amwc_layer.seg_cost_weights.0")
    if isinstance(w_s, torch.Tensor) and w_s.numel() == 1 and float(w_s) < 0:
        cfg["MODEL.COPS.SIGNED_NODE_COST_SCALE"] = True
    for buf, key in (("pixel_mean", "MODEL.PIXEL_MEAN"), ("pixel_std", "MODEL.PIXEL_STD")):
        if isinstance(sd.get(buf), torch.Tensor):
            cfg[key] = [round(float(v), 4) for v in sd[buf].reshape(-1)]
    return cfg


def load_cops_checkpoint(path: str, *, allow_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(state dict, other entries)`` of an authors' checkpoint file.

    Loads with ``torch.load(weights_only=True)`` (tensors, containers and plain values only) unless
    ``allow_pickle`` (arbitrary pickled objects: only for files you trust).

    Raises:
        COPSCheckpointError: naming the file, if it is missing, not a PyTorch checkpoint, not a dict,
            or has no ``"model"`` state dict.
    """
    import os
    import pickle
    import zipfile

    if not os.path.isfile(path):
        raise COPSCheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise COPSCheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save archive nor a pickle)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if not allow_pickle and "weights_only" in str(exc):
            raise COPSCheckpointError(
                f"{path}: holds pickled objects other than tensors and plain values; load it with "
                "allow_pickle=True (--allow-pickle) only if you trust the file") from None
        raise COPSCheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError) as exc:
        raise COPSCheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict):
        raise COPSCheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict with \"model\"")
    if "model" not in ckpt:
        keys = ", ".join(map(str, list(ckpt)[:8]))
        raise COPSCheckpointError(f"{path}: no \"model\" entry (keys: {keys}); expected a Detectron2 checkpoint "
                                  "of the authors' PanopticAffinity, {\"model\": state_dict, ...}")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise COPSCheckpointError(f"{path}: \"model\" is not a state dict of tensors")
    return dict(model), {k: v for k, v in ckpt.items() if k != "model"}
