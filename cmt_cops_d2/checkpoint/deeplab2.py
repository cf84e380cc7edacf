"""DeepLab2 Axial-ResNet checkpoints (e.g. the "MaX-S w/ GeLU" and "MaX-S w/ ReLU" ImageNet backbones)
-> state dict of this project's :class:`~cmt_cops_d2.modeling.backbone.AxialResNet`.

DeepLab2 saves TF2 object-based checkpoints. A variable's key is its attribute path from the
checkpoint's root objects, followed by ``/.ATTRIBUTES/VARIABLE_VALUE``. Its trainer, and
kMaX-DeepLab's, put the backbone under the root ``encoder``. Checkpoints from the TF Model Garden
vision trainer have it under ``backbone/_encoder``. DeepLab2 loads both layouts, and so does this
module. A typical key is
``encoder/_stage4/_block2/_attention/_height_axis/qkv_kernel/.ATTRIBUTES/VARIABLE_VALUE``.

The mapping, from the TF name between the root and the suffix to the project key after the
prefix (e.g. ``backbone.``):

* ``_stem/_conv1_bn_act``, ``_conv2_bn_act``, ``_conv3_bn`` -> ``stem.conv1``, ``conv2``, ``conv3``
* ``_stage{s}/_block{b}`` -> ``res{s}.{b-1}`` (s = 2..5, b counted from 1); in a block,
  ``_conv1_bn_act``, ``_conv2_bn_act``, ``_conv3_bn``, ``_shortcut`` -> ``conv1``, ``conv2``,
  ``conv3``, ``shortcut``
* ``<conv>/_conv/kernel`` [kh, kw, in, out] -> ``<conv>.weight`` [out, in, kh, kw] (HWIO -> OIHW)
* ``<conv>/_batch_norm/{gamma, beta, moving_mean, moving_variance}`` ->
  ``<conv>.norm.{weight, bias, running_mean, running_var}`` (the same for the norms below)
* ``<block>/_attention/_{height,width}_axis`` -> ``<block>.attention.{height,width}_axis``, and in
  an axis:

  * ``qkv_kernel`` [in, 2K + V] -> ``qkv.weight`` [2K + V, in, 1, 1] (transposed)
  * ``_batch_norm_qkv/*`` -> ``qkv_norm.*``
  * ``_batch_norm_similarity/*`` [3, 1, h, 1, 1] -> ``similarity_norm.*`` [3h] (flattened:
    term, head)
  * ``_batch_norm_retrieved_output/*`` [2, 1, h, 1, V/h] -> ``output_norm.*`` [2V] (flattened:
    term, head, channel)
  * ``_{query,key,value}_rpe/embeddings`` [509, d] -> ``{query,key,value}_rpe`` [509, d]

Both implementations stack the similarity terms as (content, query-RPE, key-RPE), the retrieved
terms as (content, value-RPE), split q, k, v per head as ``channel = head * depth + d``, and index
the relative tables by ``key - query + 254``. So apart from the transposes above the values are
copied as they are. With them, the project's Axial-ResNet reproduces DeepLab2's endpoints ``res2``..
``res5`` (its ``res1`` is the project's ``stem`` output). This is tested on a checkpoint that
DeepLab2's own code wrote (``tests/checkpoint``).

The model must be built as DeepLab2 built it (:func:`deeplab2_axial_resnet_config` reads the
layout from the checkpoint). Two things cannot be read from the weights:
``MODEL.AXIAL_RESNET.BN_EPS: 0.001`` (DeepLab2's batch-norm epsilon) and
``MODEL.AXIAL_RESNET.ACTIVATION`` ("gelu" for "MaX-S w/ GeLU", "relu" for "MaX-S w/ ReLU").
DeepLab2 also feeds the encoder ``rgb / 127.5 - 1``: ``MODEL.PIXEL_MEAN`` and ``PIXEL_STD`` 127.5,
``INPUT.FORMAT: RGB``.

Variables that are not model weights are left out deliberately, each with its reason
(:func:`skipped_deeplab2_variables`): optimizer slots (``/.OPTIMIZER_SLOT/``), optimizer state
(the ``optimizer`` and ``backbone_optimizer`` roots), ``global_step``, ``save_counter``, the object
graph, and names matching the caller's ``skip`` patterns. Any other variable must map to exactly one
model tensor of the same shape, and every model tensor must be covered (except the BN counters
``num_batches_tracked``, which TensorFlow does not have). Otherwise the conversion fails and names
the variables concerned.
"""
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "convert_deeplab2_axial_resnet",
    "move_res5_into_maxs_decoder",
    "deeplab2_axial_resnet_config",
    "skipped_deeplab2_variables",
    "encoder_root",
    "DEEPLAB2_BN_EPS",
    "ENCODER_ROOTS",
]

