"""One typed config tree for the jobs (train, evaluate, sweep): YAML files plus ``key.sub=value`` overrides.

Unknown keys and impossible values fail here, before any cluster work, with the dotted key in the message.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from lvpruning import PruningConfig
from lvpruning.config import check_schedule
from lvpruning.policies import AT_TOWER, METHODS, NONE, POLICIES, PYRAMID, TRAINING_FREE, get_policy
from lvpruning.region_focus import SKIPPED_LAYERS, TEMPERATURE, check_layers
from pipelines.stages import STAGES, Stage
from pipelines.storage import decode_utf8
from pipelines.toy.writer import VARIANTS, world_spec

TOY = "toy"  # the embedded default model and data: the toy world, built and cached locally
TOY_LAYERS = (0, 1, 2)  # decision modules after these of the toy model's 4 layers; 7B: see llava15_7b.yaml
# The toy world's decision modules: slim, 16 wide, one block of 2 heads (benchmarks/RESULTS.md, "Slim decision
# modules"); any other model starts from the paper's full-width modules (PruningConfig's defaults).
TOY_PRUNING = PruningConfig(layers=TOY_LAYERS, decision_dim=16, num_blocks=1, num_heads=2)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProcessorSection(_Strict):
    """Options of the model's own processor (``AutoProcessor.from_pretrained``'s keyword arguments), for training,
    evaluation and calibration alike; None keeps the checkpoint's. Qwen-VL resizes each image to between
    ``min_pixels`` and ``max_pixels`` pixels (multiples of 28 x 28 for the 7B/8B: one vision token each), which
    bounds its vision tokens, hence memory and FLOPs."""

    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> ProcessorSection:
        if (self.min_pixels is None) != (self.max_pixels is None):
            raise ValueError("min_pixels and max_pixels go together (the image processor's size takes both)")
        if self.min_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")
        return self

    def options(self) -> tuple[tuple[str, int], ...]:
        """The options that are set, as (name, value) pairs (what ``ModelSpec.processor_options`` holds)."""
        return tuple((k, v) for k, v in self.model_dump().items() if v is not None)


class ModelSection(_Strict):
    name_or_path: str = TOY  # "toy", an HF id (llava-hf/llava-1.5-7b-hf) or a local path
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    processor: ProcessorSection = ProcessorSection()


class DataSection(_Strict):
    train_json: str | None = None  # LLaVA instruction JSON; None with the toy model: the toy world's
    image_root: str | None = None  # local folder or s3://bucket/prefix; with the toy model: None, the toy world's
    max_length: int = Field(2048, gt=0)  # in tokens, after image expansion
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    toy_root: str = "./toy"  # the toy world's data and its cached base model
    toy_train_samples: int = Field(24000, gt=0)  # questions; up to 4 per scene, one conversation per scene
    toy_test_samples: int = Field(800, gt=0)
    toy_question_types: tuple[str, ...] | None = None  # None: the toy world's own (its spec's question_types)
    toy_variant: Literal[VARIANTS] = "default"  # the world and its toy model: pipelines.toy.base (e.g. "qwen_hires")
    seed: int = 0  # the sample order: a permutation of the records per epoch (pipelines.train.order)


class TrainSection(_Strict):
    stage: Literal[tuple(STAGES)] = "pruning"  # pipelines.stages; base: train all parameters (toy world only)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; caps epochs
    global_batch_size: int = Field(32, gt=0)
    micro_batch_size: int = Field(16, gt=0)  # per worker and step; the rest is gradient accumulation
    learning_rate: float = Field(1e-3, gt=0)  # the toy world's; the paper's 2e-6 is in llava15_7b.yaml
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (beta1, beta2), as HF's adam_beta1/adam_beta2
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(100, gt=0)  # optimizer steps
    gradient_checkpointing: bool = False  # recompute the decoder layers in backward (pruning: those after stage 0)
    init_from: str | None = None  # stage base: go on training this saved toy model instead of the initial weights

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"each of adam_betas must be in [0, 1), got {value}")
        return value


class RegionFocusSection(_Strict):
    """``train.stage: region_focus``: LRS-VQA's Region Focus Module (``lvpruning.region_focus``). ``layers``: the
    LLM's decoder layers ``l_1 < ... < l_K`` (0-based, the first >= 1) whose text-to-image attention the module's
    copies of ``[l_1 - 1, l_1, ..., l_K]`` learn; the score is ``l_K``'s. ``skipped``: the layers ``k`` (indices
    into ``layers``) left out of the loss, the reference's hard-coded ``{1, 2}``; the score's own ``K - 1`` may not
    be one. ``temperature``: tau of the image terms."""

    layers: tuple[int, ...] | None = None  # required by the stage; checked against the model's depth by resolve
    skipped: tuple[int, ...] = SKIPPED_LAYERS
    temperature: float = Field(TEMPERATURE, gt=0)

    @model_validator(mode="after")
    def _valid(self) -> RegionFocusSection:
        if self.layers is None:
            return self
        try:
            check_layers(self.layers)
        except ValueError as e:
            raise ValueError(f"region_focus.layers: {e}") from None
        K = len(self.layers)
        if self.layers == tuple(range(1, K + 1)):
            raise ValueError(
                f"region_focus.layers {list(self.layers)}: the module's copies of layers 0-{K} would be the LLM's own "
                "first layers, their logits the teacher's from the start: nothing to learn; leave a gap"
            )
        if any(k < 0 for k in self.skipped):
            raise ValueError(f"region_focus.skipped {list(self.skipped)}: indices into layers, >= 0")
        if K - 1 in self.skipped:
            raise ValueError(
                f"region_focus.skipped {list(self.skipped)} leaves out S_{K - 1}, the logits of layer "
                f"{self.layers[-1]} that the module scores with, so the score's layer would never be distilled: "
                "with the reference's skipped [1, 2] give 1 or at least 4 layers, or set region_focus.skipped"
            )
        return self


class ScalingSection(_Strict):
    # A count, or [min, max]: elastic, Ray Train starts (and restarts) with as many workers as fit in that range
    num_workers: int | tuple[int, int] = 2
    # Elastic only: how often Ray Train looks for room to grow back towards max (a restart from the last checkpoint)
    resize_check_s: float = Field(60.0, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)  # room for Ray Data preprocessing: benchmarks/RESULTS.md, "CPU defaults"
    deepspeed_config: str = "cluster/deepspeed/zero2_cpu.json"
    # How the workers' placement group spreads over nodes: PACK fills a node first; SPREAD puts them on different
    # nodes where it can, so that losing a node costs the fewest workers.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    resources_per_worker: dict[str, float] = {}  # custom node resources each worker needs, e.g. {accelerator_a100: 1}

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if not 0 < low <= high:
            raise ValueError(f"expected a positive count or [min, max] with 0 < min <= max, got {value}")
        return value

    @property
    def worker_counts(self) -> range:
        """Every worker count a run may get: one, or ``[min, max]``'s range."""
        value = self.num_workers
        return range(value, value + 1) if isinstance(value, int) else range(value[0], value[1] + 1)

    @field_validator("resources_per_worker")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = sorted({"CPU", "GPU", "memory"} & set(value))
        if builtin:
            raise ValueError(f"{builtin} are set by cpus_per_worker and use_gpu; name only custom resources here")
        if any(amount <= 0 for amount in value.values()):
            raise ValueError(f"each amount must be positive, got {value}")
        return value


