"""KegNet sample generation (Yoo et al., NeurIPS 2019): generators, decoder, losses, samplers."""

from kegnet.generation.losses import decoder_loss, diversity_loss, smoothness_loss
from kegnet.generation.models import Decoder, ImageGenerator, VectorGenerator, make_generator
from kegnet.generation.samplers import KegNetSampler, NoiseSampler, Sampler
from kegnet.generation.train import train_generators

__all__ = [
    "Decoder", "ImageGenerator", "KegNetSampler", "NoiseSampler", "Sampler", "VectorGenerator",
    "decoder_loss", "diversity_loss", "make_generator", "smoothness_loss", "train_generators",
]
