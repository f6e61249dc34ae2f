"""Validated pipeline configuration, with the paper's settings and our faster default as presets.

Every field has bounds: a job spec comes from a stranger over HTTP and must not be able to ask for an
unbounded amount of compute or memory.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["kegnet", "gaussian", "uniform", "tucker-only"]
RankMethod = Literal["evbmf", "fraction", "explicit", "ratio"]
Preset = Literal["fast", "paper"]
# Class codes the generators are asked for while the student learns (kegnet/generation/codes.py).
CodeScheme = Literal["one_hot", "simplex", "pairs", "sparse"]

# Teachers in one job: each costs a forward pass per step in every stage, and memory.
MAX_TEACHERS = 8

# Module names, with globs; ``/`` appears in the names of ONNX graphs converted by onnx2torch, ``-`` in
# torchvision's RegNets ("trunk_output.block2.block2-0").
LayerPattern = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.*?/\[\]-]+$")]
Rank = Annotated[int, Field(ge=1, le=65_536)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GeneratorConfig(_Strict):
    """KegNet generator/decoder training (Yoo et al. 2019, Section 3)."""

    num_generators: int = Field(5, ge=1, le=16, description="ensemble size; each has its own seed")
    noise_dim: int = Field(10, ge=1, le=256)
    steps: int = Field(300, ge=1, le=200_000, description="optimizer steps per generator")
    batch_size: int = Field(256, ge=2, le=2048)
    lr: float = Field(1e-3, gt=0, le=1.0)
    alpha: float = Field(1.0, ge=0, le=1e3, description="weight of the decoder (noise reconstruction) loss")
    beta: float = Field(1.0, ge=0, le=1e3, description="weight of the diversity loss")
    smoothness: float = Field(1.0, ge=0, le=1e3, description="weight of a total-variation image prior (images)")
    activation: float | None = Field(
        None, ge=0, le=1e3,
        description="weight of rewarding strong penultimate teacher features (DAFL); "
                    "None: 0.1 for images, 0 for vectors (docs/benchmarks.md)",
    )
    batchnorm_prior: float = Field(
        0.1, ge=0, le=1e3,
        description="weight of matching the teacher's BatchNorm running statistics (DeepInversion); eval mode "
                    "only, nothing to match without BatchNorm (docs/benchmarks.md measures it)",
    )
    decoder_layers: int = Field(2, ge=1, le=3, description="hidden 120-unit layers in the decoder")
    teacher_mode: Literal["eval", "train"] = Field(
        "eval", description="eval: BatchNorm running stats, no dropout; train: the paper code's behaviour"
    )


# rank_method=ratio's aim when target_ratio is unset: a modest student (issue 21 measured it on the suite).
DEFAULT_TARGET_RATIO = 2.0


class CompressionConfig(_Strict):
    """Which layers to decompose and at what ranks."""

    layers: list[LayerPattern] | None = Field(
        None, max_length=256,
        description="module names or globs; default: every conv except the first, and every linear except the "
                    "head where linears hold more weights than those convs (ViTs, ConvNeXts, MLPs) or where the "
                    "global allocation places the ranks (rank_method ratio, the default)",
    )
    rank_method: RankMethod = Field(
        "ratio", description="ratio (default): the ranks that reach target_ratio; evbmf: each layer's rank estimated "
                             "from its weights' noise (on large trained layers it can keep almost nothing: 300x "
                             "students); fraction: one channel fraction; explicit: ranks per layer",
    )
    allocation: Literal["balanced", "global", "uniform"] = Field(
        "global", description="rank_method=ratio: global (default) loses the least spectral energy summed over "
                              "layers, may leave a layer whole, and keeps every rank at or above rank_floor "
                              "times the class count (on the suite's timm lcnet_050 teachers at 2.5x, 94.35 and "
                              "76.97 over three seeds against uniform's 78.81 and 43.76: docs/benchmarks.md, where "
                              "the ranks go); "
                              "uniform keeps one channel fraction in every layer; "
                              "balanced gives every layer's modes the same share of lost spectral energy",
    )
    rank_floor: float = Field(
        2.0, ge=0.0, le=16.0,
        description="allocation=global: no rank below this many times the class count, or where that cannot "
                    "reach the target, the highest floor that can; a layer too narrow for the floor (no rank at or "
                    "above it makes the layer smaller) has the class count as its floor instead of staying whole; "
                    "2 rather than 1 kept Fashion MobileNetV3-small's head at rank 20 and its no-options student "
                    "within 1.11 points instead of 7.01 (docs/benchmarks.md, no rank below twice the class count)",
    )
    rank_fraction: float = Field(0.5, gt=0, le=1.0, description="for rank_method=fraction")
    ranks: dict[LayerPattern, tuple[Rank, Rank]] = Field(
        default_factory=dict, max_length=256, description="(in_rank, out_rank) per layer, rank_method=explicit"
    )
    target_ratio: float | None = Field(
        None, gt=1.0, le=1000.0,
        description="whole-model ratio for rank_method=ratio; unset: 2x (a modest student, not a guess), or, where "
                    "the layers that can be factorized hold too few weights for 2x of the whole model, 2x of those "
                    "layers (the job warns); a ratio that is set and out of reach fails the plan",
    )
    n_iter_max: int = Field(100, ge=1, le=1000, description="HOOI iterations of partial_tucker")
    fit: Literal["weights", "outputs", "auto"] = Field(
        "auto", description="how factors start: weights = fit to the teacher's weights (HOSVD / truncated SVD); "
                            "outputs = then refit, layer by layer, to reproduce the teacher's layer outputs on "
                            "fit_samples synthetic samples while staying near its weights (methods with samples; "
                            "tucker-only keeps the weight fit); auto (default) = outputs only where the weight fit's "
                            "synthetic exam estimate is low (it lost what the teacher computes), kept if the "
                            "exam scores it at least as high",
    )
    fit_samples: int = Field(2048, ge=64, le=16384, description="synthetic samples for fit=outputs")
    keep_slower: bool | None = Field(
        None, description="keep factorizations that run slower than the layer they replace (measured on the "
                          "job's device at latency_batch); false: such layers are left as they are, and a job "
                          "where every layer ran slower fails; unset: as false, except that where every layer ran "
                          "slower they are all kept (a smaller student, not a faster one; the job warns)",
    )
    latency_batch: int = Field(1, ge=1, le=1024, description="batch size at which a factorization must not be "
                                                              "slower than the original layer")
    latency_tolerance: float = Field(
        0.05, ge=0.0, le=1.0, description="a factorization counts as not slower up to this relative margin "
                                          "(repeated timings of one layer vary by a few percent)",
    )
    latency_floor_ms: float = Field(
        0.02, ge=0.0, le=100.0,
        description="and up to this many milliseconds: below it two timings of a small layer cannot be told apart",
    )
    latency_repeats: int = Field(15, ge=3, le=1000, description="timed runs per latency measurement (the median "
                                                                 "is kept), within latency_budget_s")
    latency_budget_s: float = Field(2.0, gt=0, le=60.0, description="seconds one latency measurement may take")
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: also write student.int8.onnx, post-training static INT8 of student.onnx "
                            "calibrated on the job's synthetic samples (kegnet.compression.quantize); where no "
                            "layer is worth factorizing, the teacher itself is quantized instead of failing",
    )
    quantize_samples: int = Field(512, ge=64, le=8192, description="synthetic calibration samples (int8)")
    quantize_reduce_range: bool = Field(
        True, description="int8: weights in a 7-bit range, onnxruntime's advice for x86 CPUs without VNNI, whose "
                          "8-bit dot products can saturate: the int8 file runs on the user's CPU, whichever it is "
                          "(a LeNet-5 student lost 3.98 points to saturation with 8-bit weights on such a CPU, "
                          "none with 7; over ten bench runs 7 bits were better on four, 0.10-1.04 worse on "
                          "six; docs/benchmarks.md); false: the full 8-bit range (a CPU with VNNI or AMX)",
    )
    quantize_equalize: bool = Field(
        True, description="int8: also quantize a copy whose channels between the linear maps of each factorized "
                          "layer are brought to one range on the calibration samples (compensated in the next map: "
                          "the same fp32 function; kegnet.compression.equalization), and keep whichever int8 model "
                          "is closer to the teacher on the exam; never on Gaussian-noise calibration",
    )
    quantize_rounding: Literal["nearest", "adaptive"] = Field(
        "nearest", description="int8: how the kept model's weights are rounded to their steps: to the nearest "
                               "(onnxruntime's), or up or down so that each layer's output on the calibration "
                               "samples (run through the fp32 model to the layer) stays closest to the fp32 "
                               "layer's (AdaRound; kegnet.compression.rounding)",
    )
    quantize_bias_correction: bool = Field(
        False, description="int8: shift each quantized layer's bias so that its mean output per channel on the "
                           "calibration samples matches the fp32 model's (kegnet.compression.bias_correction)",
    )
    quantize_finetune_steps: int = Field(
        0, ge=0, le=5000,
        description="int8: first train a copy of the student this many steps on the job's synthetic samples with "
                    "its layers' inputs and weights rounded as the int8 model will round them (quantization-aware "
                    "fine-tuning, kegnet.compression.qat), and quantize the copy; 0: off. Only with the "
                    "generators' samples, never on Gaussian noise",
    )
    quantize_keep_slower: bool = Field(
        False, description="int8: keep student.int8.onnx even where it ran slower than the fp32 model on the worker's "
                           "CPU (for its size, or for hardware whose int8 kernels are faster than the worker's); the "
                           "agreement check still applies, and a warning gives both timings",
    )
    quantize_max_drop: float = Field(
        0.02, ge=0.0, le=1.0, description="int8: largest fall of agreement with the teacher (fp32 ONNX -> int8) "
                                          "on the synthetic exam samples the teacher is sure of (the whole exam "
                                          "where it is sure of too few) for which the int8 model is kept",
    )

    @model_validator(mode="after")
    def _explicit_needs_ranks(self) -> CompressionConfig:
        if self.rank_method == "explicit" and not self.ranks:
            raise ValueError("rank_method 'explicit' needs 'ranks', e.g. {\"conv3\": [8, 16]}")
        return self

    @property
    def ratio(self) -> float:
        """The whole-model ratio ``rank_method=ratio`` aims at: ``target_ratio``, or ``DEFAULT_TARGET_RATIO``."""
        return self.target_ratio if self.target_ratio is not None else DEFAULT_TARGET_RATIO


class Recipe(_Strict):
    """Where one candidate student's training samples come from: the KegNet generators asked for ``codes``
    with a ``noise_share`` of each batch drawn as Gaussian noise instead, or a noise baseline alone."""

    source: Literal["kegnet", "gaussian", "uniform"] = "kegnet"
    codes: CodeScheme = Field("pairs", description="kegnet only: the class-code scheme")
    noise_share: float = Field(0.0, ge=0.0, le=1.0, description="kegnet only: share of each batch that is noise")

    @property
    def name(self) -> str:
        """``gaussian``, ``uniform`` or ``kegnet/<codes>[+noise<share>]``: a candidate's name in the manifest."""
        if self.source != "kegnet":
            return self.source
        return f"kegnet/{self.codes}" + (f"+noise{self.noise_share:g}" if self.noise_share else "")