class RunSection(_Strict):
    name: str = "lvpruning-toy"
    storage_path: str = "./runs"  # local folder or s3://bucket/prefix
    output_dir: str = "./outputs"  # exported decision modules: <output_dir>/<name>/<stage> (local)
    max_failures: int = Field(2, ge=0)  # worker failures restarted from the last checkpoint
    # Worker-group starts that time out (waiting RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s, for the resources:
    # autoscaled nodes coming up, a lost node replaced) before the run fails; -1: wait for ever.
    max_start_failures: int = Field(5, ge=-1)
    keep_checkpoints: int = Field(2, gt=0)


class MlflowSection(_Strict):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "lvpruning"


class BenchmarkData(_Strict):
    questions: str  # LLaVA question file (jsonl), local or s3://
    image_root: str  # local folder or s3://bucket/prefix
    annotations: str | None = None  # the benchmark's ground truth where it has its own (local)


def check_at_model_stages(methods: tuple[str, ...], where: str) -> None:
    """The methods evaluated at the model's decision-module stages cannot be those that start at the tower."""
    tower = [m for m in methods if m in AT_TOWER]
    if tower:
        raise ValueError(
            f"{tower} prune at the vision tower (their schedules start at layer -1), not at pruning.layers: list them "
            f"under {where}.at_own_layers with their layers, e.g. {{method: {tower[0]}, layers: [-1, 1], "
            "schedules: [[0.3, 0.1]]}"
        )


