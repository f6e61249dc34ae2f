"""Distillation of the compressed student from the teacher (or a teacher ensemble) on synthetic samples."""

from kegnet.distill.ensemble import TeacherEnsemble
from kegnet.distill.losses import kd_loss, kd_step
from kegnet.distill.train import DistillResult, distill

__all__ = ["DistillResult", "TeacherEnsemble", "distill", "kd_loss", "kd_step"]