DEEPLAB2_BN_EPS = 1e-3
ENCODER_ROOTS = ("encoder/", "backbone/_encoder/")
VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"

_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
       "moving_variance": "running_var"}
_CONV = {"_conv1_bn_act": "conv1", "_conv2_bn_act": "conv2", "_conv3_bn": "conv3",
         "_shortcut": "shortcut"}
_STEM = {"_conv1_bn_act": "conv1", "_conv2_bn_act": "conv2", "_conv3_bn": "conv3"}
_ATTENTION_NORMS = {"_batch_norm_qkv": "qkv_norm", "_batch_norm_similarity": "similarity_norm",
                    "_batch_norm_retrieved_output": "output_norm"}

_STEM_RE = re.compile(r"^_stem/(?P<conv>_conv\d_bn(?:_act)?)/(?P<rest>.+)$")
_BLOCK_RE = re.compile(r"^_stage(?P<stage>[2-5])/_block(?P<block>[1-9]\d*)/(?P<rest>.+)$")
_CONV_RE = re.compile(r"^(?P<conv>_conv\d_bn(?:_act)?|_shortcut)/(?P<rest>.+)$")
_ATTENTION_RE = re.compile(r"^_attention/_(?P<axis>height|width)_axis/(?P<rest>.+)$")
_RPE_RE = re.compile(r"^_(?P<term>query|key|value)_rpe/embeddings$")

# Root objects that hold training state, never model weights.
_TRAINING_ROOTS = {
    "save_counter": "tf.train.Checkpoint's save counter",
    "global_step": "training step counter",
    "optimizer": "optimizer state (iterations, hyper-parameters)",
    "backbone_optimizer": "optimizer state (iterations, hyper-parameters)",
}


def encoder_root(tf_names) -> str:
    """``"encoder/"`` or ``"backbone/_encoder/"``: the root the checkpoint's backbone is under."""
    roots = [r for r in ENCODER_ROOTS if any(n.startswith(r) for n in tf_names)]
    if not roots:
        raise ValueError(
            "no DeepLab2 encoder variables in the checkpoint: expected keys under "
            f"{' or '.join(ENCODER_ROOTS)}, e.g. encoder/_stem/_conv1_bn_act/_conv/kernel"
            f"{VARIABLE_SUFFIX}")
    if len(roots) > 1:
        raise ValueError(f"the checkpoint has variables under both {roots[0]} and {roots[1]}; "
                         "which one is the backbone is ambiguous")
    return roots[0]


def skipped_deeplab2_variables(tf_names, skip: Sequence[str] = ()) -> Dict[str, str]:
    """``{name: reason}`` for the checkpoint variables that are deliberately not converted.

    Args:
        tf_names: checkpoint keys (e.g. the keys of :func:`~.tf_checkpoint.read_tf_checkpoint`).
        skip: extra regular expressions (``re.search``); matching names are skipped too.
    """
    patterns = [re.compile(p) for p in skip]
    result = {}
    for name in tf_names:
        root = name.split("/", 1)[0]
        if name == "_CHECKPOINTABLE_OBJECT_GRAPH":
            result[name] = "object graph of the checkpoint (metadata)"
        elif "/.OPTIMIZER_SLOT/" in name:
            result[name] = "optimizer slot variable (e.g. Adam's moments)"
        elif root in _TRAINING_ROOTS:
            result[name] = _TRAINING_ROOTS[root]
        else:
            for p in patterns:
                if p.search(name):
                    result[name] = f"matches skip pattern {p.pattern!r}"
                    break
    return result