MAX_RECIPES = 12

# What ``label_codes: auto`` trains, chosen on the whole robustness suite (14 teachers trained on real data,
# docs/benchmarks.md "robustness suite"), never on one benchmark: the codes by class count (a uniform mix of
# all classes is far from every class when there are many: simplex lost 5 points at 20 classes and 36 at 26,
# where mixes of two classes held), and for vector inputs half of each batch Gaussian noise (it never hurt a
# tabular teacher and lifted letter by 4 points; on images it cost up to 7).
MANY_CLASSES = 10


def auto_recipe(image: bool, num_classes: int) -> Recipe:
    if image:
        return Recipe(codes="simplex" if num_classes <= MANY_CLASSES else "pairs")
    return Recipe(codes="sparse", noise_share=0.5)


class DistillConfig(_Strict):
    """Fine-tuning the compressed student on synthetic samples by distillation (Hinton et al. 2015).

    The teacher term is Hinton's: KL between the softened outputs at ``temperature`` times T², plus
    ``hard_label_weight`` times the cross-entropy on the generator's sampled labels (the labels it was asked
    to make). Optional terms: hints (``feature_weight``), relational KD (``rkd_*``), data-distortion
    self-distillation (``self_distill_*``); with several teachers, the ``ensemble_*`` fields.
    """

    steps: int = Field(1500, ge=0, le=500_000)
    batch_size: int = Field(256, ge=2, le=4096)
    lr: float = Field(1e-3, gt=0, le=1.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    temperature: float = Field(4.0, ge=0.1, le=100.0)
    hard_label_weight: float = Field(0.0, ge=0.0, le=100.0, description="cross-entropy on the sampled labels")
    transfer: Literal["fresh", "fixed"] = Field(
        "fresh", description="fresh samples every step, or a fixed transfer set (the paper)"
    )
    samples_per_generator: int = Field(6400, ge=64, le=200_000, description="size of a fixed transfer set")
    label_codes: CodeScheme | Literal["auto"] = Field(
        "auto",
        description="KegNet: the class codes the generators get while the student learns: one class (one_hot, "
                    "the paper) or mixes (simplex, pairs, sparse; kegnet/generation/codes.py), with noise_share; "
                    "auto: config.auto_recipe for the kind of input and the class count (chosen on the robustness "
                    "suite)",
    )
    recipes: list[Recipe] = Field(
        default_factory=list, max_length=MAX_RECIPES,
        description="candidate sample recipes: one student is trained from each (same generators, same "
                    "decomposition, distill.steps each) and the one with the best agreement with the teacher on "
                    "a common synthetic exam is kept; empty: one recipe, from method, label_codes and noise_share",
    )
    holdout_samples: int = Field(2048, ge=64, le=65_536,
                                 description="size of the synthetic exam used to select steps and recipes and to "
                                             "report confidence (never trained on)")
    mixup: float = Field(
        0.0, ge=0.0, le=1.0,
        description="share of each batch replaced by convex mixes of two synthetic samples (boundary samples)",
    )
    feature_weight: float | None = Field(
        None, ge=0.0, le=1000.0,
        description="weight of matching the outputs of the factorized layers to the teacher's (hints); unset: "
                    "1 where the student starts from the output refit (compression.fit), which the hints then "
                    "keep, and 0 after a weight fit (docs/benchmarks.md, issue 21)",
    )
    feature_decay: bool = Field(
        False,
        description="hints fall linearly from feature_weight to 0 over each fine-tuning pass: they hold the "
                    "start's layer outputs early and leave the last steps to the logits alone",
    )
    bn_stats_weight: float = Field(
        0.0, ge=0.0, le=1000.0,
        description="BatchNorm teachers: weight of pulling the student's BatchNorm input statistics on each "
                    "synthetic batch toward the teacher's running statistics (the real data's; DeepInversion's "
                    "distance); 0: off (on mnist-lcnet it cost 37 points at 0.1: docs/benchmarks.md, issue 21)",
    )
    adversarial_weight: float = Field(
        0.0, ge=0.0, le=100.0,
        description="KegNet only: keep training the generators during fine-tuning, toward samples where the "
                    "student disagrees with the teacher, with this weight (0: generators stay fixed)",
    )
    adversarial_lr: float = Field(1e-4, gt=0, le=1.0, description="generators' learning rate while fine-tuning")
    adversarial_share: float = Field(0.5, gt=0.0, le=1.0,
                                     description="share of each batch from the adversarially trained generators")
    noise_share: float = Field(
        0.0, ge=0.0, le=1.0, description="share of each student batch drawn as Gaussian noise instead (any sampler)",
    )
    trainable: Literal["all", "factorized"] = Field(
        "all", description="which of the student's parameters fine-tuning trains: all, or only the factorized "
                           "layers' (the layers left whole stay the teacher's own; within the seed spread of "
                           "all on the lcnet teachers: docs/benchmarks.md, the ONNX loss taken apart)",
    )
    student_dropout: bool = Field(
        False, description="keep the student's dropout layers active while it trains (off by default: "
                           "docs/benchmarks.md measures both)",
    )
    eval_every: int = Field(100, ge=1, le=100_000)
    select_best: bool = Field(True, description="keep the step with the best held-out synthetic agreement")
    retry_lr: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="when the first graded step falls below the start on the synthetic exam and on its samples "
                    "the teacher is sure of, stop there and fine-tune once more from the start at lr times this, "
                    "keeping its best step or the start (0: never); with select_best only (Fashion ResNet-18 in "
                    "docs/benchmarks.md)",
    )
    # Relational KD (Park et al. 2019, kegnet/distill/relational.py): the student keeps the teacher's
    # pairwise distances and triplet angles between samples, whatever the feature widths.
    rkd_distance_weight: float = Field(0.0, ge=0.0, le=1000.0,
                                       description="weight of the RKD distance loss (Huber on mean-normalized "
                                                   "pairwise distances)")
    rkd_angle_weight: float = Field(0.0, ge=0.0, le=1000.0,
                                    description="weight of the RKD angle loss (Huber on triplet angle cosines)")
    rkd_on: Literal["features", "logits"] = Field(
        "features", description="relations between penultimate features (the last Linear's input) or logits"
    )
    # Data-distortion guided self-distillation (Xu & Liu 2019, kegnet/distill/self_distill.py).
    self_distill_weight: float = Field(
        0.0, ge=0.0, le=100.0,
        description="weight of the symmetric KL between the student's outputs on two distorted views",
    )
    self_distill_mmd_weight: float = Field(
        0.0, ge=0.0, le=1000.0,
        description="weight of the squared linear MMD between the mean penultimate features of the two views",
    )
    distortion_strength: float = Field(
        0.5, ge=0.0, le=1.0,
        description="images: shifts up to round(4*s) px and noise std 0.2*s; vectors: noise std 0.2*s and "
                    "feature dropout 0.2*s",
    )
    # Several teachers (kegnet/distill/ensemble.py); with one teacher these change nothing.
    ensemble_weighting: Literal["mean", "entropy", "mc_dropout"] = Field(
        "mean", description="per-sample weights of the teachers' soft outputs: plain average, or from each "
                            "teacher's predictive entropy or MC-dropout variance (lower uncertainty, more weight)",
    )
    ensemble_temperature: float = Field(0.1, ge=1e-3, le=100.0,
                                        description="tau of the weights softmax(-uncertainty/tau); uncertainty "
                                                    "is normalized to [0, 1]")
    mc_dropout_passes: int = Field(8, ge=2, le=32, description="stochastic passes per teacher for mc_dropout")
    ensemble_student: Literal["first", "best"] = Field(
        "first", description="compress the first teacher, or the one agreeing best with the ensemble on "
                             "held-out synthetic samples",
    )

    @model_validator(mode="after")
    def _angles_need_triplets(self) -> DistillConfig:
        if self.rkd_angle_weight > 0 and self.batch_size < 3:
            raise ValueError("rkd_angle_weight needs batch_size >= 3 (angles are between triplets of samples)")
        return self


