"""The paper's settings (STMN, ICCV 2021, and its official training script).

This file is the single source of truth for every setting; dataset configs and the words after
the colon (`configs/mars.py:baseline,smoke`) only override fields defined here.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.arg = ""

  # ---------------------------------------------------------------- dataset
  config.dataset = ml_collections.ConfigDict()
  # Registered reader name: mars, dukev, lsvid, ilidsvid, prid2011, synthetic.
  config.dataset.name = "synthetic"
  # Root folder of the native on-disk layout (see data_pipelines/readers).
  config.dataset.root = ""
  # MARS gallery: "official" (all test tracklets but pid -1, queries included) or
  # "torchreid" (test minus query).
  config.dataset.protocol = "official"
  # iLIDS-VID / PRID2011 split index (0..9).
  config.dataset.split_id = 0
  # Keep pid 0 distractors in the gallery (MARS, DukeV).
  config.dataset.distractors = True
  # Model selection: hold out this many training identities as a validation split
  # (the paper's protocol: 125 of MARS's 625). 0: every training id trains (the official run;
  # then train.select_on is "test" or "none").
  config.dataset.num_val_ids = 0
  config.dataset.num_val_queries = 200
  # Synthetic benchmark knobs (data_pipelines/synthetic); filled by configs/synthetic.py.
  config.dataset.synthetic = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- input pipeline
  config.data = ml_collections.ConfigDict()
  config.data.height = 256
  config.data.width = 128
  config.data.seq_len = 6  # L: frames per training clip (RRS chunks).
  config.data.num_ids_per_batch = 8  # P
  config.data.num_tracklets_per_id = 4  # K (drawn with replacement, as the official code)
  config.data.prefer_cross_camera = False
  config.data.flip_prob = 0.5  # horizontal flip, once per tracklet
  config.data.erasing_prob = 0.5  # random erasing, per frame
  config.data.erasing_area = (0.02, 0.4)
  # Aspect ratio h / w of an erased box, U(r1, 1 / r1) with r1 = 0.3: the Random Erasing paper's
  # (Zhong et al.) setting, as the official STMN code's and torchreid's RandomErasing (upper
  # bound 1 / 0.3 = 3.333). torchvision's RandomErasing default (0.3, 3.3) is not any of these.
  config.data.erasing_aspect = (0.3, 1 / 0.3)
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  # Where frames come from: "files" (the reader's paths) or "tfds" (a prepared TFDS builder).
  config.data.source = "files"
  config.data.tfds_data_dir = ""
  config.data.eval_batch_size = 32  # clips per eval batch (global)
  config.data.shuffle_buffer = 256
  config.data.prefetch = 2
  config.data.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE
  # Decode every frame a run reads before any work starts (files source; results remembered
  # per dataset under frame_check_cache, default ~/.cache/stmn_jax/frame_check, so later runs
  # start at once and only new or changed frames are decoded again).
  config.data.check_frames = True
  config.data.frame_check_cache = ""

  # ---------------------------------------------------------------- model
  config.model = ml_collections.ConfigDict()
  config.model.name = "stmn"  # registry name: stmn, drsa, sta
  config.model.preset = "stmn"  # the config word that set the flags below
  config.model.depth = 50  # ResNet depth: 18, 34, 50
  config.model.width = 1.0  # width multiplier; memories' D follows the backbone channels
  config.model.last_stride = 1
  # Paper: standard ResNet stem (conv-BN-ReLU-maxpool). Official code: no ReLU (False).
  config.model.stem_relu = True
  # Local torchvision ResNet state dict (.pth / .npz / .safetensors); "" = random init.
  config.model.pretrained = ""
  config.model.spatial_memory = True
  config.model.temporal_memory = True
  config.model.spatial_slots = 10  # M
  config.model.temporal_slots = 5  # N
  # Paper: one query per location ("per_location"). Official code HEAD: channel-flattened
  # NCHW rows ("nchw_flat").
  config.model.smem_layout = "per_location"
  # Paper: true cosine similarity ("cosine"). Official code: keys normalised across memory
  # slots ("code").
  config.model.memory_similarity = "cosine"
  config.model.dtype = "float32"  # compute dtype; parameters stay float32
  # Running variance of every BatchNorm (backbone, BNNeck, memory read-out, DRSA's, STA's;
  # models/batch_norm.py): "biased" (Flax's; the default, the paper does not say) or "unbiased"
  # (PyTorch's, i.e. the official code: the batch variance times n / (n - 1), n rows per channel
  # and per ghost-BN group). Normalisation uses the biased variance either way.
  config.model.bn_running_var = "biased"
  # Ghost BatchNorm: BN groups in the GLOBAL batch, whatever the number of devices. 1 (paper):
  # statistics over the whole batch. Official: 3 (nn.DataParallel on 3 GPUs: the B tracklets cut
  # as torch.chunk, 32 -> 11/11/10, every BN of every model with its group's statistics). The
  # memory spread losses follow the same groups (per group, then averaged, as the official code).
  config.model.bn_groups = 1
  # Running statistics with bn_groups > 1: "mean_of_groups" (default: the mean over the groups of
  # their batch statistics) or "first_group" (official: DataParallel's replica 0 owns the
  # buffers, so only the first chunk updates them). No effect with bn_groups = 1.
  config.model.bn_running_stats = "mean_of_groups"
  # Bias vectors of the temporal memory's LSTM: 1 (paper: one bias per gate) or 2 (official:
  # nn.LSTM's bias_ih and bias_hh, each U(-k, k) and each trained with its own Adam moments;
  # same forward function of their sum).
  config.model.lstm_biases = 1
  config.model.drsa = ml_collections.ConfigDict()
  config.model.sta = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- losses
  config.loss = ml_collections.ConfigDict()
  config.loss.ce_weight = 1.0
  config.loss.label_smoothing = 0.0
  config.loss.triplet_weight = 1.0
  # Batch-hard triplet: soft margin (official code) when <= 0, else a hard margin.
  config.loss.triplet_margin = 0.0
  config.loss.spread_weight = 1.0  # memory spread loss; 0 turns it off
  config.loss.spread_margin = 0.3  # alpha

  # ---------------------------------------------------------------- optimiser
  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-4
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.weight_decay = 1e-5  # coupled L2, as torch.optim.Adam(weight_decay=...)
  config.optim.decay_every_epochs = 50
  config.optim.decay_factor = 0.1
  config.optim.num_epochs = 200
  # Steps per epoch; -1 derives it: each training identity visited once (floor(C / P)).
  config.optim.steps_per_epoch = -1

  # ---------------------------------------------------------------- training loop
  config.train = ml_collections.ConfigDict()
  config.train.log_every_steps = 20
  config.train.checkpoint_every_steps = 500
  config.train.keep_checkpoints = 3
  # Model selection (stmn_jax/selection.py; docs/FAITHFULNESS.md rows 1-2): the best of the
  # evaluations below is the checkpoint the final test scores (under config.eval's protocol).
  # Evaluate after e completed epochs for every e with (e + eval_epoch_offset) a multiple of
  # eval_every_epochs (0 <= offset < eval_every_epochs). Paper default: offset 0 (epochs 10, 20,
  # ...); official code: offset 2 (main.py scores before training its 1-based epochs 9, 19, ...,
  # 199, i.e. after 8, 18, ..., 198 completed epochs of 200).
  config.train.eval_every_epochs = 10
  config.train.eval_epoch_offset = 0
  # Also evaluate after the last epoch when the schedule misses it: True (default); the
  # official code: False (its final weights are never scored).
  config.train.eval_at_end = True
  # The split: "val" picks on the validation identities held out of the training ids
  # (dataset.num_val_ids > 0; paper). "test" picks on the test set (the official code; labelled
  # as such; with num_val_ids = 0 every training id trains, as the official run). "none": no
  # selection, the final weights are tested (needs num_val_ids = 0). "val" with
  # num_val_ids = 0 is a ConfigError.
  config.train.select_on = "val"
  # The metric: "mAP" (default) or "R1" (official code).
  config.train.select_metric = "mAP"
  # Equal scores: "first" keeps the earlier checkpoint (a new best must be strictly higher,
  # `>`; default) or "last" takes the later one (`>=`; official code).
  config.train.select_ties = "first"
  # Sampling of the selection evaluations: "eval" (as config.eval.sampling; default) or one of
  # its values; official code: "rrs" (one random clip per tracklet).
  config.train.select_sampling = "eval"
  # Horizontal-flip averaging of the selection evaluations: "eval" (as config.eval.flip;
  # default), "on" or "off" (official code).
  config.train.select_flip = "eval"

  # ---------------------------------------------------------------- evaluation
  config.eval = ml_collections.ConfigDict()
  # "all_frames": average the embeddings of every clip; "rrs": one clip per tracklet; "whole":
  # one attention pass over all frames of a tracklet (STA only: the backbone runs on padded,
  # masked chunks of config.model.sta.eval_chunk frames, as many frames per batch as a clip
  # batch of eval_batch_size x seq_len; other models raise an error).
  config.eval.sampling = "all_frames"
  config.eval.clips = "interleaved"  # all-frames clips: "interleaved" (STMN) or "consecutive"
  # Interleaved clips of a tracklet shorter than L: "last" repeats its last frame (default; the
  # paper does not say); "official" as the official main.py (n=3, L=6: 0 1 2 1 2 1).
  config.eval.short_padding = "last"
  config.eval.flip = True  # average clip embeddings with their horizontal flip (STMN test)
  config.eval.distance = "cosine"  # or "euclidean"
  config.eval.ap = "noninterp"  # or "matlab" (trapezoid)
  config.eval.rerank = False
  config.eval.max_rank = 20
  config.eval.checkpoint = "best"  # --mode=eval: "best" or "latest"

  # ---------------------------------------------------------------- figures (--mode=visualize)
  config.visualize = ml_collections.ConfigDict()
  config.visualize.seed = 0  # which tracklets, frames, locations and queries are drawn
  config.visualize.memory_tracklets = 32  # random tracklets whose clips address the memories
  config.visualize.num_tracklets = 3  # rows of the norm-change figure; per kind for the weights
  config.visualize.max_frames = 16  # frames shown per tracklet in the temporal-weights figure
  config.visualize.num_queries = 4  # random queries in the ranked-list figure
  config.visualize.topk = 10  # gallery tracklets per query (--topk overrides)
  config.visualize.visrank_queries = 100  # first queries exported to visrank/; -1: all
  return config


def _drsa_defaults(config: ml_collections.ConfigDict) -> None:
  """DRSA (CVPR 2018); values the spec marks unverified are documented in models/drsa.py."""
  config.model.last_stride = 2
  config.model.drsa.num_parts = 6  # K (paper; the snippet's default is 3)
  config.model.drsa.hidden = 64  # hidden units of a spatial attention model (snippet)
  config.model.drsa.part_dim = 128  # per-part reduction (snippet)
  # Paper: one hidden layer per part. Official snippet: one hidden layer shared by the parts.
  config.model.drsa.shared_hidden = False
  # Paper: 1x1 convs with biases. Official snippet: BatchNorm after both convs, no biases.
  config.model.drsa.attention_bn = False
  config.model.drsa.normalize_parts = True  # L2-normalise each reduced part (snippet)
  # The paper trains with OIM; here CE on scaled cosine logits ("cosine") or a plain "linear" head.
  config.model.drsa.classifier = "cosine"
  config.model.drsa.logit_scale = 30.0  # OIM's scalar in open-reid
  config.loss.diversity_weight = 1.0  # the paper's coefficient is unverified; the snippet uses 1
  # "paper": mean over frames of ||sqrt(S) sqrt(S)^T - I||_F^2; "code": the snippet's
  # sqrt(sum over the batch + 1e-5).
  config.loss.diversity_reduction = "paper"


def _sta_defaults(config: ml_collections.ConfigDict) -> None:
  """STA (AAAI 2019); values the spec marks unverified are documented in models/sta.py."""
  config.model.last_stride = 1
  config.model.stem_relu = True
  config.model.sta.num_stripes = 4
  config.model.sta.embed_dim = 1024
  # Paper: g = per-location squared norm, l1-normalised over locations, stripe score = sum.
  # "torchreid": the third-party reimplementation (L2 norm per location, L2-normalised map,
  # stripe score = mean).
  config.model.sta.attention = "paper"
  # Frames per backbone call when one pass attends over a whole tracklet (embed_all_frames).
  config.model.sta.eval_chunk = 32
  config.loss.interframe_weight = 3e-4
  config.loss.triplet_margin = 0.3
  config.data.seq_len = 4


# Hooks that a model name applies on top of the defaults (configs/common.apply_model_preset).
MODEL_DEFAULTS = {"drsa": _drsa_defaults, "sta": _sta_defaults}
