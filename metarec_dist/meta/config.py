"""The root run config: one typed model per component, validated once, up front."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from metarec_dist.config import StrictModel
from metarec_dist.eval.full_ranking import EvalConfig
from metarec_dist.meta.step import MetaConfig
from metarec_dist.model.recommender import ModelConfig

METHODS = ("metarec", "uniform", "joint", "target_only")


class DataConfig(StrictModel):
    store: str = Field("store", description="the domain store: a local folder, or a URI every node can read "
                       "(s3://bucket/store, gs://...)")
    target: str = Field(..., description="the domain to recommend in")
    sources: list[str] = Field(default_factory=list, description="source domains (tasks)")
    limited_target_fraction: float = Field(1.0, gt=0, le=1, description="target users that keep training data")
    split_seed: int = Field(0, description="seed of the limited-target user sample")


class TrainConfig(StrictModel):
    seed: int = 0
    steps: int = Field(2000, ge=1, description="optimizer steps (meta-steps for metarec/uniform)")
    pretrain_steps: int = Field(0, ge=0, description="joint multi-source steps before the main phase")
    batch_size: int = Field(128, ge=1, description="sequences per batch (support and query alike)")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(100, ge=1, description="validate every this many steps")
    patience: int = Field(5, ge=1, description="stop after this many validations without improvement")
    selection_metric: str = Field("NDCG@10", description="validation metric for early stopping")
    codebook_reinit_every: int = Field(100, ge=0, description="re-initialise dead codewords (0: never)")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="the device of a one-process run (auto: CUDA when torch sees a GPU); Ray Train "
        "workers use the device Ray Train gives them (runner.use_gpu)"
    )
    tensorboard: bool = Field(False, description="also write TensorBoard event files to RUN_DIR/tensorboard")


class RunnerConfig(StrictModel):
    """Where the run executes (read by ``metarec_dist.distributed``; plain data here so the config is one tree)."""

    workers: int = Field(2, ge=1, description="Ray Train workers; 1 trains in this process, without Ray")
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto: GPUs when the cluster has them")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per worker")
    address: str | None = Field(None, description="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    storage_path: str | None = Field(
        None, description="where Ray Train keeps reports and checkpoints (default: inside the run directory); "
        "on a multi-node cluster, storage every node can see: a shared folder or a URI (s3://bucket/runs)"
    )
    collective_timeout_s: int = Field(
        300, ge=10, description="a collective (torch's, or Ray Train's barrier at each report) one worker "
        "never reaches fails after this; keep it above the time of one validation pass or checkpoint write"
    )
    startup_timeout_s: int = Field(
        300, ge=10, description="stop the run, naming the worker and what it waits on, when a worker is not "
        "training this long after the run (or a restart after a failure) began; generous for a first build "
        "of DeepSpeed's CPU op"
    )
    checkpoint_every: int = Field(50, ge=0, description="checkpoint every this many meta-steps (0: never)")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from, each from the last checkpoint")
    shard_target_rows_from: int | None = Field(
        1_000_000, ge=1, description="split the target's item table by rows over the workers (each holds "
        "its block and its optimizer state; a step gathers the rows it reads) when it has at least this many "
        "items and trains row-sparse (model.item_gradients); null: a replica in every worker"
    )
    shard_codebook_from: int | None = Field(
        16_384, ge=2, description="search the VQ codebook where it lives when its codebooks have at least this "
        "many codewords each, over more than one worker: each worker holds its codebooks' codewords and Adam "
        "state only, a step sends its items' sub-vectors to the owners and holds the codewords chosen (codes "
        "are then fixed per step, vq.codes per_step); below it, or null, every worker keeps a replica (cheaper "
        "while a step's items outnumber the codewords: docs/BENCHMARKS.md)"
    )
    zero_stage: Literal[0, 1, 2] | None = Field(
        0, description="DeepSpeed ZeRO stage of the shared encoder's engine (None: plain replicated Adam); 0 "
        "sums the encoder's gradients in the step's one all-reduce, 1-2 partition its optimizer state at the "
        "cost of DeepSpeed's own collectives (worth it for encoders far larger than the shipped ones)"
    )
    deepspeed_config: Path | None = Field(
        None, description="a DeepSpeed JSON config to start from (configs/deepspeed/); stage, optimizer and "
        "clipping are set by the runner"
    )


def target_table_is_split(runner: RunnerConfig, num_items: int, row_sparse: bool, workers: int) -> bool:
    """Whether the target's item table is split by rows over ``workers`` (``runner.shard_target_rows_from``):
    a row-sparse table only, from that many items on, over more than one worker."""
    threshold = runner.shard_target_rows_from
    return row_sparse and workers > 1 and threshold is not None and num_items >= threshold


def codebook_is_sharded(config: ExperimentConfig, workers: int) -> bool:
    """Whether the codebook is searched where it lives (``runner.shard_codebook_from``) over ``workers``."""
    threshold, model = config.runner.shard_codebook_from, config.effective_model
    return model.use_vq and workers > 1 and threshold is not None and model.vq.codewords >= threshold


class SearchDimension(StrictModel):
    """The values one setting is searched over: exactly one of the four kinds."""

    choice: list[Any] | None = Field(None, description="one of these values")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], uniformly in log space")
    randint: tuple[int, int] | None = Field(None, description="an integer in [low, high)")

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        given = [kind for kind in ("choice", "uniform", "loguniform", "randint") if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint")
        bounds = getattr(self, given[0])
        if given[0] == "choice" and not bounds:
            raise ValueError("choice: give at least one value")
        if given[0] != "choice" and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: low must be below high, got {list(bounds)}")
        if given[0] == "loguniform" and bounds[0] <= 0:
            raise ValueError(f"loguniform: low must be positive, got {bounds[0]}")
        return self

    def examples(self) -> list[Any]:
        """Values a trial may get, for checking them up front: the choices, or the two ends."""
        if self.choice is not None:
            return list(self.choice)
        low, high = self.uniform or self.loguniform or (self.randint[0], self.randint[1] - 1)
        return [low, high]


class TuneConfig(StrictModel):
    """``metarec-dist tune``: random search over ``space`` with ASHA stopping the worst trials early."""

    space: dict[str, SearchDimension] = Field(
        default_factory=dict, description="dotted setting (model.*, meta.*, train.*) -> the values to search"
    )
    trials: int = Field(8, ge=1, description="trials per method (--trials overrides)")
    grace_validations: int = Field(1, ge=1, description="validations every trial gets before it may be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: at each rung, the best 1/reduction_factor go on")
    seed: int = Field(0, description="seed of the search's random stream")


class ExperimentConfig(StrictModel):
    method: Literal["metarec", "uniform", "joint", "target_only"] = "metarec"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    meta: MetaConfig = MetaConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    runner: RunnerConfig = RunnerConfig()
    tune: TuneConfig = TuneConfig()
    output_dir: Path = Field(Path("runs"), description="run directories are created inside")

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        data = self.data
        if data.target in data.sources:
            raise ValueError(f"data.sources: the target '{data.target}' is also listed as a source")
        if len(set(data.sources)) != len(data.sources):
            raise ValueError("data.sources: a source is listed twice")
        if self.method != "target_only" and not data.sources:
            raise ValueError(f"data.sources: method '{self.method}' needs at least one source domain")
        if self.method == "target_only" and self.train.pretrain_steps:
            raise ValueError("train.pretrain_steps: target_only uses no sources; set it to 0")
        if self.method == "joint" and not self.train.pretrain_steps:
            raise ValueError("train.pretrain_steps: joint pre-trains on the sources for this many steps before "
                             "fine-tuning on the target; with 0 it would train on the target alone (set it > 0, "
                             "or use method target_only)")
        self._check_step_codes()
        metric, _, k = self.train.selection_metric.partition("@")
        if metric not in ("HR", "NDCG", "MRR") or (k and int(k) not in self.eval.ks if k.isdigit() else bool(k)):
            raise ValueError(
                f"train.selection_metric '{self.train.selection_metric}': use MRR or HR@K / NDCG@K "
                f"with K in eval.ks {list(self.eval.ks)}"
            )
        return self

    def _check_step_codes(self) -> None:
        """Codes found before a step (``vq.codes: per_step``, or a sharded codebook) quantize product
        sub-spaces of the items a batch reads; a sharded codebook's tasks hold different codewords."""
        sharded = codebook_is_sharded(self, self.runner.workers)
        if not sharded and not (self.effective_model.use_vq and self.model.vq.codes == "per_step"):
            return
        why = ("the codebook is searched where it lives (runner.shard_codebook_from; null keeps a replica)"
               if sharded else "model.vq.codes is per_step")
        if self.model.vq.kind != "product":
            raise ValueError(f"model.vq.kind: {why}, which needs kind product")
        if self.model.score_with != "continuous":
            raise ValueError(f"model.score_with: {why}, which needs score_with continuous")
        if sharded and (self.meta.center or self.meta.direction != "task_query"):
            raise ValueError(f"meta.center / meta.direction: {why}, where each worker holds other codewords; "
                             "use center false and direction task_query")

    @property
    def effective_model(self) -> ModelConfig:
        """target_only is SASRec on item ids: the method switches the codebook off."""
        if self.method == "target_only":
            return self.model.model_copy(update={"use_vq": False})
        return self.model