SequenceObjective = Literal["word", "sequence", "both"]


class SequenceConfig(_Strict):
    """Sequence models (``task: sequence``): the teacher's own generations as data, and the objectives of
    Kim & Rush (2016). The classifier sections (generator, distill) do not apply to them; ``compression``
    does (Linear layers by SVD, with its rank methods and target ratio).

    - ``word``: KL between teacher and student next-token distributions at ``temperature`` (times T²) on
      sequences the teacher sampled (``samples`` of them, at ``sample_temperature`` with top-k / top-p).
    - ``sequence``: cross-entropy on the teacher's beam-search outputs (beam ``beam_size``): each sampled
      prompt (up to ``sep_id``, or a random cut without one) completed by the teacher's beam search.
    - ``both``: ``word_weight`` · word + (1 − ``word_weight``) · sequence.
    The student is the teacher with ``student_layers`` of its blocks (all by default), then SVD to the target.
    The student kept is the step with the best agreement with the teacher's greedy outputs on ``holdout``
    generations the student never trained on.
    """

    objective: SequenceObjective = "both"
    word_weight: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0, le=20.0, description="word-level KD temperature")
    samples: int = Field(20_000, ge=64, le=500_000, description="teacher generations in the transfer set")
    sample_temperature: float = Field(1.0, gt=0.0, le=5.0)
    top_k: int = Field(0, ge=0, le=65_536, description="0: off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1: off")
    beam_size: int = Field(5, ge=1, le=16)
    length_penalty: float = Field(0.6, ge=0.0, le=5.0, description="GNMT alpha; 0: raw log-probability")
    holdout: int = Field(512, ge=16, le=20_000, description="held-out generations for model selection")
    generation_batch: int = Field(1024, ge=1, le=8192,
                                  description="rows (prompts × beams) decoded at once; lower it for a large "
                                              "vocabulary or long sequences (memory), raise it on a GPU (speed)")
    embedding_rank: int | None = Field(None, ge=1, le=65_536, description="factorize the token embedding "
                                                                          "(None: keep it)")
    student_layers: int | None = Field(None, ge=1, le=48, description="keep this many of the teacher's blocks, "
                                      "evenly spaced, first and last kept (None: all); fewer blocks decode faster")
    steps: int = Field(3000, ge=0, le=500_000)
    batch_size: int = Field(128, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    eval_every: int = Field(250, ge=1, le=100_000)


class ClassifierConfig(_Strict):
    """A classifier job (``task: classify``): everything the pipeline needs besides the teacher, its spec, a
    device and a seed."""

    task: Literal["classify"] = "classify"
    method: Method = "kegnet"
    preset: Preset = "fast"
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    export_portable: bool = Field(True, description="write a torch.export program of the student (student.pt2)")
    export_onnx: bool = Field(True, description="write an ONNX model of the student (student.onnx)")

    @model_validator(mode="after")
    def _recipes_fit_the_method(self) -> ClassifierConfig:
        kinds = {r.source for r in self.distill.recipes}
        if kinds and self.method == "tucker-only":
            raise ValueError("distill.recipes needs a method that fine-tunes the student (not tucker-only)")
        if "kegnet" in kinds and self.method != "kegnet":
            raise ValueError("kegnet recipes in distill.recipes need method 'kegnet' (the generators)")
        if len({r.name for r in self.distill.recipes}) < len(self.distill.recipes):
            raise ValueError("distill.recipes lists the same recipe twice")
        return self

    @model_validator(mode="after")
    def _int8_needs_onnx(self) -> ClassifierConfig:
        if self.compression.quantize == "int8" and not self.export_onnx:
            raise ValueError("compression.quantize 'int8' quantizes student.onnx: set export_onnx true")
        return self

    def candidate_recipes(self, image: bool, num_classes: int) -> list[Recipe]:
        """The recipes a job trains students from: ``distill.recipes``; else the method's noise; else
        ``label_codes`` with ``noise_share``, or for ``auto`` the ``auto_recipe`` for the input kind (``image``:
        C×H×W inputs) and class count."""
        if self.distill.recipes:
            return list(self.distill.recipes)
        if self.method == "tucker-only":
            return []
        if self.method in ("gaussian", "uniform"):
            return [Recipe(source=self.method)]
        if self.distill.label_codes == "auto":
            return [auto_recipe(image, num_classes)]
        return [Recipe(codes=self.distill.label_codes, noise_share=self.distill.noise_share)]

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: object) -> ClassifierConfig:
        """Build a config from a preset, then apply ``overrides`` (nested dicts merge into sections)."""
        base = PRESETS[preset]
        merged = base.model_dump()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        merged["preset"] = preset
        return cls.model_validate(merged)


