"""SimCLR pretraining of a base encoder: config, augmentations, NT-Xent, the network and the engine task."""
from advft.simclr.augment import apply_augment, draw_augment_params, simclr_views
from advft.simclr.config import (SECTIONS, PretrainConfig, PretrainEvalConfig, PretrainModelConfig,
                                 PretrainOptimConfig, SimCLRConfig, load_config, validate)
from advft.simclr.loss import gather_views, nt_xent, nt_xent_logits
from advft.simclr.model import ProjectionHead, SimCLRNet, build_optimizer, build_simclr, save_encoder
from advft.simclr.task import ENCODER_FILE, SimCLRTask, pretrain, probe_accuracy

__all__ = ["ENCODER_FILE", "SECTIONS", "PretrainConfig", "PretrainEvalConfig", "PretrainModelConfig",
           "PretrainOptimConfig", "ProjectionHead", "SimCLRConfig", "SimCLRNet", "SimCLRTask", "apply_augment",
           "build_optimizer", "build_simclr", "draw_augment_params", "gather_views", "load_config", "nt_xent",
           "nt_xent_logits", "pretrain", "probe_accuracy", "save_encoder", "simclr_views", "validate"]