def _bn_key(leaf: str) -> Optional[str]:
    return _BN.get(leaf)


def _map_conv(rest: str) -> Optional[Tuple[str, str]]:
    """``_conv/kernel`` or ``_batch_norm/<stat>`` -> (key suffix, conversion)."""
    if rest == "_conv/kernel":
        return "weight", "hwio"
    if rest.startswith("_batch_norm/") and _bn_key(rest[len("_batch_norm/"):]):
        return "norm." + _bn_key(rest[len("_batch_norm/"):]), "copy"
    return None


def _map_attention(rest: str) -> Optional[Tuple[str, str]]:
    if rest == "qkv_kernel":
        return "qkv.weight", "dense"
    m = _RPE_RE.match(rest)
    if m:
        return f"{m['term']}_rpe", "copy"
    head, _, leaf = rest.partition("/")
    if head in _ATTENTION_NORMS and _bn_key(leaf):
        return f"{_ATTENTION_NORMS[head]}.{_bn_key(leaf)}", "flatten"
    return None


def _map_name(inner: str) -> Optional[Tuple[str, str]]:
    """Encoder-relative TF name (no root, no suffix) -> (project key, conversion), or None."""
    m = _STEM_RE.match(inner)
    if m:
        if m["conv"] not in _STEM:
            return None
        mapped = _map_conv(m["rest"])
        return None if mapped is None else (f"stem.{_STEM[m['conv']]}.{mapped[0]}", mapped[1])
    m = _BLOCK_RE.match(inner)
    if not m:
        return None
    block = f"res{m['stage']}.{int(m['block']) - 1}"
    rest = m["rest"]
    c = _CONV_RE.match(rest)
    if c:
        if c["conv"] not in _CONV:
            return None
        mapped = _map_conv(c["rest"])
        return None if mapped is None else (f"{block}.{_CONV[c['conv']]}.{mapped[0]}", mapped[1])
    a = _ATTENTION_RE.match(rest)
    if a:
        mapped = _map_attention(a["rest"])
        if mapped is None:
            return None
        return f"{block}.attention.{a['axis']}_axis.{mapped[0]}", mapped[1]
    return None


def _convert_value(value: np.ndarray, how: str) -> np.ndarray:
    if how == "hwio":
        if value.ndim != 4:
            raise ValueError(f"expected a 4-D [kh, kw, in, out] kernel, got shape {value.shape}")
        return value.transpose(3, 2, 0, 1)
    if how == "dense":
        if value.ndim != 2:
            raise ValueError(f"expected a 2-D [in, out] kernel, got shape {value.shape}")
        return value.T[:, :, None, None]
    if how == "flatten":
        return value.reshape(-1)
    return value


def _shape(value) -> Tuple[int, ...]:
    return tuple(int(d) for d in (value.shape if hasattr(value, "shape") else value))


def _listing(items: List[str], limit: int = 20) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n  " + shown + more