class SequenceCompressionConfig(CompressionConfig):
    """A sequence job's factorization: the classifier's fields with the defaults its benchmark measured (issue
    13: EVBMF ranks; with ``rank_method: ratio``, one fraction in every layer). The classifier's defaults
    changed with issue 21 on classifier teachers only."""

    rank_method: RankMethod = "evbmf"
    allocation: Literal["balanced", "global", "uniform"] = "uniform"
    fit: Literal["weights", "outputs", "auto"] = "weights"


class SequenceJobConfig(_Strict):
    """A sequence-model job (``task: sequence``): the ``sequence`` section (generations and objectives), the
    Linear layers' factorization (``compression``: rank methods and target ratio) and the exports."""

    task: Literal["sequence"] = "sequence"
    compression: SequenceCompressionConfig = Field(default_factory=SequenceCompressionConfig)
    sequence: SequenceConfig = Field(default_factory=SequenceConfig)
    export_portable: bool = Field(True, description="write a torch.export program of the student (student.pt2)")

    @model_validator(mode="after")
    def _no_int8(self) -> SequenceJobConfig:
        if self.compression.quantize != "none":
            raise ValueError("compression.quantize is for classifiers; a sequence job takes 'none'")
        return self

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: object) -> SequenceJobConfig:
        """Presets are the classifier's; a sequence job takes the defaults (``fast``) with ``overrides``."""
        if preset != "fast":
            raise ValueError(f"preset {preset!r} is for classifier jobs; a sequence job takes 'fast' (the defaults)")
        return cls.model_validate(overrides)