class OwnLayers(_Strict):
    """A method at its own stages (``layers``, zero-based decoder layers; -1 first: the vision tower), at each of
    its keep-ratio ``schedules``, with its own ``params`` (the policy's keyword arguments)."""

    method: str
    layers: tuple[int, ...]
    schedules: tuple[tuple[float, ...], ...]
    params: dict[str, float] = {}

    @model_validator(mode="after")
    def _valid(self) -> OwnLayers:
        if self.method not in TRAINING_FREE:
            raise ValueError(f"{self.method!r} is not a training-free method; choose from {list(TRAINING_FREE)}")
        if not self.layers or not self.schedules:
            raise ValueError(f"{self.method}: give its layers and at least one schedule")
        for schedule in self.schedules:
            check_schedule(self.layers, schedule, max(self.layers) + 2)  # the model's depth is checked later
        get_policy(self.method, params=self.params).check_layers(self.layers)  # parameters and stages fail here
        return self


class PyramidSection(_Strict):
    """LRS-VQA's pyramid (method ``lrs_vqa``, ``lvpruning.lrs_vqa``): its trained Region Focus Module (what
    ``train.stage: region_focus`` exports), evaluated once per ``keep_ratios`` (the share kept at each scoring
    round, coarsest first; one more round goes one level further down), with the coarsest tiled level
    ``base_long_side`` pixels on its long side (None: 3 tiles, the reference's 1008 = 3 x 336). The
    ``region_focus`` stage's job evaluates the module it exported (``region_focus`` left None)."""

    region_focus: str | None = None
    keep_ratios: tuple[tuple[float, ...], ...] = ((0.25, 0.25),)
    base_long_side: int | None = Field(None, gt=0)

    @field_validator("keep_ratios")
    @classmethod
    def _ratios(cls, value: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        for ratios in value:
            if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
                raise ValueError(f"one share in (0, 1] per scoring round, got {list(ratios)}")
        return value


class EvalSection(_Strict):
    benchmarks: tuple[str, ...] = ("toy",)
    schedules: tuple[tuple[float, ...], ...] = ((0.5, 0.3, 0.1),)
    methods: tuple[str, ...] = (NONE, "lvpruning", "random")
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(8, gt=0)
    num_actors: int = Field(2, gt=0)
    data: dict[str, BenchmarkData] = {}  # benchmark -> files
    toy_world: str | None = None  # a written toy world: fills data.toy and data.pope when they are not given
    modules: str | None = None  # trained decision modules (needed by method lvpruning)
    output_dir: str | None = None  # answers: <output_dir>/<setting>/<benchmark>.jsonl (local, resumable); None:
    # ./eval/<run.name>, ./eval/<run.name>-base for the base stage, so the two stages never share a folder
    max_questions: int | None = Field(None, gt=0)  # first N questions of each benchmark (smoke runs)
    use_gpu: bool = False  # one GPU per inference actor
    cpus_per_actor: float = Field(0.5, gt=0)  # 0.5 leaves a 2-CPU box room for the preprocessing tasks
    seed: int = 0  # the random policy's seed
    latency_batch_size: int = Field(16, gt=0)  # requests per timed generate call (pipelines.eval.latency)
    latency_warmup: int = Field(2, ge=0)  # rounds over all settings left out
    latency_repeats: int = Field(10, ge=0)  # rounds recorded (median, IQR); 0: no latency metrics

    at_own_layers: tuple[OwnLayers, ...] = ()  # methods at their own stages (the vision-tower methods: here)
    lrs_vqa: PyramidSection | None = None  # LRS-VQA's pyramid, beside the other settings in the same pass
    flops_image_size: tuple[PositiveInt, PositiveInt] | None = None  # (H, W) the TFLOPs assume (None: 672 x 672)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {[m for m in METHODS if m != PYRAMID]}")
        if PYRAMID in value:
            raise ValueError(f"{PYRAMID!r} is its own model, not a schedule at pruning.layers: set eval.lrs_vqa")
        check_at_model_stages(value, "eval")
        return value


class SearchSpace(_Strict):
    """What a sweep searches (Optuna, define-by-run: ``pipelines.sweep.space``). Ratios are fractions of the original
    vision tokens, sampled on a grid of ``ratio_step``."""

    layers: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))  # candidate stages
    tower_stage: bool = False  # True: each trial also draws whether its first module moves to the vision-tower
    # stage (-1, before decoder layer 0: an extension of the paper), e.g. [0, 2] -> [-1, 2]
    ratios: Literal["paper", "free"] = "paper"  # paper: [rho, rho - 0.2, rho - 0.4, ...]; free: one per stage
    rho: tuple[float, float] = (0.3, 0.7)  # paper: the range of rho
    rho_step: float = Field(0.2, ge=0)  # paper: the drop per stage
    free_range: tuple[float, float] = (0.05, 0.9)  # free: each stage's ratio, then sorted non-increasing
    ratio_step: float = Field(0.05, gt=0, le=1)
    num_blocks: tuple[int, ...] = (1, 2)  # decision-module shape (PruningConfig)
    num_heads: tuple[int, ...] = (2, 4)
    ffn_dim: tuple[int | None, ...] = (None,)  # None: twice the module's width
    decision_dim: tuple[int | None, ...] | None = None  # module widths (None in the list: full width C); None:
    # not searched, pruning.decision_dim
    learning_rate: tuple[float, float] | None = None  # log-uniform range; None: train.learning_rate

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        if not value:
            raise ValueError("give at least one candidate list of layers")
        for i, layers in enumerate(value):
            if not 1 <= len(layers) <= 4:
                raise ValueError(f"candidate {i} {list(layers)}: a sweep searches 1 to 4 stages")
            if min(layers) < 0 or any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(
                    f"candidate {i} {list(layers)}: layers must be non-negative and strictly increasing (the "
                    "vision-tower stage: sweep.space.tower_stage)"
                )
        return value

    @field_validator("num_blocks", "num_heads", "ffn_dim", "decision_dim")
    @classmethod
    def _choices(cls, value: tuple | None) -> tuple | None:
        if value is None:  # decision_dim only: not searched
            return value
        if not value or any(v is not None and v < 1 for v in value):
            raise ValueError(f"{list(value)}: give at least one choice, each a positive integer")
        return value

    @model_validator(mode="after")
    def _ratios(self) -> SearchSpace:
        def check(key: str, low: float, high: float) -> None:
            if not 0 < low <= high <= 1:
                raise ValueError(f"sweep.space.{key}: [{low}, {high}] must satisfy 0 < low <= high <= 1")
            on_grid = grid_range(low, high, self.ratio_step)
            if on_grid[0] > on_grid[1]:
                raise ValueError(
                    f"sweep.space.{key}: [{low}, {high}] holds no multiple of ratio_step {self.ratio_step}"
                )

        check("free_range", *self.free_range)
        if self.ratios == "paper":
            check("rho", *self.rho)
            for layers in self.layers:
                low, high = grid_range(*self.rho_range(len(layers)), self.ratio_step)
                if low > high:
                    raise ValueError(
                        f"sweep.space.rho: {list(self.rho)} leaves no rho for {len(layers)} stages ({list(layers)}): "
                        f"the last ratio rho - {self.rho_step} x {len(layers) - 1} must stay >= {self.ratio_step}"
                    )
        if self.learning_rate is not None and not 0 < self.learning_rate[0] <= self.learning_rate[1]:
            raise ValueError(f"sweep.space.learning_rate: {list(self.learning_rate)} must be 0 < low <= high")
        return self

    def rho_range(self, num_stages: int) -> tuple[float, float]:
        """The range of rho for ``num_stages`` stages (paper family): ``rho``, raised so that the last stage keeps
        at least ``ratio_step``."""
        return max(self.rho[0], round(self.rho_step * (num_stages - 1) + self.ratio_step, 6)), self.rho[1]


