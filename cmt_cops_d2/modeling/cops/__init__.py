"""COPS (combinatorial optimization for panoptic segmentation): heads, AMWC layer, PQ surrogate loss.

Submodules are imported where they are used (``from cmt_cops_d2.modeling.cops.pq_surrogate import ...``);
nothing heavy is imported here.
"""