# A job's config: one model per task, told apart by ``task`` (the spec's task; kegnet.config.config_for).
JobConfig = Annotated[ClassifierConfig | SequenceJobConfig, Field(discriminator="task")]
TASK_CONFIGS: dict[str, type[ClassifierConfig] | type[SequenceJobConfig]] = {
    "classify": ClassifierConfig, "sequence": SequenceJobConfig,
}


def config_for(task: str, preset: Preset = "fast", **overrides: object) -> ClassifierConfig | SequenceJobConfig:
    """The config of a ``task`` job: ``preset`` with ``overrides`` (nested dicts merge into sections), only the
    sections that task reads. Raises pydantic's ``ValidationError`` (a section of another task is refused)."""
    return TASK_CONFIGS[task].from_preset(preset, **overrides)


PRESETS: dict[str, ClassifierConfig] = {
    # Measured default (docs/benchmarks.md): diversity on, a smoothness prior and DAFL's activation reward
    # (digit-like samples, not textures), 300 generator steps, eval-mode teacher, fresh samples every step,
    # short cosine schedule.
    "fast": ClassifierConfig(),
    # The paper's MNIST settings and its code's behaviour (train-mode teacher, fixed transfer set).
    "paper": ClassifierConfig(
        preset="paper",
        generator=GeneratorConfig(
            num_generators=5, steps=20_000, batch_size=256, lr=1e-3, alpha=1.0, beta=0.0,
            smoothness=0.0, activation=0.0, batchnorm_prior=0.0, decoder_layers=1, teacher_mode="train",
        ),
        # The paper compresses its layers whatever their speed, at EVBMF ranks, from a weight fit.
        compression=CompressionConfig(keep_slower=True, rank_method="evbmf", fit="weights"),
        distill=DistillConfig(
            steps=40_000, batch_size=64, lr=1e-4, schedule="constant", temperature=1.0,
            transfer="fixed", samples_per_generator=6400, label_codes="one_hot", student_dropout=True,
            eval_every=100 * 10, retry_lr=0.0,
        ),
    ),
}