def grid_range(low: float, high: float, step: float) -> tuple[float, float]:
    """``[low, high]`` shrunk to multiples of ``step`` (Optuna's stepped floats need both ends on the grid)."""
    return round(math.ceil(low / step - 1e-9) * step, 6), round(math.floor(high / step + 1e-9) * step, 6)


class Baselines(_Strict):
    """Training-free methods on the sweep's frontier: evaluation-only trials at ``pruning.layers``."""

    methods: tuple[str, ...] = (NONE, *(m for m in TRAINING_FREE if m not in AT_TOWER))
    schedules: tuple[tuple[float, ...], ...] = ((0.7, 0.5, 0.3), (0.5, 0.3, 0.1), (0.3, 0.1, 0.05))
    at_own_layers: tuple[OwnLayers, ...] = ()  # one evaluation-only trial each, at its layers and schedules

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - {NONE, *TRAINING_FREE})
        if unknown:
            raise ValueError(f"{unknown} are not training-free methods; choose from {[NONE, *TRAINING_FREE]}")
        check_at_model_stages(value, "sweep.baselines")
        return value

    @model_validator(mode="after")
    def _schedules(self) -> Baselines:
        if set(self.methods) - {NONE} and not self.schedules:
            raise ValueError("sweep.baselines.schedules: the pruning baselines need at least one schedule")
        return self


