"""The `finetune` and `early_stopping` config sections (validated like every other section).

`finetune` is present only in fine-tune configs: its `base` names the model the
run starts from, and the architecture, noise schedule, prediction type and text
encoder then come from that base, not from the unet/vae/noise/text_encoder
sections (a key there that contradicts the base is an error: finetune/base.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# LoRA target presets: module-name suffixes in a diffusers UNet2DConditionModel (peft matches a target
# against the end of each module's dotted name). `conv` adds the ResNet and resampler convolutions: LoCon.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
CONVOLUTIONS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "proj_in", "proj_out")
LORA_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ATTENTION,
    "attn+ff": ATTENTION + FEED_FORWARD,
    "conv": ATTENTION + FEED_FORWARD + CONVOLUTIONS,
}
ALL_LINEAR = "all-linear"  # every nn.Linear of the UNet (resolved against the model: finetune/lora.py)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Section):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r (kohya's network_dim)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (the update is scaled by alpha / rank); "
                                "default: the rank (scale 1)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch's input (peft lora_dropout)")
    targets: Literal["attn", "attn+ff", "all-linear", "conv"] | list[str] = Field(
        "attn", description="which layers get adapters: a preset (attn = to_q/to_k/to_v/to_out.0; attn+ff adds the "
        "feed-forward; all-linear: every Linear; conv adds the ResNet convolutions = LoCon), or module-name suffixes")
    init: Literal["default", "gaussian"] = Field("default", description="peft's init: default (B = 0, A Kaiming) "
                                                 "or gaussian (A ~ N(0, 1/r))")
    dora: bool = Field(False, description="weight-decomposed LoRA (DoRA, Liu et al. 2024) as peft implements it")

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class FinetuneConfig(_Section):
    base: str = Field(description="the model to start from: a stablediff run directory (RUN_DIR, RUN_DIR@best, "
                      "RUN_DIR@latest or RUN_DIR@STEP), a diffusers StableDiffusionPipeline folder, or an SD 1.x "
                      ".safetensors single file")
    tokenizer: str | None = Field(None, description="a local CLIP tokenizer folder, for single files that have none")
    method: Literal["full", "lora", "textual_inversion"] = Field(
        "lora", description="full: every UNet weight trains (less the frozen ones); lora: peft adapters train, the "
        "base stays frozen; textual_inversion: only the embedding of a new token trains")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    freeze: list[str] = Field([], description="glob patterns of parameter names that do not train, e.g. "
                              "'down_blocks.*' or '*attn2*'")
    train_only: list[str] = Field([], description="glob patterns: only matching parameters train")
    instance_prompt: str | None = Field(None, description="the caption of every training image (and of the held-out "
                                        "ones), e.g. 'a photo of <my-dog> dog'; default: the data's own captions")
    token: str | None = Field(None, description="textual inversion: the new word, e.g. <my-style>")
    init_token: str | None = Field(None, description="textual inversion: an existing word whose embedding starts it")
    num_vectors: int = Field(1, ge=1, le=75, description="textual inversion: vectors of the new token")

    @model_validator(mode="after")
    def _textual_inversion_has_its_token(self) -> "FinetuneConfig":
        if self.method != "textual_inversion":
            if self.token is not None:
                raise ValueError("finetune.token is for method: textual_inversion; remove it or set the method")
            return self
        if not self.token or not self.init_token:
            raise ValueError("finetune.method textual_inversion needs finetune.token (the new word) and "
                             "finetune.init_token (an existing word to start from)")
        if self.freeze or self.train_only:
            raise ValueError("finetune.freeze/train_only choose UNet weights; textual inversion trains only the "
                             "token's embedding: remove them")
        return self


class EarlyStoppingConfig(_Section):
    metric: str = Field("val_loss", description="a metric the run's checkpoints carry (val_loss needs "
                        "train.validate_every)")
    mode: Literal["min", "max"] = Field("min", description="min: lower is better (losses); max: higher is better")
    patience: int | None = Field(None, ge=1, description="evaluations without an improvement before the run stops "
                                 "(null: never stop early; the best checkpoint is still marked)")
    min_delta: float = Field(0.0, ge=0.0, description="an improvement must beat the best by more than this")


def check_early_stopping(early: EarlyStoppingConfig, validate_every: int | None) -> None:
    if early.patience is not None and early.metric == "val_loss" and not validate_every:
        raise ValueError("early_stopping.patience needs the metric computed: set train.validate_every (the steps "
                         "between validation losses), or leave early_stopping.patience unset")
