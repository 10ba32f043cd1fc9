"""Typed, validated configuration: one pydantic model per section.

Every model forbids unknown keys, so a typo such as `train.max_step` fails
before any work with a message that names the key (see `loader.py`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _check_groups(channels: list[int], groups: int, section: str) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(
            f"{section}.block_out_channels {channels} must all be multiples of "
            f"{section}.norm_num_groups ({groups}); {bad} are not"
        )


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: str = "builtin:digits"
    resolution: int = Field(32, ge=8, description="side of the square training images, in pixels")
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0, description="share of captions replaced by '' (for CFG)")
    max_reject_fraction: float = Field(0.05, ge=0.0, le=1.0)
    caption_policy: Literal["error", "empty", "filename"] = Field(
        "error", description="a sample without a caption: reject it, use '', or use the file name")
    limit: int | None = Field(None, ge=1, description="use only the first N training samples (quick runs)")
    flip_probability: float = Field(0.0, ge=0.0, le=1.0, description="horizontal flip augmentation")
    caption_shuffle_variants: int = Field(
        1, ge=1, le=64, description="tag-shuffled versions of each comma-separated caption (1: no shuffle)")
    keep_tokens: int = Field(0, ge=0, description="leading tags that shuffling keeps in place (kohya)")
    cache_dir: str | None = Field(None, description="feature cache folder (default RUN_DIR/features); "
                                  "share it between runs to encode each image once")


class TextEncoderConfig(Section):
    name: str = Field("minilm", description="'minilm' (the bundled all-MiniLM-L6-v2) or a local folder")
    max_length: int = Field(16, ge=2, le=512, description="tokens per caption, padded/truncated")


class VAEConfig(Section):
    pretrained: str | None = Field(None, description="a local diffusers folder with a trained VAE")
    block_out_channels: list[int] = [32, 64, 64]
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    train_steps: int = Field(600, ge=0)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> "VAEConfig":
        _check_groups(self.block_out_channels, self.norm_num_groups, "vae")
        return self


class UNetConfig(Section):
    block_out_channels: list[int] = [64, 128, 128]
    layers_per_block: int = Field(1, ge=1)
    down_block_types: list[str] = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    up_block_types: list[str] = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(32, ge=1)

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


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=0)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    log_every: int = Field(25, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1)
    every_seconds: float | None = Field(None, gt=0)
    keep_last: int = Field(3, ge=2, description="at least 2, so a torn newest still leaves one")
    keep_best: int = Field(1, ge=0)
    keep_every: int | None = Field(None, ge=1)
    replicas: list[str] = []


class SampleConfig(Section):
    prompts: list[str] = [f"a handwritten digit {w}" for w in
                          ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    per_prompt: int = Field(8, ge=1)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    seed: int = 0


class RunConfig(Section):
    seed: int = 0
    run_dir: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    @field_validator("seed")
    @classmethod
    def _seed_non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("seed must be 0 or positive")
        return value