def convert_deeplab2_axial_resnet(
    tf_vars: Mapping[str, np.ndarray],
    *,
    model_state: Optional[Mapping[str, Any]] = None,
    prefix: str = "backbone.",
    skip: Sequence[str] = (),
) -> Dict[str, torch.Tensor]:
    """Rename and transpose DeepLab2 encoder variables into an :class:`AxialResNet` state dict.

    Args:
        tf_vars: ``{checkpoint key: array}``, e.g. from
            :func:`~cmt_cops_d2.checkpoint.tf_checkpoint.read_tf_checkpoint`.
        model_state: the target backbone's own ``state_dict()`` (keys without ``prefix``), or
            ``{key: shape}``. When given, every converted tensor must exist there with the same
            shape, and every backbone tensor but ``num_batches_tracked`` must be converted.
        prefix: prepended to every key; ``"backbone."`` is where Detectron2 meta-architectures
            (``CMTDeepLab``) keep their backbone. With ``MODEL.CMT.RFN`` the second backbone is
            ``"sem_seg_head.backbone2."``.
        skip: regular expressions of checkpoint keys to leave out on purpose (e.g. a
            classification head, or a stage the target model builds elsewhere).

    Returns:
        ``{prefix + key: tensor}`` (contiguous CPU tensors with the checkpoint's dtype), in the
        model's key order when ``model_state`` is given.

    Raises:
        ValueError: no encoder variables, or both encoder roots; a variable that maps to no
            project key, or to a key the model does not have; a shape mismatch; model tensors
            left uncovered. The message lists every variable concerned.
    """
    skipped = skipped_deeplab2_variables(tf_vars, skip)
    root = encoder_root([n for n in tf_vars if n not in skipped])
    converted: Dict[str, np.ndarray] = OrderedDict()
    source: Dict[str, str] = {}
    unmapped, problems = [], []
    for name, value in tf_vars.items():
        if name in skipped:
            continue
        mapped = None
        if name.startswith(root) and name.endswith(VARIABLE_SUFFIX):
            mapped = _map_name(name[len(root): -len(VARIABLE_SUFFIX)])
        if mapped is None:
            unmapped.append(f"{name} {list(np.shape(value))}")
            continue
        key, how = mapped
        if key in source:
            problems.append(f"{name} and {source[key]} both map to {key}")
            continue
        try:
            converted[key] = _convert_value(np.asarray(value), how)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        source[key] = name
    if unmapped:
        outside = sorted({n.split("/", 1)[0] for n in unmapped if not n.startswith(root)})
        hint = (f"; the roots {outside} are outside {root} (DeepLab2's initial_checkpoint does not "
                f"load them either): skip=[r'^({'|'.join(outside)})/'] / --skip REGEX leaves them "
                "out" if outside else "")
        problems.append(
            f"{len(unmapped)} checkpoint variables have no counterpart in AxialResNet (a different "
            f"architecture, or weights outside the backbone{hint}):" + _listing(unmapped))
    if model_state is not None:
        expected = {k: _shape(v) for k, v in model_state.items()
                    if not k.endswith("num_batches_tracked")}
        extra = [f"{source[k]} -> {k}" for k in converted if k not in expected]
        if extra:
            problems.append(
                f"{len(extra)} checkpoint variables map to keys the model does not have (a stage or "
                "block the model does not build, or a different block type):" + _listing(extra))
        wrong = [f"{source[k]} {list(np.shape(tf_vars[source[k]]))} -> {k}: converted shape "
                 f"{list(converted[k].shape)}, model has {list(expected[k])}"
                 for k in converted if k in expected and tuple(converted[k].shape) != expected[k]]
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches (another width, head count or span; "
                            "see deeplab2_axial_resnet_config):" + _listing(wrong))
        missing = [k for k in expected if k not in converted]
        if missing:
            problems.append(f"{len(missing)} model tensors have no checkpoint variable (the "
                            "checkpoint lacks these blocks or layers):" + _listing(missing))
        order = [k for k in expected if k in converted] + [k for k in converted if k not in expected]
        converted = OrderedDict((k, converted[k]) for k in order)
    if problems:
        raise ValueError("cannot convert the DeepLab2 checkpoint:\n" + "\n".join(problems))
    return OrderedDict(
        (prefix + k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in converted.items())


def deeplab2_axial_resnet_config(tf_vars: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``MODEL.AXIAL_RESNET`` keys that rebuild the checkpoint's architecture, read from its
    variable names and shapes (values may be arrays or shapes), plus ``BN_EPS`` (DeepLab2's 1e-3).

    ``ACTIVATION`` is not in the weights and is not returned.
    """
    root = encoder_root(list(tf_vars))
    inner = {n[len(root): -len(VARIABLE_SUFFIX)]: _shape(v) for n, v in tf_vars.items()
             if n.startswith(root) and n.endswith(VARIABLE_SUFFIX)}

    def shape(name: str) -> Tuple[int, ...]:
        if name not in inner:
            raise ValueError(f"the checkpoint has no {root}{name}{VARIABLE_SUFFIX}; it is not a "
                             "DeepLab2 Axial-ResNet with an inception stem and four stages")
        return inner[name]

    depths = []
    for s in range(2, 6):
        blocks = {int(m["block"]) for m in map(_BLOCK_RE.match, inner) if m and m["stage"] == str(s)}
        if not blocks or blocks != set(range(1, max(blocks) + 1)):
            raise ValueError(f"stage {s} of the checkpoint has blocks {sorted(blocks)}, expected 1..n")
        depths.append(max(blocks))
    stem = shape("_stem/_conv1_bn_act/_conv/kernel")[-1]
    base = shape("_stage2/_block1/_conv3_bn/_conv/kernel")[-1] // 4
    axial = [f"res{s}" for s in range(2, 6)
             if any(n.startswith(f"_stage{s}/") and "/_attention/" in n for n in inner)]
    config = {
        "DEPTHS": depths,
        "STEM_WIDTH": stem,
        "BASE_WIDTH": base,
        "AXIAL_STAGES": axial,
        "BN_EPS": DEEPLAB2_BN_EPS,
    }
    if axial:
        s = int(axial[-1][3:])
        b = depths[s - 2]
        f = shape(f"_stage{s}/_block{b}/_conv3_bn/_conv/kernel")[-1] // 4
        axis = f"_stage{s}/_block{b}/_attention/_height_axis"
        heads = shape(f"{axis}/_batch_norm_similarity/gamma")[2]
        rows, dk = shape(f"{axis}/_query_rpe/embeddings")
        dv = shape(f"{axis}/_value_rpe/embeddings")[1]
        bottleneck = shape(f"_stage{s}/_block{b}/_conv1_bn_act/_conv/kernel")[-1]
        config.update({
            "ATTENTION_BOTTLENECK_EXPANSION": bottleneck / f,
            "KEY_EXPANSION": dk * heads / f,
            "VALUE_EXPANSION": dv * heads / f,
            "NUM_HEADS": heads,
            "MAX_SPAN": (rows + 1) // 2,
        })
    return config


MAXS_STAGE5_PREFIX = "sem_seg_head.transformer_decoder.stage5.{}.axial."


def move_res5_into_maxs_decoder(state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> Dict[str, torch.Tensor]:
    """Move converted ``res5`` blocks to where MaX-DeepLab-S's layout keeps them.

    With ``MODEL.CMT.TRANSFORMER_DECODER_NAME MaXSTransformerDecoder`` (``configs/coco/max_deeplab_s.yaml``)
    the backbone stops at ``res4`` and stage 5's axial blocks are the axial halves of the decoder's
    dual-path blocks: ``{prefix}res5.{i}.<rest>`` -> ``sem_seg_head.transformer_decoder.stage5.{i}.axial.<rest>``
    (as DeepLab2 initialises MaX-S's stage 5 from the ImageNet backbone's). Other keys are unchanged.
    """
    out: Dict[str, torch.Tensor] = OrderedDict()
    head = prefix + "res5."
    for key, value in state.items():
        if key.startswith(head):
            block, rest = key[len(head):].split(".", 1)
            key = MAXS_STAGE5_PREFIX.format(int(block)) + rest
        out[key] = value
    return out
