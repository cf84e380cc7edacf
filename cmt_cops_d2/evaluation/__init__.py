"""Evaluation with checked ground truth and up-front class checks."""
from .classes import check_model_classes, check_same_classes, first_class_difference
from .panoptic import CheckedCOCOPanopticEvaluator, validate_panoptic_ground_truth

__all__ = ["CheckedCOCOPanopticEvaluator", "validate_panoptic_ground_truth", "check_model_classes",
           "check_same_classes", "first_class_difference"]
