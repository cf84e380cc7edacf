"""CMT-DeepLab. Importing this package registers ``CMTDeepLab``, ``CMTHead`` and the parts it builds
from its registries (transformer decoder, pixel decoder, predictor)."""
from .head import CMTHead  # noqa: F401  (registers CMTHead and, through its imports, its parts)
from .meta_arch import CMTDeepLab  # noqa: F401
from .pixel_decoder import CMT_PIXEL_DECODER_REGISTRY  # noqa: F401
from .predictor import CMT_PREDICTOR_REGISTRY  # noqa: F401
from .transformer_decoder import CMT_TRANSFORMER_DECODER_REGISTRY  # noqa: F401
