"""Dataset registration. Importing this package registers the built-in datasets."""
from .panoptic import (  # noqa: F401
    DatasetFormatError,
    load_panoptic_json,
    panoptic_metadata_from_categories,
    register_panoptic_dataset,
)
from . import register_synthetic  # noqa: F401
from . import register_coco_panoptic  # noqa: F401
from . import register_cityscapes_panoptic  # noqa: F401
