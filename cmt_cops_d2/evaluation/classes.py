"""Up-front checks that the model and its datasets use the same classes in the same order."""
from typing import Optional, Sequence

from detectron2.data import MetadataCatalog

__all__ = ["first_class_difference", "check_same_classes", "check_model_classes"]

PANOPTIC_EVALUATOR_TYPES = ("coco_panoptic_seg", "cityscapes_panoptic_seg")


def _describe(classes: list, i: int) -> str:
    return repr(classes[i]) if i < len(classes) else "missing"


def _ids(start: int, stop: int) -> str:
    return f"id {start}" if stop == start + 1 else f"ids {start}..{stop - 1}"


def first_class_difference(name_a: str, name_b: str) -> Optional[str]:
    """The first difference between the classes of two registered datasets, in words, or None.

    Compares the metadata ``stuff_classes`` and ``thing_classes`` (class names by contiguous id) and
    which contiguous ids are things (the values of ``thing_dataset_id_to_contiguous_id``); a key that one
    of the two lacks is not compared.
    """
    a, b = MetadataCatalog.get(name_a), MetadataCatalog.get(name_b)
    for key in ("stuff_classes", "thing_classes"):
        ca, cb = getattr(a, key, None), getattr(b, key, None)
        if ca is None or cb is None or list(ca) == list(cb):
            continue
        ca, cb = list(ca), list(cb)
        i = next(i for i in range(max(len(ca), len(cb))) if i >= min(len(ca), len(cb)) or ca[i] != cb[i])
        return (f"contiguous class id {i} is {_describe(ca, i)} in {name_a!r} but {_describe(cb, i)} in "
                f"{name_b!r} (metadata {key!r}: {len(ca)} vs {len(cb)} classes)")
    ta = getattr(a, "thing_dataset_id_to_contiguous_id", None)
    tb = getattr(b, "thing_dataset_id_to_contiguous_id", None)
    if ta is not None and tb is not None and set(ta.values()) != set(tb.values()):
        i = min(set(ta.values()) ^ set(tb.values()))
        names = list(getattr(a, "stuff_classes", None) or [])
        label = f" ({names[i]!r})" if i < len(names) else ""
        where, other = (name_a, name_b) if i in set(ta.values()) else (name_b, name_a)
        return (f"contiguous class id {i}{label} is a thing in {where!r} but not in {other!r} "
                "(metadata 'thing_dataset_id_to_contiguous_id')")
    return None


def check_same_classes(reference: str, names: Sequence[str], key: str) -> None:
    """Raise ``ValueError`` naming both datasets and the first differing class when a dataset in
    ``names`` does not have the classes of ``reference``; ``key`` is the config key listing ``names``."""
    for name in names:
        if name == reference:
            continue
        diff = first_class_difference(reference, name)
        if diff:
            raise ValueError(
                f"{key}: dataset {name!r} does not have the classes of {reference!r}: {diff}. Datasets "
                "trained or evaluated together must list the same classes in the same order; register "
                "them with the same categories list."
            )


def check_model_classes(num_classes: int, dataset_name: str,
                        key: str = "MODEL.SEM_SEG_HEAD.NUM_CLASSES") -> None:
    """Raise ``ValueError`` naming ``key``, its value and the dataset when a model with ``num_classes``
    classes cannot be evaluated on ``dataset_name``.

    The number of classes must equal the length of the metadata ``stuff_classes``; for a panoptic
    ``evaluator_type``, every contiguous id below ``num_classes`` must also map back to a dataset category
    (``thing_dataset_id_to_contiguous_id`` or ``stuff_dataset_id_to_contiguous_id``).
    """
    meta = MetadataCatalog.get(dataset_name)
    classes = getattr(meta, "stuff_classes", None)
    if classes and num_classes != len(classes):
        k = len(classes)
        effect = (f"its predictions of class {_ids(k, num_classes)} have no category in the dataset "
                  "(the evaluator fails on them)" if num_classes > k else
                  f"it can never predict the dataset's class {_ids(num_classes, k)}")
        raise ValueError(
            f"{key}={num_classes} but test dataset {dataset_name!r} has {k} classes (metadata "
            f"'stuff_classes'): {effect}. Evaluate a model trained on these classes ({key} {k}), or "
            f"evaluate on a dataset with {num_classes} classes."
        )
    if getattr(meta, "evaluator_type", None) not in PANOPTIC_EVALUATOR_TYPES:
        return
    things = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
    stuff = getattr(meta, "stuff_dataset_id_to_contiguous_id", None)
    if things is None or stuff is None:
        raise ValueError(
            f"test dataset {dataset_name!r}: the metadata lacks 'thing_dataset_id_to_contiguous_id' or "
            "'stuff_dataset_id_to_contiguous_id', which COCOPanopticEvaluator needs; set both when "
            "registering (see the metadata checklist in datasets/README.md)"
        )
    mapped = set(things.values()) | set(stuff.values())
    missing = [i for i in range(num_classes) if i not in mapped]
    if missing:
        raise ValueError(
            f"test dataset {dataset_name!r}: contiguous class id {missing[0]} (below {key}={num_classes}) "
            "is in neither 'thing_dataset_id_to_contiguous_id' nor 'stuff_dataset_id_to_contiguous_id' "
            "of its metadata, so a prediction of it cannot be mapped to a dataset category; map every "
            "class (see the metadata checklist in datasets/README.md)"
        )
