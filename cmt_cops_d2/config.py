"""Config keys of cmt_cops_d2, added to Detectron2's defaults.

``add_cmt_cops_d2_config(cfg)`` adds the keys shared by every model of the plugin (data mapper choice,
optimizer, evaluation). It also adds DeepLab's and Panoptic-DeepLab's keys (poly LR, ASPP, target
generation), so configs of Detectron2's Panoptic-DeepLab baseline load as they are. Model-specific
functions (``add_cmt_config``, ``add_cops_config``) build on it.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config

__all__ = ["add_cmt_cops_d2_config", "add_axial_resnet_config", "add_cmt_config"]


def add_cmt_cops_d2_config(cfg: CN) -> CN:
    """Add the plugin's shared keys (idempotent; returns ``cfg``)."""
    if "DATASET_MAPPER_NAME" in cfg.INPUT:
        return cfg
    # Poly LR (SOLVER.POLY_LR_POWER, POLY_LR_CONSTANT_ENDING), ASPP, DeepLab stem, and the
    # Panoptic-DeepLab heads / targets / SOLVER.OPTIMIZER.
    add_panoptic_deeplab_config(cfg)

    # Which training mapper builds the model's targets (see cmt_cops_d2.data.mappers.MAPPERS).
    cfg.INPUT.DATASET_MAPPER_NAME = "panoptic_deeplab"

    # Optimizer: "SGD", "ADAM" or "ADAMW". Panoptic-DeepLab's config sets ADAM as its default.
    cfg.SOLVER.OPTIMIZER = "ADAM"
    # Learning rate of backbone parameters = BASE_LR * BACKBONE_MULTIPLIER (CMT-DeepLab: 0.1).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # Weight decay of embedding parameters (nn.Embedding, learned queries / cluster centers).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE also accepts "full_model": clip the global norm over all
    # parameters together (Detectron2's "norm" clips each parameter separately).

    # DistributedDataParallel(find_unused_parameters=...). Keep False: a model whose parameters all
    # receive gradients trains faster, and the multi-process test then catches unused ones.
    cfg.MODEL.FIND_UNUSED_PARAMETERS = False

    # How MODEL.WEIGHTS must fit the model (cmt_cops_d2.checkpoint.fit). A load is an error when a
    # tensor of the model is not in the file, or when less than WEIGHTS_MIN_LOADED of the file's tensors
    # load (name and shape match). WEIGHTS_PARTIAL True allows model tensors the file lacks: set it for
    # an ImageNet backbone init (the COPS configs with R-52.pkl do). Files of
    # tools/convert_deeplab2_checkpoint.py say they are backbone-only and need no key, but must load
    # completely. Resuming from OUTPUT_DIR/last_checkpoint ignores WEIGHTS_PARTIAL.
    cfg.MODEL.WEIGHTS_PARTIAL = False
    # Share (0..1) of the file's tensors that must load; 0.9 leaves room for a fine-tune with another
    # number of classes (class predictors of another shape are skipped, as in Detectron2).
    cfg.MODEL.WEIGHTS_MIN_LOADED = 0.9

    add_cmt_config(cfg)
    from .modeling.cops.config import add_cops_config  # local import: avoids an import cycle

    add_cops_config(cfg)

    # Also evaluate mIoU on panoptic datasets: Cityscapes' own evaluator (gtFine/*_labelIds.png), or
    # SemSegEvaluator where the dataset has semantic PNGs (COCO: prepare_coco_semantic_from_panoptic.py).
    cfg.TEST.SEMANTIC_EVALUATION = False
    # Also evaluate instance AP (Cityscapes' own evaluator, gtFine/*_instanceIds.png) from the model's
    # "instances" output (COPS: MODEL.COPS.PREDICT_INSTANCES).
    cfg.TEST.INSTANCE_EVALUATION = False

    return cfg


