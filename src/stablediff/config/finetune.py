"""The `finetune` and `early_stopping` config sections (validated like every other section).

`finetune` is present only in fine-tune configs: its `base` names the model the
run starts from, and the architecture, noise schedule, prediction type and text
encoder then come from that base, not from the unet/vae/noise/text_encoder
sections (a key there that contradicts the base is an error: finetune/base.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stablediff.config.metrics import default_mode

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
# Text-encoder LoRA targets, per encoder family: every Linear of the attention and of the MLP of each layer,
# kohya's default for the text encoder (networks/lora.py adapts all Linear children of CLIPAttention and
# CLIPMLP). BERT/MiniLM's are named differently; `output.dense` (the MLP's second Linear) also matches
# `attention.output.dense`, and the pooler, which the pipeline never reads, matches none of them.
TEXT_ENCODER_TARGETS: dict[str, tuple[str, ...]] = {
    "CLIP": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "BERT": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
}


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
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="kohya's rank dropout: in training, each rank "
                                "component of a LoRA branch is zeroed per sample with this probability, the kept "
                                "ones scaled by 1/(1-p)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="kohya's module dropout: in training, a layer's "
                                  "whole LoRA branch is skipped for a forward with this probability")

    @model_validator(mode="after")
    def _rank_dropout_is_for_plain_lora(self) -> "LoraSettings":
        if self.dora and self.rank_dropout:
            raise ValueError("finetune.lora.rank_dropout masks the ranks of a plain LoRA's down/up product; DoRA "
                             "normalises the whole update by its weight norm, so the two do not combine. Set "
                             "rank_dropout: 0 or dora: false (module_dropout works with both)")
        return self

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class TextEncoderLoraSettings(_Section):
    """LoRA adapters on the text encoder too (method lora), on the Linear layers of its attention and MLP
    (kohya's default); the captions are then encoded each step, with gradients, instead of read from the
    feature cache."""

    lora: bool = Field(False, description="also train LoRA adapters on the text encoder (with method lora)")
    learning_rate: float | None = Field(None, gt=0, description="the text encoder adapters' learning rate "
                                        "(kohya's text_encoder_lr); default: train.learning_rate")
    rank: int | None = Field(None, ge=1, le=1024, description="the text encoder adapters' rank; default: "
                             "finetune.lora.rank")
    alpha: float | None = Field(None, gt=0, description="their alpha; default: finetune.lora.alpha (when that is "
                                "unset too: this rank, scale 1)")

    def settings(self, unet: LoraSettings) -> LoraSettings:
        """The adapters' LoraSettings: this section's rank and alpha, the UNet's where unset (no dropout, no
        DoRA: the encoder runs in eval mode, and the kohya layout has no DoRA form)."""
        rank = self.rank if self.rank is not None else unet.rank
        alpha = self.alpha if self.alpha is not None else unet.alpha
        return LoraSettings(rank=rank, alpha=alpha)


class PriorSettings(_Section):
    """DreamBooth's prior preservation (Ruiz et al. 2023): images of the subject's class, captioned with the
    class prompt, train alongside the instance images so the model keeps what the class looks like."""

    class_prompt: str = Field(min_length=1, description="the caption of every class image, e.g. 'a photo of a dog'")
    class_data: str | None = Field(None, description="a source of class images (any spec data.source takes); "
                                   "or give num_class_images to have the base model generate them")
    num_class_images: int | None = Field(None, ge=1, description="class images the base model generates once "
                                         "(cached in RUN_DIR/class_images, seeded: image i from (seed, i))")
    loss_weight: float = Field(1.0, ge=0.0, description="the class samples' loss is multiplied by this (diffusers' "
                               "and kohya's prior_loss_weight)")
    steps: int = Field(25, ge=1, description="sampling steps of each generated class image")
    guidance_scale: float = Field(7.5, ge=0.0, description="classifier-free guidance of the generated class images")

    @model_validator(mode="after")
    def _one_source_of_class_images(self) -> "PriorSettings":
        if (self.class_data is None) == (self.num_class_images is None):
            raise ValueError("finetune.prior needs exactly one source of class images: class_data (a folder of "
                             "them) or num_class_images (that many generated by the base model)")
        return self


class FinetuneConfig(_Section):
    base: str = Field(description="the model to start from: a stablediff run directory (RUN_DIR, RUN_DIR@best, "
                      "RUN_DIR@latest or RUN_DIR@STEP), a diffusers StableDiffusionPipeline folder, or an SD 1.x "
                      ".safetensors single file")
    tokenizer: str | None = Field(None, description="a local CLIP tokenizer folder, for single files that have none")
    method: Literal["full", "lora", "textual_inversion"] = Field(
        "lora", description="full: every UNet weight trains (less the frozen ones); lora: peft adapters train, the "
        "base stays frozen; textual_inversion: only the embedding of a new token trains")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    text_encoder: TextEncoderLoraSettings = Field(default_factory=TextEncoderLoraSettings)
    freeze: list[str] = Field([], description="glob patterns of parameter names that do not train, e.g. "
                              "'down_blocks.*' or '*attn2*'")
    train_only: list[str] = Field([], description="glob patterns: only matching parameters train")
    instance_prompt: str | None = Field(None, description="the caption of every training image (and of the held-out "
                                        "ones), e.g. 'a photo of <my-dog> dog'; default: the data's own captions")
    prior: PriorSettings | None = Field(None, description="DreamBooth prior preservation (methods full and lora)")
    token: str | None = Field(None, description="textual inversion: the new word, e.g. <my-style>")
    init_token: str | None = Field(None, description="textual inversion: an existing word whose embedding starts it")
    num_vectors: int = Field(1, ge=1, le=75, description="textual inversion: vectors of the new token")

    @model_validator(mode="after")
    def _text_encoder_lora_with_method_lora(self) -> "FinetuneConfig":
        te = self.text_encoder
        if te.lora and self.method != "lora":
            raise ValueError(f"finetune.text_encoder.lora: true trains LoRA adapters on the text encoder, which "
                             f"needs finetune.method: lora (this config has {self.method!r}); set the method to "
                             "lora or remove finetune.text_encoder")
        unused = sorted(k for k in ("learning_rate", "rank", "alpha") if getattr(te, k) is not None)
        if unused and not te.lora:
            raise ValueError(f"finetune.text_encoder.{unused[0]} is set but finetune.text_encoder.lora is not "
                             "true, so no text encoder adapter trains; add finetune.text_encoder.lora: true or "
                             f"remove finetune.text_encoder.{unused[0]}")
        return self

    @model_validator(mode="after")
    def _textual_inversion_has_its_token(self) -> "FinetuneConfig":
        if self.method == "textual_inversion" and self.prior is not None:
            raise ValueError("finetune.prior (DreamBooth prior preservation) trains the UNet: use it with method "
                             "full or lora, or remove the prior section for textual inversion")
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


    @model_validator(mode="after")
    def _lora_dropouts_need_lora(self) -> "FinetuneConfig":
        if self.method != "lora" and (self.lora.rank_dropout or self.lora.module_dropout):
            raise ValueError(f"finetune.lora.rank_dropout and module_dropout act on LoRA adapters; method "
                             f"{self.method} trains none: remove them or set finetune.method: lora")
        return self


class EarlyStoppingConfig(_Section):
    metric: str = Field("val_loss", description="a metric the run computes (run_schema.METRIC_MODES): val_loss "
                        "needs train.validate_every, the others train.eval_every and train.eval_metrics")
    mode: Literal["min", "max"] | None = Field(
        None, description="min: lower is better; max: higher is better; default (and the only value allowed): "
        "the metric's own direction")
    _mode_from_metric = model_validator(mode="before")(classmethod(lambda cls, data: default_mode(data)))
    patience: int | None = Field(None, ge=1, description="evaluations without an improvement before the run stops "
                                 "(null: never stop early; the best checkpoint is still marked)")
    min_delta: float = Field(0.0, ge=0.0, description="an improvement must beat the best by more than this")

