"""``CMTHead``: everything of CMT-DeepLab after the backbone (Detectron2 ``SEM_SEG_HEADS_REGISTRY``).

Transformer decoder (dual-path blocks with CMT layers, :mod:`.transformer_decoder`) -> pixel decoder
to stride 4 (:mod:`.pixel_decoder`) -> prediction heads (:mod:`.predictor`), each built from its own
registry, as Mask2Former's ``MaskFormerHead``. ``forward(features, images)`` returns the output dict
the criterion and the post-processing read:

* ``pred_logits`` (B x N x K+1), ``pred_masks`` (B x N x H/4 x W/4) of the final clustering;
* ``aux_outputs``: every CMT layer's clustering result (``pred_masks`` at the layer's stride) with the
  class prediction of the layer's input centers and, with reference masks, its ``ref_points``;
* ``stride4_features`` (the pixel decoder's output; RFN connects two networks through them);
* in training, ``pixel_features`` and ``sem_logits``.

``images`` is not read here; it is part of the signature so that :class:`~.rfn.RecursiveFeatureNetwork`
(which runs a second backbone on them) is called the same way.
"""
from typing import Dict, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from .pixel_decoder import build_pixel_decoder
from .predictor import build_predictor
from .transformer_decoder import CMT_TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder

__all__ = ["CMTHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class CMTHead(nn.Module):
    @configurable
    def __init__(self, *, transformer_decoder: nn.Module, pixel_decoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.transformer_decoder = transformer_decoder
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    @classmethod
    def from_config(cls, cfg, input_shape):
        name = cfg.MODEL.CMT.TRANSFORMER_DECODER_NAME
        needed = {"res2", "res3"} | set(CMT_TRANSFORMER_DECODER_REGISTRY.get(name).in_features)
        missing = needed - set(input_shape)
        if missing:
            raise ValueError(f"CMTDeepLab with MODEL.CMT.TRANSFORMER_DECODER_NAME={name} needs backbone "
                             f"features {sorted(needed)}; {sorted(missing)} are missing "
                             "(MODEL.AXIAL_RESNET.OUT_FEATURES)")
        transformer_decoder = build_transformer_decoder(cfg, input_shape)
        pixel_decoder = build_pixel_decoder(cfg, transformer_decoder.out_channels, input_shape)
        return {"transformer_decoder": transformer_decoder, "pixel_decoder": pixel_decoder,
                "predictor": build_predictor(cfg, pixel_decoder.out_channels)}

    @property
    def stride4_channels(self) -> int:
        return self.pixel_decoder.out_channels

    def forward(self, features: Dict[str, torch.Tensor], images: Optional[torch.Tensor] = None) -> Dict:
        t = self.transformer_decoder(features)
        x = self.pixel_decoder(t["pixels"], features)
        out = self.predictor(x, t["centers"], t["assignment"])
        aux = []
        for layer in t["layers"]:
            pred = {"pred_logits": self.predictor.class_logits(layer["centers_in"]),
                    "pred_masks": layer["logits"]}
            if "ref_points" in layer:
                pred["ref_points"] = layer["ref_points"]
            aux.append(pred)
        out["aux_outputs"] = aux
        out["stride4_features"] = x
        return out
