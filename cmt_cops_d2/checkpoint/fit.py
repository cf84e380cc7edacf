"""Does a checkpoint fit the model it is loaded into?

Detectron2 loads whatever matches and logs the rest as warnings, so a foreign checkpoint (say COPS
weights in CMT-DeepLab) silently leaves most of the model at its random init. :class:`FitCheckpointer`
is a ``DetectionCheckpointer`` that compares the checkpoint with the model after loading and raises
:class:`WeightsFitError` (naming the file and the first mismatched keys) when

* any tensor of the model (parameters and persistent buffers, ``num_batches_tracked`` aside) has no
  tensor of that name in the checkpoint, unless the load is partial (below); or
* fewer than ``MODEL.WEIGHTS_MIN_LOADED`` (default 0.9) of the checkpoint's tensors load. A tensor
  loads when its name (after Detectron2's suffix matching for ``matching_heuristics`` files) and
  shape match a model tensor; unexpected and shape-mismatched ones do not.

Shape-mismatched tensors count against the share only, so a fine-tune with another number of classes
(a few class predictors of another size) loads as in Detectron2.

A load is partial when ``MODEL.WEIGHTS_PARTIAL`` is True (e.g. ImageNet backbone weights), or when
the file says it holds a backbone only: a ``config`` entry (written by
``tools/convert_deeplab2_checkpoint.py``) and every key under :data:`BACKBONE_PREFIXES`. Such a
file must load completely (every one of its tensors), whatever ``MODEL.WEIGHTS_MIN_LOADED`` says.
"""
import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys

__all__ = ["FitPolicy", "FitReport", "WeightsFitError", "FitCheckpointer", "BACKBONE_PREFIXES",
           "is_backbone_only"]

logger = logging.getLogger(__name__)

# Where the converted ImageNet backbones of tools/convert_deeplab2_checkpoint.py put their tensors:
# the backbone, the second backbone of an RFN model, and MaX-S's stage 5 (built by its decoder).
BACKBONE_PREFIXES = ("backbone.", "sem_seg_head.backbone2.", "sem_seg_head.transformer_decoder.stage5.")
_SHOWN = 5  # keys listed per kind in an error message


class WeightsFitError(RuntimeError):
    """A checkpoint does not fit the model; the message names the file and the mismatched keys."""


@dataclasses.dataclass(frozen=True)
class FitPolicy:
    """What a load must achieve: ``MODEL.WEIGHTS_PARTIAL`` and ``MODEL.WEIGHTS_MIN_LOADED``."""

    partial: bool = False
    min_loaded: float = 0.9

    def __post_init__(self):
        if not 0.0 <= float(self.min_loaded) <= 1.0:
            raise ValueError(f"MODEL.WEIGHTS_MIN_LOADED={self.min_loaded!r} must be a share between 0 and 1 "
                             "(e.g. 0.9)")

    @classmethod
    def from_config(cls, cfg) -> "FitPolicy":
        return cls(partial=bool(cfg.MODEL.WEIGHTS_PARTIAL), min_loaded=float(cfg.MODEL.WEIGHTS_MIN_LOADED))


def is_backbone_only(checkpoint: Dict[str, Any]) -> bool:
    """Whether ``checkpoint`` (a loaded file: a dict with ``model``) declares a backbone-only file."""
    keys = list(checkpoint.get("model") or {})
    return (isinstance(checkpoint.get("config"), dict) and bool(keys)
            and all(k.startswith(BACKBONE_PREFIXES) for k in keys))


