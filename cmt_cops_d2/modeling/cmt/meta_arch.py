"""``CMTDeepLab``: the CMT-DeepLab meta-architecture (Detectron2 ``META_ARCH_REGISTRY``)."""
import math
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import nn

from ..inputs import check_input_images
from ..layers import set_inference_shortcuts
from .criterion import CMTCriterion
from .output_resize import OutputResize, ResizedMaps
from .postprocess import panoptic_inference, semantic_inference
from .rfn import RecursiveFeatureNetwork

__all__ = ["CMTDeepLab", "downsample_masks"]

OUTPUT_STRIDE = 4


def downsample_masks(masks: torch.Tensor, stride: int = OUTPUT_STRIDE) -> torch.Tensor:
    """G x H x W binary masks (H, W multiples of ``stride``) -> G x H/s x W/s: a cell belongs to a mask
    when more than half of its pixels do (so the masks stay disjoint; other cells are void)."""
    if masks.numel() == 0:
        return masks.new_zeros((masks.shape[0], masks.shape[1] // stride, masks.shape[2] // stride))
    return F.avg_pool2d(masks[None].float(), stride)[0] > 0.5


def _iteration_text() -> str:
    try:
        return f" at iteration={get_event_storage().iter}"
    except AssertionError:  # outside a Detectron2 trainer
        return ""


def check_finite(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """``FloatingPointError`` in Detectron2's words ("Loss became infinite or NaN at iteration=...!")
    when a tensor of ``tensors`` holds NaN or inf; one device sync for all of them."""
    if not tensors:
        return
    flags = torch.stack([torch.isfinite(t.detach()).all() for t in tensors.values()])
    if bool(flags.all()):
        return
    bad = [k for k, ok in zip(tensors, flags.tolist()) if not ok]
    raise FloatingPointError(
        f"Loss became infinite or NaN{_iteration_text()}! CMT-DeepLab's {what} {', '.join(bad[:5])} "
        "hold NaN or inf (training diverged: lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS)")


def _matched_outputs(outputs: Dict) -> Dict[str, torch.Tensor]:
    """The outputs the criterion's matching reads: final and auxiliary class and mask logits."""
    found = {k: outputs[k] for k in ("pred_logits", "pred_masks") if k in outputs}
    for i, aux in enumerate(outputs.get("aux_outputs", [])):
        found.update({f"aux_outputs[{i}].{k}": aux[k] for k in ("pred_logits", "pred_masks") if k in aux})
    return found


@META_ARCH_REGISTRY.register()
class CMTDeepLab(nn.Module):
    """Backbone (Axial-ResNet) -> CMT decoder -> cluster classes and masks; losses in training,
    Detectron2 ``panoptic_seg`` and ``sem_seg`` at inference. Accepts any input size: images are padded
    to ``size_divisibility`` with the pixel mean and the outputs cropped back. At inference, images that
    pad to different sizes run as separate batches, so an image's result does not depend on the other
    images of its batch (the padding would change its attention and coordinates)."""

    @configurable
    def __init__(self, *, backbone: nn.Module, sem_seg_head: nn.Module, criterion: CMTCriterion,
                 pixel_mean, pixel_std, size_divisibility: int, thing_ids, merge: str,
                 thresholds: Dict[str, float], area_limits: Tuple[float, float] = (0, 0)):
        super().__init__()
        # ``sem_seg_head`` is a CMTHead, or with RFN a RecursiveFeatureNetwork (the first copy's head
        # plus the whole second copy); both are called as ``sem_seg_head(features, images)``.
        self.backbone, self.sem_seg_head, self.criterion = backbone, sem_seg_head, criterion
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = max(size_divisibility, getattr(backbone, "size_divisibility", 0))
        self.thing_ids = list(thing_ids)
        self.merge, self.thresholds = merge, dict(thresholds)
        self.area_limits = tuple(area_limits)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        c = cfg.MODEL.CMT
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        shapes = backbone.output_shape()
        head = build_sem_seg_head(cfg, shapes)
        if not hasattr(head, "stride4_channels"):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NAME={cfg.MODEL.SEM_SEG_HEAD.NAME!r} is not a CMT-DeepLab "
                             "head; set it to 'CMTHead'")
        if c.RFN:
            head = RecursiveFeatureNetwork(
                head, build_backbone(cfg), build_sem_seg_head(cfg, shapes),
                stride4_channels=head.stride4_channels, res2_channels=shapes["res2"].channels, norm=c.NORM)
        thing_ids = []
        if cfg.DATASETS.TRAIN or cfg.DATASETS.TEST:
            meta = MetadataCatalog.get((cfg.DATASETS.TRAIN or cfg.DATASETS.TEST)[0])
            thing_ids = list(getattr(meta, "thing_dataset_id_to_contiguous_id", {}).values())
        criterion = CMTCriterion(
            num_classes, pq_weight=c.PQ_WEIGHT, pq_alpha=c.PQ_ALPHA, pq_beta=c.PQ_BETA,
            mask_id_weight=c.MASK_ID_WEIGHT, insdis_weight=c.INSDIS_WEIGHT, insdis_type=c.INSDIS_TYPE,
            insdis_temperature=c.INSDIS_TEMPERATURE, insdis_num_pixels=c.INSDIS_NUM_PIXELS,
            insdis_sample_temperature=c.INSDIS_SAMPLE_TEMPERATURE, semantic_weight=c.SEMANTIC_WEIGHT,
            mask_approx_weight=c.MASK_APPROX_WEIGHT if c.USE_REFERENCE_MASK else 0.0,
            deep_supervision=c.DEEP_SUPERVISION, share_final_matching=c.SHARE_FINAL_MATCHING,
            thing_classes=thing_ids)
        t = c.TEST
        return {
            "backbone": backbone, "sem_seg_head": head, "criterion": criterion,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": c.SIZE_DIVISIBILITY, "thing_ids": thing_ids, "merge": t.MERGE,
            "thresholds": {"thing_threshold": t.THING_THRESHOLD, "stuff_threshold": t.STUFF_THRESHOLD,
                           "class_threshold": t.CLASS_THRESHOLD, "pixel_threshold": t.PIXEL_THRESHOLD,
                           "overlap_threshold": t.OVERLAP_THRESHOLD},
            "area_limits": (t.THING_AREA_LIMIT, t.STUFF_AREA_LIMIT),
        }

    def train(self, mode: bool = True):
        """``train()`` / ``eval()``; ``eval()`` also switches the inference shortcuts on (folded batch
        norms, in-place activations: the same outputs, faster, under ``torch.no_grad()``) and
        ``train()`` off (:func:`~..layers.set_inference_shortcuts`)."""
        super().train(mode)
        set_inference_shortcuts(self, not mode)
        return self

    @property
    def device(self):
        return self.pixel_mean.device

    def prepare_targets(self, batched_inputs: List[dict], padded_size) -> List[Dict]:
        """Ground-truth masks padded to the batch size and sampled at the output stride."""
        targets = []
        H, W = padded_size
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            masks = inst.gt_masks
            masks = masks.tensor if hasattr(masks, "tensor") else masks
            padded = masks.new_zeros((masks.shape[0], H, W), dtype=torch.bool)
            padded[:, : masks.shape[1], : masks.shape[2]] = masks.bool()
            targets.append({"labels": inst.gt_classes, "masks": downsample_masks(padded)})
        return targets

    def normalized_images(self, batched_inputs: List[dict]) -> List[torch.Tensor]:
        """``(image - mean) / std``; pixels a mapper marked as padding (``padding_mask``, True on
        padding) become 0, the pixel mean, like the padding added here."""
        images = []
        for x in batched_inputs:
            image = (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
            if "padding_mask" in x:
                image = image.masked_fill(x["padding_mask"].to(self.device), 0.0)
            images.append(image)
        return images

    def network(self, images: torch.Tensor) -> Dict:
        """Normalised, padded B x 3 x H x W images -> the head's output dict (see :class:`CMTHead`)."""
        return self.sem_seg_head(self.backbone(images), images)

    def padded_size(self, image: torch.Tensor) -> Tuple[int, int]:
        d = max(self.size_divisibility, 1)
        return tuple(int(math.ceil(n / d) * d) for n in image.shape[-2:])

    def forward(self, batched_inputs: List[dict]):
        check_input_images(batched_inputs, self.pixel_mean.shape[0])
        images = self.normalized_images(batched_inputs)
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("CMTDeepLab training needs 'instances' (gt_classes, gt_masks) in each "
                                 "input; use INPUT.DATASET_MAPPER_NAME mask_transformer_panoptic")
            batch = ImageList.from_tensors(images, self.size_divisibility)
            outputs = self.network(batch.tensor)
            # NaN logits would otherwise stop the Hungarian matching with an unrelated scipy error
            check_finite(_matched_outputs(outputs), "outputs")
            losses = self.criterion(outputs, self.prepare_targets(batched_inputs, batch.tensor.shape[-2:]))
            check_finite(losses, "losses")
            return losses
        groups = defaultdict(list)
        for i, image in enumerate(images):
            groups[self.padded_size(image)].append(i)
        results = [None] * len(images)
        for members in groups.values():
            batch = ImageList.from_tensors([images[i] for i in members], self.size_divisibility)
            group_results = self.inference(self.network(batch.tensor),
                                           [batched_inputs[i] for i in members], batch)
            for i, result in zip(members, group_results):
                results[i] = result
        return results

    @torch.no_grad()
    def inference(self, outputs: Dict, batched_inputs: List[dict], images: ImageList) -> List[Dict]:
        results = []
        padded = images.tensor.shape[-2:]
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            out_h, out_w = x.get("height", h), x.get("width", w)
            cls, masks = outputs["pred_logits"][i], outputs["pred_masks"][i]
            # Stride 4 -> padded size -> crop -> requested size, band by band: the N x H x W
            # full-resolution mask logits are never formed.
            resize = OutputResize(masks.shape[-2:], padded, (h, w), (out_h, out_w), device=masks.device)
            # Semantic scores at the output stride, then upsampled like the mask logits (K x H x W
            # instead of an N x K x H x W product at full resolution).
            sem_seg = resize(semantic_inference(cls, masks))
            # Area limits are in pixels at the network's input resolution (DeepLab2).
            scale = (out_h * out_w) / max(h * w, 1)
            pan, segments = panoptic_inference(
                cls, ResizedMaps(resize, masks), self.thing_ids, merge=self.merge,
                thing_area_limit=self.area_limits[0] * scale, stuff_area_limit=self.area_limits[1] * scale,
                **self.thresholds)
            results.append({"panoptic_seg": (pan, segments), "sem_seg": sem_seg})
        return results