def add_axial_resnet_config(cfg: CN) -> CN:
    """Add ``MODEL.AXIAL_RESNET``: the Axial-ResNet backbone (idempotent; returns ``cfg``).

    Use with ``MODEL.BACKBONE.NAME = "build_axial_resnet_backbone"``. Defaults: Axial-ResNet-50 as
    used by CMT-DeepLab (MaX-S without transformer blocks, GeLU; paper Sec. 3.4 and 4).
    """
    if "AXIAL_RESNET" in cfg.MODEL:
        return cfg
    cfg.MODEL.AXIAL_RESNET = CN()
    c = cfg.MODEL.AXIAL_RESNET
    # Blocks in res2..res5: [3, 4, 6, 3] = Axial-ResNet-50; [3, 4, 24, 3] = Axial-ResNet-104.
    c.DEPTHS = [3, 4, 6, 3]
    # Inception stem: three 3x3 convs to (W, W, 2W) channels, the first with stride 2; no max-pool.
    c.STEM_WIDTH = 64
    # Bottleneck width f of res2, doubled per stage; block outputs are 4f (256..2048 at 64).
    # Smaller values give a same-code tiny model (e.g. 8 with STEM_WIDTH 8 for CPU tests).
    c.BASE_WIDTH = 64
    # Stages made of axial blocks. The first block of the first axial stage stays a strided
    # bottleneck (DeepLab2 MaX-S: axial attention only on inputs at stride >= 16).
    c.AXIAL_STAGES = ["res4", "res5"]
    # Axial block: first 1x1 conv to EXPANSION * f channels (MaX-S: 2).
    c.ATTENTION_BOTTLENECK_EXPANSION = 2.0
    # Attention query/key channels = KEY_EXPANSION * f, value (= output) channels =
    # VALUE_EXPANSION * f, per axis layer (MaX-S: 1 and 2).
    c.KEY_EXPANSION = 1.0
    c.VALUE_EXPANSION = 2.0
    # Attention heads (MaX-S: 8).
    c.NUM_HEADS = 8
    # Relative-position table covers distances up to MAX_SPAN - 1 (2 * MAX_SPAN - 1 rows); larger
    # distances share the end rows. 255 (DeepLab2) keeps attention fully position-resolved at
    # 1281x1281 (81 positions at stride 16, 41 at stride 32). Any input size works.
    c.MAX_SPAN = 255
    # Std of the truncated-normal init of the relative embeddings (DeepLab2: 1.0).
    c.RPE_INIT_STD = 1.0
    # Drop-path (stochastic depth) rate of the last block (paper: 0.2).
    c.DROP_PATH_RATE = 0.2
    # "linear": rate grows linearly over all blocks from 0 (first) to DROP_PATH_RATE (last);
    # "constant": every block uses DROP_PATH_RATE.
    c.DROP_PATH_SCHEDULE = "linear"
    # Norm of every conv and attention layer: "SyncBN" (paper: batch norm synchronised over all
    # replicas), "BN" (single process or CPU multi-process), "GN", "FrozenBN", "".
    c.NORM = "SyncBN"
    # "gelu" (CMT-DeepLab) or "relu" (original MaX-S / Axial-DeepLab).
    c.ACTIVATION = "gelu"
    # Epsilon of every batch norm (BN, SyncBN, FrozenBN) of the backbone. 1e-5 is PyTorch's default;
    # DeepLab2's checkpoints were trained with 1e-3: set 0.001 for weights converted by
    # tools/convert_deeplab2_checkpoint.py.
    c.BN_EPS = 1e-5
    # 1: res5 at stride 32; 2: res5 at stride 16 (MaX-S output stride 16), dilating its convs.
    c.RES5_DILATION = 1
    # Features returned (any of stem, res2..res5); strides 4, 8, 16, 32.
    c.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Zero-init the last norm's gamma in each residual branch (blocks start as act(shortcut)).
    c.ZERO_INIT_RESIDUAL = True
    # 0: train everything; 1: freeze the stem; k >= 2: also freeze res2..res<k> (as RESNETS).
    c.FREEZE_AT = 0
    return cfg