class Calibration(_Strict):
    """``sweep.objective: hidden_similarity``: VFlowOpt's label-free calibration of one method
    (``pipelines.sweep.calibration``).

    Each trial runs ``method`` at ``layers`` with searched ``params`` (the policy's keyword arguments, each a
    ``[low, high]`` range) and keep ratios (each stage's in ``ratio_range`` where the budget stays reachable, the
    last one solved so that the vision tokens kept, averaged over the decoder layers, are ``budget`` of the
    image's) on ``num_questions`` unlabeled questions (the first human turns of the training
    data, sampled with ``seed``); the objective is the mean cosine similarity of the last prompt token's final
    hidden state with and without pruning. ``lvpruning`` calibrates the inference ratios of ``eval.modules``.
    With ``evaluate``, each trial is also scored on the labelled benchmarks, to compare the two choices."""

    method: str = "vflowopt"
    layers: tuple[int, ...] | None = None  # None: the method's published layers on the model (lvpruning: its modules')
    budget: float = Field(0.3, gt=0, le=1)
    params: dict[str, tuple[float, float]] = {}
    ratio_range: tuple[float, float] = (0.1, 1.0)
    ratio_step: float = Field(1 / 64, gt=0, le=1)  # the ratios' grid (the toy world's 64 tokens: one token)
    num_questions: int = Field(32, gt=0)
    batch_size: int = Field(16, gt=0)
    evaluate: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _valid(self) -> Calibration:
        if self.method not in POLICIES:
            raise ValueError(f"sweep.calibration.method: unknown {self.method!r}; choose from {list(POLICIES)}")
        for name, (low, high) in self.params.items():
            if low > high:
                raise ValueError(f"sweep.calibration.params.{name}: [{low}, {high}] is empty")
        trained = POLICIES[self.method].trained
        if trained and self.params:
            raise ValueError(f"sweep.calibration.params: {self.method} has no parameters to calibrate, only its ratios")
        if not trained:  # unknown parameter names fail now
            policy = get_policy(self.method, params={k: low for k, (low, _) in self.params.items()})
            if self.layers is not None:
                policy.check_layers(self.layers)
        low, high = self.ratio_range
        if not 0 < low <= high <= 1:
            raise ValueError(f"sweep.calibration.ratio_range: {list(self.ratio_range)} must lie within (0, 1]")
        return self


class SweepSection(_Strict):
    """``jobs/sweep.py``: Ray Tune over the search space, multi-objective (``accuracy/mean`` up, ``tflops`` down), or
    with ``objective: hidden_similarity`` a label-free calibration of one method (``calibration``)."""

    space: SearchSpace = SearchSpace()
    num_trials: int = Field(8, gt=0)  # searched LVPruning configurations (the baselines come on top)
    concurrency: int = Field(2, gt=0)  # trials at once; each trains with the ``scaling`` section's workers
    infer_shifts: tuple[float, ...] = (0.2, -0.2)  # extra schedules per trial: its own ratios + shift (no retraining)
    guard_metric: Literal["ratio_loss", "lm_loss", "loss"] = "ratio_loss"  # ASHA's (README: why not lm_loss)
    grace_steps: int = Field(20, gt=0)  # ASHA's one rung: the optimizer step where a lagging trial stops
    reduction_factor: float = Field(1.25, gt=1)  # stops the worst 1 - 1/reduction_factor there (1.25: a fifth)
    guard_min_trials: int = Field(4, ge=0)  # ASHA stops nothing before this many trials reached its rung
    baselines: Baselines = Baselines()
    objective: Literal["accuracy", "hidden_similarity"] = "accuracy"
    calibration: Calibration = Calibration()
    seed: int = 0


