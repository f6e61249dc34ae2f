"""Distillation of the compressed student from the teacher on synthetic samples."""

from kegnet.distill.losses import kd_loss
from kegnet.distill.train import DistillResult, distill

__all__ = ["DistillResult", "distill", "kd_loss"]
