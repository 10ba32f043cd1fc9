"""Typed, validated configuration: one pydantic model per section.

Every model forbids unknown keys, so a typo such as `train.max_step` fails
before any work with a message that names the key (see `loader.py`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stablediff.config.finetune import EarlyStoppingConfig, FinetuneConfig
from stablediff.config.metrics import check_computed, check_eval_metrics, check_evaluable, check_metric_name
from stablediff.run_schema import metric_mode


def _check_groups(channels: list[int], groups: int, section: str) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(
            f"{section}.block_out_channels {channels} must all be multiples of "
            f"{section}.norm_num_groups ({groups}); {bad} are not"
        )


UNET_PRESETS: dict[str, dict] = {
    "tiny": {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4,
             "norm_num_groups": 8, "layers_per_block": 1},
    "digits": {"block_out_channels": [64, 128, 128],
               "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
               "attention_head_dim": 8, "norm_num_groups": 32, "layers_per_block": 1},
    # The Stable Diffusion 1.5 UNet (860M parameters with a 768-wide text encoder).
    "sd15": {"block_out_channels": [320, 640, 1280, 1280],
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
             "attention_head_dim": 8, "norm_num_groups": 32, "layers_per_block": 2},
}
VAE_PRESETS: dict[str, dict] = {
    "tiny": {"block_out_channels": [8, 16], "norm_num_groups": 8, "layers_per_block": 1},
    "digits": {"block_out_channels": [16, 32, 64], "norm_num_groups": 16, "layers_per_block": 1},
    "sd15": {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "layers_per_block": 2},
}


def _with_preset(data: object, presets: dict[str, dict]) -> object:
    """Fill the keys a preset defines, unless the config gives them explicitly."""
    if isinstance(data, dict) and data.get("preset") is not None:
        name = data["preset"]
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        return {**presets[name], **data}
    return data


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: str = "builtin:digits"
    resolution: int = Field(32, ge=8, description="side of the square training images, in pixels")
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0, description="share of captions replaced by '' (for CFG)")
    max_reject_fraction: float = Field(0.05, ge=0.0, le=1.0)
    held_out_fraction: float = Field(
        0.05, ge=0.0, le=0.5, description="share of data.source's samples held out for the validation loss "
        "and the autoencoder's report, chosen by content hash (the same ones every run); 0: none. The "
        "built-in digits keep their fixed 20% split")
    validation_source: str | None = Field(
        None, description="a second source (any spec data.source takes) whose images are the held-out set; "
        "then nothing of data.source is held out (for sets too small to split)")
    max_aspect: float = Field(20.0, ge=1.0, description="longer side / shorter side past which an image is "
                              "rejected (reason max_aspect) before it is decoded or resized")
    allow_outside_paths: bool = Field(False, description="let a table's image paths (parquet, arrow, "
                                      "metadata.jsonl/csv) be absolute or leave the dataset's folder with ..")
    caption_policy: Literal["error", "empty", "filename"] = Field(
        "error", description="a sample without a caption: reject it, use '', or use the file name")
    limit: int | None = Field(None, ge=1, description="use only the first N training samples (quick runs)")
    flip_probability: float = Field(0.0, ge=0.0, le=1.0, description="horizontal flip augmentation")
    caption_shuffle_variants: int = Field(
        1, ge=1, le=64, description="tag-shuffled versions of each comma-separated caption (1: no shuffle)")
    keep_tokens: int = Field(0, ge=0, description="leading tags that shuffling keeps in place (kohya)")
    cache_dir: str | None = Field(None, description="feature cache folder (default RUN_DIR/features); "
                                  "share it between runs to encode each image once")
    buckets: Literal["auto"] | list[tuple[int, int]] | None = Field(
        None, description="aspect-ratio buckets: off (null), 'auto' (kohya-style, area <= resolution²), "
        "or [width, height] pairs, sides multiples of 8 x the VAE downscale; a batch holds one bucket")
    crop: Literal["center", "random"] = Field(
        "center", description="crop after resizing to cover the bucket; random crops are cached per variant")
    crop_variants: int = Field(1, ge=1, le=64, description="random crops encoded and cached per image "
                               "(cached latents cannot be re-cropped); needs crop: random when > 1")
    num_workers: int | None = Field(None, ge=0, description="processes decoding and validating images "
                                    "(default min(4, CPU cores); 0: in the main process)")

    @model_validator(mode="after")
    def _crop_variants_need_random_crop(self) -> "DataConfig":
        if self.crop_variants > 1 and self.crop != "random":
            raise ValueError(f"data.crop_variants = {self.crop_variants} needs data.crop: random "
                             "(a centre crop is the same every time)")
        if isinstance(self.buckets, list) and (not self.buckets or min(min(b) for b in self.buckets) < 8):
            raise ValueError("data.buckets: give at least one [width, height] pair, sides 8 pixels or more, "
                             "or 'auto'")
        return self

    def holds_out_images(self) -> bool:
        """Whether a run has held-out images to validate on (the digits' train split has its fixed 20%)."""
        fixed_split = self.source == "builtin:digits" or self.source.startswith("builtin:digits?")
        return fixed_split or self.held_out_fraction > 0 or self.validation_source is not None


class TextEncoderConfig(Section):
    name: str = Field("minilm", description="'minilm' (the bundled all-MiniLM-L6-v2) or a local folder")
    max_length: int = Field(16, ge=2, le=512, description="tokens per caption, padded/truncated")


class VAEConfig(Section):
    enabled: bool = Field(True, description="false: a pixel-space model (the UNet denoises images, no VAE)")
    preset: Literal["tiny", "digits", "sd15"] | None = Field(
        None, description="architecture preset; explicit keys given next to it win")
    pretrained: str | None = Field(None, description="a local diffusers folder with a trained VAE")
    block_out_channels: list[int] = [32, 64, 64]
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    train_steps: int = Field(600, ge=0)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)

    _apply_preset = model_validator(mode="before")(classmethod(lambda cls, data: _with_preset(data, VAE_PRESETS)))

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> "VAEConfig":
        _check_groups(self.block_out_channels, self.norm_num_groups, "vae")
        return self