class JobConfig(_Strict):
    model: ModelSection = ModelSection()
    pruning: PruningConfig = TOY_PRUNING
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    mlflow: MlflowSection = MlflowSection()
    eval: EvalSection = EvalSection()
    sweep: SweepSection = SweepSection()
    region_focus: RegionFocusSection = RegionFocusSection()

    @model_validator(mode="before")
    @classmethod
    def _pruning(cls, data: Any) -> Any:
        """A pruning section fills in from the defaults of its model: the toy world's (``TOY_PRUNING``) for the toy
        model, else the paper's full-width modules; a section that names no layers keeps ``TOY_LAYERS``."""
        if not isinstance(data, dict) or not isinstance(data.get("pruning", {}), dict):
            return data
        model = data.get("model") or {}
        name = model.get("name_or_path", TOY) if isinstance(model, dict) else model.name_or_path
        defaults = TOY_PRUNING.to_dict() if name == TOY else {"layers": list(TOY_LAYERS)}
        return {**data, "pruning": PruningConfig.from_dict({**defaults, **data.get("pruning", {})})}

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        t = self.train
        for workers in self.scaling.worker_counts:  # the global batch stays fixed at every count an elastic run gets
            per_step = t.micro_batch_size * workers
            if t.global_batch_size % per_step:
                raise ValueError(
                    f"train.global_batch_size {t.global_batch_size} is not a multiple of train.micro_batch_size x "
                    f"{workers} workers = {per_step} (scaling.num_workers {self.scaling.num_workers})"
                )
        if self.stage.exports_model and self.model.name_or_path != TOY:
            raise ValueError(f"train.stage {t.stage!r} trains all parameters and exists for the toy world only")
        if t.init_from is not None and not self.stage.exports_model:
            raise ValueError("train.init_from continues a toy base model: it needs train.stage 'base'")
        if t.stage == "region_focus":
            if self.region_focus.layers is None:
                raise ValueError("train.stage 'region_focus' trains the module of region_focus.layers: give them")
            if t.gradient_checkpointing:
                raise ValueError(
                    "train.gradient_checkpointing: stage 'region_focus' runs the frozen LLM without gradients and "
                    "only the module's K layers with them; turn it off"
                )
        if self.data.toy_question_types is not None:
            world_spec(self.data.toy_variant, self.data.toy_question_types)  # unknown types fail here, named
        for schedule in self.eval.schedules:
            self.pruning.check_ratios(schedule)
        return self

    @property
    def stage(self) -> Stage:
        """The training stage ``train.stage`` names (``pipelines.stages``)."""
        return STAGES[self.train.stage]

    @property
    def stage_run_name(self) -> str:
        """The run's name for this stage's checkpoints and answers: ``run.name``, ``<run.name>-base`` for the base."""
        return self.stage.run_name(self.run.name)

    @property
    def answers_dir(self) -> str:
        """Where the evaluation writes its answers: ``eval.output_dir``, else ``./eval/<stage_run_name>``."""
        return self.eval.output_dir or f"./eval/{self.stage_run_name}"

    def gradient_accumulation_steps(self, workers: int) -> int:
        """Micro-batches per worker and optimizer step at ``workers`` workers: the global batch stays fixed."""
        return self.train.global_batch_size // (self.train.micro_batch_size * workers)

    def flat(self) -> dict[str, Any]:
        """The resolved config as ``section.key -> value`` (for MLflow params)."""
        out: dict[str, Any] = {}
        for section, values in json.loads(self.model_dump_json()).items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override {dotted}: {key} is not a section")
    tree[leaf] = value


def _load_yaml(text: str, where: str) -> Any:
    """``text`` as YAML; else ``ValueError`` naming ``where`` (a file, an override), the line and the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ValueError(f"{where}{at}: not valid YAML ({problem})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Read a YAML config (or the embedded defaults) and apply ``key.sub=value`` overrides (YAML-typed)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        tree = _load_yaml(decode_utf8(path.read_bytes(), str(path)), str(path)) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        _set(tree, key.strip(), _load_yaml(raw, f"override {item!r}"))
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        problems = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise ValueError("invalid config: " + "; ".join(problems)) from None