def add_cmt_config(cfg: CN) -> CN:
    """Add ``MODEL.CMT`` (CMT-DeepLab) and the mask-transformer input keys (idempotent).

    Defaults are the paper's (Sec. 3.4 and 4, "Implementation Details"); choices where the paper is
    silent are marked "(choice)". Also adds the Axial-ResNet keys.
    """
    add_axial_resnet_config(cfg)
    if "CMT" in cfg.MODEL:
        return cfg
    cfg.MODEL.CMT = CN()
    c = cfg.MODEL.CMT
    # N cluster centers (object queries) and their width.
    c.NUM_CLUSTERS = 128
    c.CENTER_DIM = 256
    # Heads of the decoder's axial attention and of the dual-path transformer layers' attention.
    c.NUM_HEADS = 8
    # The three parts after the backbone, each from its registry (MODEL.SEM_SEG_HEAD.NAME: "CMTHead").
    c.TRANSFORMER_DECODER_NAME = "CMTTransformerDecoder"
    c.PIXEL_DECODER_NAME = "CMTPixelDecoder"
    c.PREDICTOR_NAME = "MaXPredictor"
    # Widths of each dual-path transformer layer (MaX-DeepLab's): the bottleneck it works at, the
    # query / key depth (also of the assignment, eq. 6) and the value depth, over all heads.
    c.BOTTLENECK_DIM = 256
    c.KEY_DIM = 128
    c.VALUE_DIM = 256
    # M reference points per cluster center (eq. 9-10; paper: 8).
    c.NUM_POINTS = 8
    # Hidden width of the reference-mask MLP (eq. 9) (choice: MaX-DeepLab's FFN width; with it the
    # location parts cost 3.8M, Table 2c: 3.9M).
    c.REF_MLP_DIM = 2048
    # Center FFN width (MaX-DeepLab: 2048).
    c.FFN_DIM = 2048
    # Dual-path axial-transformer blocks at stage 5 (stride 32) and stage 4 (stride 16): 3 + 3.
    c.STAGE_BLOCKS = [3, 3]
    # Pixel decoder width at stride 8 and 4 (MaX-DeepLab's: 512, 256).
    c.DECODER_CHANNELS = [512, 256]
    # Depth of the pixel features and mask kernels of the final (stride-4) mask logits, also the
    # features the instance discrimination loss reads (MaX-DeepLab: 128).
    c.MASK_DIM = 128
    # Drop-path rate of the dual-path blocks (paper: 0.2), every block the same ("constant", DeepLab2's
    # MaX-DeepLab schedule beyond stride 16) or growing from 0 to it ("linear").
    c.DROP_PATH_RATE = 0.2
    c.DROP_PATH_SCHEDULE = "constant"
    # Norm and activation of the decoder ("SyncBN" on GPUs; "BN" for CPU or single process).
    c.NORM = "SyncBN"
    c.ACTIVATION = "gelu"
    # --- CMT layer components (Tab. 2): all False gives the MaX-DeepLab-style baseline ---------
    c.USE_CLUSTER_UPDATE = True        # Z^T Vp term of the center update (eq. 7)
    c.USE_ASSIGNMENT_RESIDUAL = True   # residual path S between assignments (eq. 6)
    c.USE_PIXEL_UPDATE = True          # F + Z Vc (eq. 8); else MaX's pixel-to-center attention
    c.USE_REFERENCE_MASK = True        # reference masks (eq. 9-10) and the mask approximation loss
    c.USE_COORD_CONV = True            # coord-conv on centers and pixels (eq. 11-12)
    # --- losses ---------------------------------------------------------------------------------
    c.PQ_WEIGHT = 3.0                  # PQ-style loss (MaX-DeepLab)
    c.PQ_ALPHA = 0.75                  # weight of matched clusters in the PQ-style loss (and of
                                       # its mask term, divided by NUM_CLUSTERS), as DeepLab2
    c.PQ_BETA = 0.25                   # weight of unmatched clusters (void class): DeepLab2's 1 - alpha
    c.MASK_ID_WEIGHT = 0.3             # mask-ID cross-entropy
    c.INSDIS_WEIGHT = 1.0              # instance discrimination
    c.INSDIS_TYPE = "pixel"            # "pixel" (eq. 14, CMT-DeepLab) or "instance" (MaX-DeepLab)
    c.INSDIS_TEMPERATURE = 0.3         # tau of eq. 14 (choice: MaX-DeepLab's 0.3)
    c.INSDIS_NUM_PIXELS = 4096         # |A| sampled pixels, size-balanced (paper: 4096)
    # Sampling bias towards small masks: a pixel's weight is area^-t (DeepLab2's Gumbel top-k sampling;
    # choice: its COCO value 1.5; its Cityscapes value 0.6).
    c.INSDIS_SAMPLE_TEMPERATURE = 1.5
    c.SEMANTIC_WEIGHT = 1.0            # auxiliary semantic segmentation loss
    c.MASK_APPROX_WEIGHT = 1.0         # mask approximation loss (eq. 13; paper: 1.0)
    c.DEEP_SUPERVISION = True          # losses on every CMT layer's clustering result
    c.SHARE_FINAL_MATCHING = True      # aux outputs reuse the final output's matching (choice)
    # Recursive Feature Network: stack the whole model twice, connected at stride 4, outputs averaged.
    c.RFN = False
    # Inputs are padded to a multiple of this (the backbone's stride).
    c.SIZE_DIVISIBILITY = 32
    # --- inference --------------------------------------------------------------------------------
    c.TEST = CN()
    c.TEST.MERGE = "mask"              # "mask" (mask-wise merging, paper default) or "pixel"
    c.TEST.THING_THRESHOLD = 0.7       # mask-wise merge: class confidence to keep a thing cluster
    c.TEST.STUFF_THRESHOLD = 0.5       # ... a stuff cluster
    c.TEST.CLASS_THRESHOLD = 0.7       # pixel-wise merge: one class confidence for every cluster
    c.TEST.PIXEL_THRESHOLD = 0.4       # mask probability for a pixel to belong to a cluster
    c.TEST.OVERLAP_THRESHOLD = 0.8     # mask-wise merge: fraction of a mask that must be free
    # Segments smaller than these (pixels at the network's input resolution) become void, after
    # either merge (DeepLab2's area limits: 400 / 6400 at 1281, 100 / 1600 at 641; 0 keeps all).
    c.TEST.THING_AREA_LIMIT = 100
    c.TEST.STUFF_AREA_LIMIT = 1600

    # Mask-transformer training crops (MaskTransformerPanopticMapper): the crop size (paper: 641 or
    # 1281) and the random scale of it (choice: MaX-DeepLab's [0.5, 1.5]).
    cfg.INPUT.IMAGE_SIZE = [641, 641]
    cfg.INPUT.MIN_SCALE = 0.5
    cfg.INPUT.MAX_SCALE = 1.5
    return cfg