class UNetConfig(Section):
    preset: Literal["tiny", "digits", "sd15"] | None = Field(
        None, description="architecture preset; explicit keys given next to it win")
    diffusers_config: str | None = Field(
        None, description="a diffusers UNet2DConditionModel config.json; replaces the shape keys below "
        "(in/out channels, sample size and cross-attention width still follow the VAE and text encoder)")
    block_out_channels: list[int] = [64, 128, 128]
    layers_per_block: int = Field(1, ge=1)
    down_block_types: list[str] = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    up_block_types: list[str] = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(32, ge=1)

    _apply_preset = model_validator(mode="before")(classmethod(lambda cls, data: _with_preset(data, UNET_PRESETS)))

    @model_validator(mode="after")
    def _consistent_blocks(self) -> "UNetConfig":
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"unet.down_block_types and unet.up_block_types need one entry per "
                f"unet.block_out_channels ({n}); got {len(self.down_block_types)} and "
                f"{len(self.up_block_types)}"
            )
        _check_groups(self.block_out_channels, self.norm_num_groups, "unet")
        return self


class NoiseConfig(Section):
    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0)
    rescale_zero_terminal_snr: bool = Field(
        False, description="rescale betas so the last timestep is pure noise (Lin et al. 2023); use v_prediction")


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=0)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    weight_decay: float = Field(0.01, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "rmsprop", "sgd"] = Field(
        "adamw", description="training/optim.py; prodigy wants learning_rate 1.0 (it finds the step size)")
    decay_norms_and_biases: bool = Field(False, description="weight decay also on biases, norms and embeddings")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="adamw, adamw8bit, prodigy")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="adamw, adamw8bit, prodigy")
    adam_epsilon: float = Field(1e-8, gt=0, description="adamw, adamw8bit, prodigy")
    momentum: float | None = Field(None, ge=0, lt=1, description="sgd (default 0.9) and rmsprop (default 0)")
    nesterov: bool = Field(False, description="Nesterov momentum for sgd")
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    snr_gamma: float = Field(5.0, gt=0, description="gamma of min-SNR weighting (Hang et al. 2023)")
    noise_offset: float = Field(0.0, ge=0, description="offset noise strength (0.05-0.1 typical; 0 off)")
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    ema_half_life_images: float | None = Field(
        None, gt=0, description="EMA by half-life in images (EDM); replaces ema_decay when set")
    ema_warmup: bool = Field(True, description="ramp the EMA decay up over the first steps")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step; "
                                             "each micro-batch holds batch_size samples")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast dtype; fp16 adds a dynamic grad scaler")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory")
    compile: bool = Field(False, description="torch.compile the UNet (slow first steps, faster after)")
    channels_last: bool = Field(False, description="NHWC memory layout for the UNet (faster convs on GPUs)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the local GPU when there is one")
    validate_every: int | None = Field(
        None, ge=1, description="steps between validation losses on the held-out split (val_loss)")
    validation_timesteps: int = Field(5, ge=1, le=100, description="fixed timesteps of the validation loss")
    eval_every: int | None = Field(
        None, ge=1, description="steps between evaluations of train.eval_metrics (a checkpoint is saved there)")
    eval_metrics: list[str] = Field([], description="what each evaluation computes: any of fd, kid, adherence, "
                                    "bpd, clip (run_schema.METRIC_MODES; val_loss is validate_every's)")
    eval_samples: int = Field(100, ge=2, description="images generated per evaluation (fd, kid, adherence, clip) "
                              "or held-out images scored (bpd); the same seeds at every evaluation")
    tensorboard: bool = Field(True, description="also write TensorBoard events to RUN_DIR/tb")
    log_every: int = Field(25, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")

    @model_validator(mode="after")
    def _optimizer_keys_fit_optimizer(self) -> "TrainConfig":
        if self.momentum is not None and self.optimizer not in ("sgd", "rmsprop"):
            raise ValueError(f"train.momentum applies to train.optimizer sgd or rmsprop, not "
                             f"{self.optimizer!r}: remove it, or choose one of those")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("train.nesterov needs train.optimizer: sgd with train.momentum above 0 "
                             "(the default 0.9 will do)")
        return self


class GuardConfig(Section):
    """Divergence guard: skip bad steps, roll back to the last good checkpoint when they repeat."""

    enabled: bool = True
    spike_factor: float = Field(10.0, gt=1, description="a loss above this x the running median is a spike")
    window: int = Field(50, ge=3, description="good losses in the running median")
    min_history: int = Field(20, ge=1, description="good steps before spikes are judged")
    max_events: int = Field(3, ge=1, description="bad steps within `within_steps` that trigger a rollback")
    within_steps: int = Field(50, ge=1)
    lr_factor: float = Field(0.5, gt=0, le=1, description="LR multiplier applied at each rollback")
    max_rollbacks: int = Field(3, ge=0, description="rollbacks before the run stops with an error")
    skip_batches: int | None = Field(None, ge=0, description="batches skipped after a rollback (default: "
                                     "within_steps; always at least the steps back to the target)")


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1)
    every_seconds: float | None = Field(None, gt=0)
    keep_last: int = Field(3, ge=2, description="at least 2, so a torn newest still leaves one")
    keep_best: int = Field(1, ge=0)
    keep_every: int | None = Field(None, ge=1)
    replicas: list[str] = []
    best_metric: str | None = Field(None, description="what keep_best and the best mark (eval.json, --best) rank "
                                    "by, in its direction from run_schema.METRIC_MODES; default: "
                                    "early_stopping.metric (val_loss unless set)")

    def ranked_by(self, early_stopping: EarlyStoppingConfig) -> tuple[str, str]:
        """(metric, mode) the run's best checkpoint is chosen by."""
        metric = self.best_metric or early_stopping.metric
        return metric, metric_mode(metric)