@dataclasses.dataclass
class FitReport:
    """How a checkpoint's tensors met the model's (see the module doc)."""

    file: str
    total: int                       # tensors in the checkpoint
    missing: List[str]               # model tensors absent from the checkpoint
    unexpected: List[str]            # checkpoint tensors with no model tensor of that name
    incorrect_shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]  # (key, file shape, model shape)
    backbone_only: bool = False

    @property
    def loaded(self) -> int:
        return self.total - len(self.unexpected) - len(self.incorrect_shapes)

    @property
    def share(self) -> float:
        return self.loaded / self.total if self.total else 0.0

    def problems(self, policy: FitPolicy) -> List[str]:
        """Why the load fails ``policy``; empty when it passes."""
        out = []
        partial = policy.partial or self.backbone_only
        if self.missing and not partial:
            out.append(f"{len(self.missing)} tensors of the model are not in the file")
        need = 1.0 if self.backbone_only and not policy.partial else policy.min_loaded
        if self.share < need:
            what = ("it is marked backbone-only (a 'config' entry, keys under backbone.), so all must load"
                    if need == 1.0 and self.backbone_only else f"MODEL.WEIGHTS_MIN_LOADED is {need:g}")
            out.append(f"only {self.loaded} of its {self.total} tensors load ({self.share:.1%}; {what})")
        return out

    def details(self) -> str:
        """The first missing, unexpected and shape-mismatched keys, one kind per line."""
        lines = []
        for name, keys in (("missing in the file", self.missing), ("unexpected (not in the model)", self.unexpected)):
            if keys:
                more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
                lines.append(f"  {name} ({len(keys)}): " + ", ".join(keys[:_SHOWN]) + more)
        bad = self.incorrect_shapes
        if bad:
            shown = [f"{k} {tuple(a)} in the file, {tuple(b)} in the model" for k, a, b in bad[:_SHOWN]]
            more = f"; ... ({len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
            lines.append(f"  shape mismatch ({len(bad)}): " + "; ".join(shown) + more)
        return "\n".join(lines)

    def check(self, policy: FitPolicy, model_name: str = "the model") -> None:
        """Raise :class:`WeightsFitError` when the load fails ``policy``."""
        problems = self.problems(policy)
        if not problems:
            return
        raise WeightsFitError(
            f"checkpoint {self.file!r} does not fit {model_name}: " + "; ".join(problems) + ".\n"
            + self.details() + "\n"
            "Give weights trained with this config. For an intended partial load (an ImageNet backbone, "
            "another head) set MODEL.WEIGHTS_PARTIAL True; MODEL.WEIGHTS_MIN_LOADED (0..1) sets the share "
            "of the file's tensors that must load.")


def _drop_ignored(missing: Sequence[str]) -> List[str]:
    # batch norms' counters start at 0 anyway; converted files do not carry them
    return [k for k in missing if not k.endswith("num_batches_tracked")]


class FitCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose loads must fit the model (module doc) under ``policy``."""

    def __init__(self, model, save_dir: str = "", *, policy: Optional[FitPolicy] = None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.policy = policy or FitPolicy()
        self.last_report: Optional[FitReport] = None
        self._file = "?"

    @classmethod
    def like(cls, checkpointer: DetectionCheckpointer, policy: Optional[FitPolicy] = None) -> "FitCheckpointer":
        """A FitCheckpointer over the model, folder and checkpointables of ``checkpointer``."""
        return cls(checkpointer.model, checkpointer.save_dir, policy=policy,
                   save_to_disk=checkpointer.save_to_disk, **checkpointer.checkpointables)

    def _load_file(self, filename: str):
        self._file = filename
        return super()._load_file(filename)

    def _load_model(self, checkpoint: Dict[str, Any]):
        total = len(checkpoint.get("model") or {})
        backbone_only = is_backbone_only(checkpoint)
        incompatible = super()._load_model(checkpoint)
        reshaped = {k for k, _, _ in incompatible.incorrect_shapes}
        kept = set(_filter_reused_missing_keys(self.model, list(incompatible.missing_keys)))
        missing = [k for k in incompatible.missing_keys if k in kept]  # the model's order
        report = FitReport(
            file=self._file, total=total, missing=_drop_ignored([k for k in missing if k not in reshaped]),
            unexpected=list(incompatible.unexpected_keys),
            incorrect_shapes=list(incompatible.incorrect_shapes), backbone_only=backbone_only)
        self.last_report = report
        report.check(self.policy, type(self.model).__name__)
        if report.missing or report.loaded < report.total:
            logger.info(f"Partial load of {self._file}: {report.loaded} of its {report.total} tensors loaded; "
                        f"{len(report.missing) + len(reshaped)} tensors of the model keep their initial values")
        return incompatible
