"""Config keys of COPS (``cfg.MODEL.COPS``).

Defaults are the paper's (Sec. 4) or, where the paper is silent, the public COPS code's; "(choice)"
marks our own choices.

Other keys the COPS meta-architecture reads:

* ``MODEL.BACKBONE`` / ``MODEL.RESNETS``: the R-50 DeepLab backbone (``build_resnet_deeplab_backbone``).
* ``MODEL.SEM_SEG_HEAD.*``: the semantic branch, ``COPSSemSegHead`` (Detectron2's
  ``PanopticDeepLabSemSegHead`` with the public COPS head: DeepLabV3+ decoder + two dense 3x3 convs +
  K-class predictor). Its ``LOSS_TOP_K`` is *replaced* by
  ``MODEL.COPS.SEMANTIC_TOP_K``; its ``LOSS_WEIGHT`` weights the semantic loss.
* ``MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV``: depthwise-separable ASPP branches and fuse convs
  in both DeepLabV3+ decoders (public COPS configs: True); the semantic head after the decoder stays
  two dense 3x3 convs either way (``COPSSemSegHead``).
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_cops_config"]


def add_cops_config(cfg: CN) -> CN:
    """Add ``MODEL.COPS`` (idempotent; returns ``cfg``)."""
    if "COPS" in cfg.MODEL:
        return cfg
    cfg.MODEL.COPS = CN()
    c = cfg.MODEL.COPS
    # Edge distances d on the stride-4 grid: vertical and horizontal edges of every d (paper Sec. 3.1:
    # COCO {1, 4, 16, 32, 64}; Cityscapes adds 128). Also read by the COPS mapper (affinity targets).
    c.EDGE_DISTANCES = [1, 4, 16, 32, 64]
    # Stride of the node grid, the affinity targets and the network outputs (paper: 4).
    c.TARGET_STRIDE = 4
    # Affinity-loss weight of edges with a thing endpoint (paper Sec. 4 "Baseline pre-training": x4);
    # small things get INPUT.SMALL_INSTANCE_WEIGHT (3) on top. Read by the COPS mapper.
    c.THING_EDGE_WEIGHT = 4.0
    # Factor of the affinity loss (public pretrain yamls: 0.25). The loss is summed over distances and
    # the two directions, each a top-k weighted BCE (see AFFINITY_TOP_K).
    c.AFFINITY_LOSS_WEIGHT = 0.25
    # Fraction of hardest edges kept by the affinity BCE of each (distance, direction), over the
    # batch-flattened map (public code: 0.25; 1.0 = plain weighted mean).
    c.AFFINITY_TOP_K = 0.25
    # Fraction of hardest pixels of the semantic DeepLab top-k CE (Cityscapes 0.2, COCO 1.0).
    # Replaces MODEL.SEM_SEG_HEAD.LOSS_TOP_K.
    c.SEMANTIC_TOP_K = 0.2
    # ---- affinity branch (built by name from COPS_AFFINITY_HEAD_REGISTRY) ----------------------
    c.AFFINITY_HEAD = CN()
    a = c.AFFINITY_HEAD
    a.NAME = "COPSAffinityHead"
    # Its own DeepLabV3+ decoder (the public COPS code's AFF_EMBED_HEAD keys and values); depthwise
    # separable with MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV, like the semantic decoder.
    a.IN_FEATURES = ["res2", "res3", "res5"]
    a.PROJECT_FEATURES = ["res2", "res3"]
    a.PROJECT_CHANNELS = [32, 64]
    a.ASPP_CHANNELS = 256
    a.ASPP_DILATIONS = [6, 12, 18]
    a.ASPP_DROPOUT = 0.1
    a.CONVS_DIM = 256
    a.NORM = "SyncBN"
    # Channels of the affinity features F: the second of the two 3x3 convs after cat(decoder features,
    # detached semantic logits); the first keeps CONVS_DIM (public code; both 256 there). The
    # per-distance predictors narrow to 1/4 and 1/8 of their input.
    a.HEAD_CHANNELS = 256
    # Which vertical and horizontal edge of distance d > 1 a predictor's last 1x1 conv mixes at one slot:
    # "center" (the two edges centred at the same pixel, a "+"; public code; needs even distances) or
    # "anchor" (the two edges starting at the same pixel, an "L").
    a.EDGE_ALIGNMENT = "center"
    # Init of each predictor's last 1x1 conv: "xavier" (Detectron2's c2_xavier_fill, public code) or
    # "normal" (N(0, 0.001) weights, zero bias, as Detectron2's Panoptic-DeepLab predictors; the tiny
    # synthetic configs use it: see their header).
    a.PREDICTOR_INIT = "xavier"
    # Thing clusters with fewer grid pixels become void at inference and get no segment slot in the
    # full stage's PQ surrogate (public code: IGNORE_INSTANCE_SIZE_AMC 12 // 4 = 3, in both).
    c.MIN_THING_CLUSTER_SIZE = 3
    # Threads of the AMWC solver at inference (one problem per image); 0 = os.cpu_count().
    c.SOLVER_THREADS = 0
    # Inputs are padded to a multiple of this (0: the backbone's size divisibility). With ASPP image
    # pooling over a fixed window (INPUT.CROP enabled) it must be a multiple of the crop size.
    c.SIZE_DIVISIBILITY = 0

    # ---- training stage --------------------------------------------------------------------------
    # "pretrain": semantic top-k CE + affinity BCE (paper Sec. 4.2 "Baseline pre-training");
    # "full": only the PQ surrogate (eq. 6) through the AMWC layer (Algorithm 1, eq. 4), with the
    # backbone, both decoders and every batch norm frozen (Sec. 4.2 "Full training").
    c.STAGE = "pretrain"
    # Interval of the interpolation ranges lambda_i ~ U[LAMBDA_MIN, LAMBDA_MAX] of eq. (4). The paper
    # only says "relatively large values of lambda"; public code: U[1, 5000] (its default and
    # Cityscapes yaml), COCO yaml U[1000, 5000]. lambda multiplies PQ_LOSS_WEIGHT * dL/dZ.
    c.LAMBDA_MIN = 1.0
    c.LAMBDA_MAX = 5000.0
    # N of eq. (4): MWC solves per image in the backward (paper Sec. 4.2: N = 5).
    c.NUM_LAMBDA_SAMPLES = 5
    # How the N perturbed multiway cuts of the backward are solved (paper and public code silent on the
    # solver beyond "MWC"): "warm" starts each from the forward solution (solvers.solve_mwc_warm: the
    # forward segments are kept as clusters except where the perturbation pushes pixels away; lower
    # energies than "cold" on most problems and 5-10x faster, tools/benchmark_amwc.py), "cold" solves
    # each from scratch (solvers.solve_mwc), as the public code does with LPMP.
    c.BACKWARD_SOLVER = "warm"
    # Rounds of the warm start (each re-clusters from the previous labels; 2 costs about twice as much).
    c.BACKWARD_WARM_ROUNDS = 1
    # Factor of the PQ surrogate loss, weight * (1 - mean_l PQ_l) (paper silent; public code
    # AMC_LOSS_WEIGHT: Cityscapes 10, COCO 100). It scales the perturbation lambda * dL/dZ.
    c.PQ_LOSS_WEIGHT = 10.0
    # Small-segment rejection thresholds t_l of the size gate sigma_l (eq. 6), in pixels at full input
    # resolution (paper Sec. 4.1: things 200; stuff 4096 COCO, 2048 Cityscapes). The loss works on the
    # stride-TARGET_STRIDE grid and divides them by TARGET_STRIDE**2 (12.5 / 256 / 128 grid pixels).
    c.THING_AREA = 200.0
    c.STUFF_AREA = 4096.0
    # At inference, segments smaller than THING_AREA / STUFF_AREA pixels (at the network's input
    # resolution) become void: the paper uses the thresholds "during both training and inference", as
    # the public code does. False keeps every segment (only MIN_THING_CLUSTER_SIZE applies).
    c.INFERENCE_AREA_GATE = True
    # Add the "instances" output at inference: every thing segment with the public code's score (mean
    # semantic logit of its class over the mask + boundary-minus-interior affinity logits), for AP.
    c.PREDICT_INSTANCES = True
    # Edge costs |w_d| (-a) + b_d with one (w_d, b_d) per edge distance (public code), or one pair shared
    # by all distances (False; the paper does not say).
    c.PER_DISTANCE_EDGE_AFFINE = True
    # Node costs w_s * (-s) + b_s with the scale's sign (True; the public code) or |w_s| * (-s) + b_s
    # (False, our choice: a step of w_s through 0 cannot turn the node costs around; see meta_arch.py
    # "Cost scale"). The two agree while w_s > 0; a public checkpoint with a negative scale needs True.
    c.SIGNED_NODE_COST_SCALE = False
    # Dropout of the AMWC costs in full-stage training (public code DROPOUT 0.1; paper silent): every
    # pixel's node costs (all classes) and every edge cost are zeroed with this probability, without
    # rescaling. 0 disables it. Never applied at inference.
    c.COST_DROPOUT = 0.1
    # Parameters trained in the full stage, as parameter-name patterns (fnmatch; a pattern also
    # matches everything below it). Paper Sec. 4.2: "the semantic and affinity classifiers along with
    # the last layer of each semantic and affinity decoder"; the public code trains exactly the
    # semantic head (the two convs after the DeepLabV3+ decoder) and predictor, the affinity head (the
    # two convs after cat(decoder, semantic logits)), the per-distance classifier convs and last 1x1
    # convs, and the cost affines. Everything else is frozen, and batch-norm parameters are frozen
    # even inside these modules. costs.b_s is left out: a shift of all node costs does not change the
    # AMWC solution, so its gradient is zero (public code notes: dead parameter).
    c.FULL_TRAINABLE = [
        "sem_seg_head.head",
        "sem_seg_head.predictor",
        "costs.w_s",
        "affinity_head.head",
        "affinity_head.predictors.*.convs",
        "affinity_head.predictors.*.predictor",
        "costs.w_d",
        "costs.b_d",
    ]
    # Learning-rate factor of each FULL_TRAINABLE entry (same order), times SOLVER.BASE_LR. Public
    # code: LR / (20 x the number of trainable stages after it in its branch): semantic head 1/40,
    # predictor 1/20, affine 1; affinity head 1/60, classifier convs 1/40, last layer 1/20, affine 1.
    c.FULL_LR_MULTIPLIERS = [1 / 40, 1 / 20, 1.0, 1 / 60, 1 / 40, 1 / 20, 1.0, 1.0]
    return cfg