class SampleConfig(Section):
    prompts: list[str] = [f"a handwritten digit {w}" for w in
                          ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    per_prompt: int = Field(8, ge=1)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    seed: int = 0
    every_steps: int | None = Field(None, ge=1, description="steps between sample grids in RUN_DIR/samples")


class RunConfig(Section):
    seed: int = 0
    run_dir: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    finetune: FinetuneConfig | None = Field(None, description="present in fine-tune configs (`stablediff finetune`)")

    @property
    def instance_prompt(self) -> str | None:
        """The caption of every training and held-out image of a DreamBooth or textual-inversion fine-tune
        (finetune.instance_prompt), which replaces the data's own captions; None otherwise."""
        return self.finetune.instance_prompt if self.finetune is not None else None

    @field_validator("seed")
    @classmethod
    def _seed_non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("seed must be 0 or positive")
        return value

    @model_validator(mode="after")
    def _ranked_metrics_are_computed(self) -> "RunConfig":
        train, early = self.train, self.early_stopping
        check_eval_metrics(train.eval_metrics, train.eval_every)
        check_evaluable(train.eval_metrics, not self.vae.enabled, self.data.holds_out_images())
        watched = [("early_stopping.metric", early.metric)] if early.patience is not None or \
            early.metric != "val_loss" else []
        if self.checkpoint.best_metric is not None:
            watched.append(("checkpoint.best_metric", check_metric_name(self.checkpoint.best_metric,
                                                                        "checkpoint.best_metric")))
        for key, name in watched:
            check_computed(name, key, train.validate_every, train.eval_every, train.eval_metrics)
        return self

    @model_validator(mode="after")
    def _validation_needs_held_out_images(self) -> "RunConfig":
        if self.train.validate_every and not self.data.holds_out_images():
            raise ValueError(f"train.validate_every = {self.train.validate_every} needs held-out images, but "
                             "data.held_out_fraction is 0 and there is no data.validation_source; give "
                             "data.validation_source (a folder of validation images), raise "
                             "data.held_out_fraction, or unset train.validate_every")
        return self
