"""LoRA files from a fine-tune run's adapters: the kohya/A1111 layout (the default) and diffusers'.

A LoRA run's checkpoint holds peft's tensors as `unet.state_dict()` names them
(`unet/<module>.lora_A.default.weight`, `.lora_B...`, for DoRA
`.lora_magnitude_vector...`), optionally `text_encoder/<module>...` for a CLIP
text encoder LoRA and `ema/<module>...` for the adapters' moving average, and
the LoraConfig in meta `lora_config`. The same names without the adapter name
(`.default`), as diffusers and peft files have them, are read too.

kohya layout, what A1111, ComfyUI and diffusers all load (REFERENCE 1.2, 2.4):
`lora_unet_<module path, dots -> _>.lora_down.weight` (= peft lora_A),
`.lora_up.weight` (= lora_B) and `.alpha`, always written: every loader scales
by alpha / rank, and one without `.alpha` scales by 1, which is right only when
alpha == rank. The text encoder's modules are `lora_te_<CLIP module path>`; a
LoRA of our BERT/MiniLM text encoder has no kohya form (no tool has such a
text encoder) and is refused there: the merged and diffusers exports carry it.

diffusers layout: `pytorch_lora_weights.safetensors` in a folder, keys
`unet.<module>.lora_A.weight` and `text_encoder.<module>...`, the LoraConfig in
the metadata `lora_adapter_metadata` (what `save_lora_weights` writes), which is
where diffusers reads alpha from.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stablediff import run_schema as schema
from stablediff.checkpoint import LoadedCheckpoint
from stablediff.errors import CheckpointError
from stablediff.inference.lora import DIFFUSERS_LORA_FILE
from stablediff.models.lora_dropout import peft_keys
from stablediff.models.run_export import lora_tensors

LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights keeps the LoraConfig
TEXT_ENCODER = schema.TEXT_ENCODER  # the checkpoint's tensor group of a text encoder LoRA
KOHYA_PREFIX = {schema.UNET: "lora_unet", TEXT_ENCODER: "lora_te"}  # SD 1.x: one text encoder, `lora_te`
# peft's tensor names: <module>.<part>[.<adapter name>].weight
_PEFT_NAME = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(?:\.[^.]+)?\.weight")


@dataclass
class Adapter:
    """One LoRA'd module: its down (lora_A, (r, in[, k, k])) and up (lora_B, (out, r[, 1, 1])) matrices."""
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None  # DoRA's per-output-row magnitude

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4


@dataclass
class LoraWeights:
    """A checkpoint's adapters per component ("unet", "text_encoder"), with each component's LoraConfig."""
    modules: dict[str, dict[str, Adapter]] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)

    def alpha(self, component: str, adapter: Adapter) -> float:
        """The kohya `.alpha` that gives peft's scale: alpha / rank == lora_alpha / r (sqrt(r) with rsLoRA).
        With no LoraConfig recorded, alpha = rank (scale 1), which is what diffusers assumes then."""
        config = self.configs.get(component) or {}
        if "lora_alpha" not in config:
            return float(adapter.rank)
        alpha = float(config["lora_alpha"])
        return alpha * math.sqrt(adapter.rank) if config.get("use_rslora") else alpha


def group_adapters(tensors: dict[str, torch.Tensor], source: str) -> dict[str, Adapter]:
    """peft tensor names (with or without the adapter name) -> {module path: Adapter}."""
    modules: dict[str, Adapter] = {}
    for name, tensor in tensors.items():
        match = _PEFT_NAME.fullmatch(name)
        if not match:
            continue  # not an adapter tensor (a frozen base weight stored alongside)
        adapter = modules.setdefault(match["module"], Adapter())
        slot = {"lora_A": "down", "lora_B": "up", "lora_magnitude_vector": "magnitude"}[match["part"]]
        if getattr(adapter, slot) is not None:
            raise CheckpointError(f"{source} holds two LoRA adapters for {match['module']}; a LoRA file holds one. "
                                  "Export a checkpoint of a run with one adapter")
        setattr(adapter, slot, tensor)
    for module, adapter in modules.items():
        if adapter.down is None or adapter.up is None:
            raise CheckpointError(f"{source}: the LoRA of {module} has only its "
                                  f"{'lora_B' if adapter.down is None else 'lora_A'} matrix; the checkpoint is "
                                  "incomplete. Export another step (`stablediff ckpt list`)")
    return modules


def lora_weights(loaded: LoadedCheckpoint, ema: bool, source: str) -> LoraWeights:
    """The adapters to export: the EMA ones when asked and the checkpoint has them, else the trained ones."""
    unet = lora_tensors(loaded.tensors)
    ema_unet = {n: t for n, t in schema.unprefixed(schema.EMA, loaded.tensors).items() if "lora_" in n}
    text = {n: t for n, t in schema.unprefixed(TEXT_ENCODER, loaded.tensors).items() if "lora_" in n}
    if not unet and not text:
        raise CheckpointError(f"{source} has no LoRA weights (no unet/ or text_encoder/ tensors named lora_*): it "
                              "trained the full model. Export it with --format diffusers or --format single-file")
    weights = LoraWeights()
    if unet or ema_unet:
        weights.modules[schema.UNET] = group_adapters(ema_unet if ema and ema_unet else unet, source)
    if text:
        weights.modules[TEXT_ENCODER] = text_encoder_modules(group_adapters(text, source))
    config, te_config = schema.lora_configs(loaded.meta)
    # a text encoder LoRA without its own config was trained with the UNet's settings
    weights.configs = {schema.UNET: config or {}, TEXT_ENCODER: te_config or config or {}}
    return weights


def is_clip(modules) -> bool:
    """Whether adapted text-encoder module paths are CLIP's (`...self_attn.q_proj`, `...mlp.fc1`), not BERT's."""
    return all(".self_attn." in m or ".mlp." in m for m in modules)


def text_encoder_modules(modules: dict[str, Adapter]) -> dict[str, Adapter]:
    """transformers 5's CLIPTextModel has no `text_model.` level; every LoRA file's CLIP names have it."""
    if not is_clip(modules):
        return modules  # BERT's own paths (a diffusers-layout file; the kohya layout refuses them)
    return {m if m.startswith("text_model.") else f"text_model.{m}": a for m, a in modules.items()}


def kohya_state(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """`lora_unet_<module_>.lora_down.weight`, `.lora_up.weight` and `.alpha` (a 0-d float32 tensor)."""
    state: dict[str, torch.Tensor] = {}
    text = weights.modules.get(TEXT_ENCODER)
    if text and not is_clip(text):
        raise CheckpointError("this run trained LoRA adapters on its BERT/MiniLM text encoder; the kohya layout's "
                              "lora_te_ keys name CLIP's layers, so A1111 and ComfyUI have nothing to apply them to. "
                              "Export it with --format diffusers or single-file (adapters merged), or "
                              "--format lora-diffusers, and generate from the run directory itself "
                              "(`stablediff generate RUN_DIR`)")
    for component, modules in weights.modules.items():
        for module, adapter in modules.items():
            if adapter.magnitude is not None:
                # A1111 normalises a DoRA weight per input column and peft per output row (REFERENCE does not
                # settle how each loader reads `.dora_scale`), so the same file would give different images.
                raise CheckpointError(f"this run trained DoRA adapters ({module}); the kohya layout has no DoRA "
                                      "form that A1111, ComfyUI and diffusers read alike. Export it with "
                                      "--format lora-diffusers (diffusers loads DoRA from it)")
            name = f"{KOHYA_PREFIX[component]}_{module.replace('.', '_')}"
            state[f"{name}.lora_down.weight"] = adapter.down
            state[f"{name}.lora_up.weight"] = adapter.up
            state[f"{name}.alpha"] = torch.tensor(weights.alpha(component, adapter), dtype=torch.float32)
    return state


def diffusers_state(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`unet.<module>.lora_A.weight` ... and the metadata diffusers reads each component's LoraConfig from."""
    state: dict[str, torch.Tensor] = {}
    adapter_metadata: dict[str, object] = {}
    for component, modules in weights.modules.items():
        for module, adapter in modules.items():
            state[f"{component}.{module}.lora_A.weight"] = adapter.down
            state[f"{component}.{module}.lora_B.weight"] = adapter.up
            if adapter.magnitude is not None:
                state[f"{component}.{module}.lora_magnitude_vector.weight"] = adapter.magnitude
        config = peft_keys(weights.configs.get(component) or {})  # diffusers builds a LoraConfig from it
        if config:  # without it diffusers assumes alpha = r
            adapter_metadata |= {f"{component}.{k}": sorted(v) if isinstance(v, (set, tuple)) else v
                                 for k, v in config.items()}
    metadata = {LORA_METADATA_KEY: json.dumps(adapter_metadata, default=str)} if adapter_metadata else {}
    return state, metadata


def write_kohya_lora(loaded: LoadedCheckpoint, out: Path, source: str, ema: bool = True) -> Path:
    """The checkpoint's LoRA as one kohya/A1111-layout `.safetensors` file with ss_*/modelspec.* metadata."""
    weights = lora_weights(loaded, ema, source)
    state = kohya_state(weights)  # refusals first: the writer's imports load diffusers (seconds)
    from stablediff.finetune.lora_metadata import kohya_metadata
    from stablediff.models.single_file_pipeline import write_safetensors

    metadata = kohya_metadata(loaded.meta, weights, Path(out).stem, loaded.step)
    return write_safetensors(state, metadata, Path(out))


def write_diffusers_lora(loaded: LoadedCheckpoint, out: Path, source: str, ema: bool = True,
                         replace: bool = False) -> Path:
    """The checkpoint's LoRA as a folder holding `pytorch_lora_weights.safetensors`, as save_lora_weights writes."""
    from safetensors.torch import save_file

    from stablediff.models.atomic_output import folder

    state, metadata = diffusers_state(lora_weights(loaded, ema, source))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with folder(Path(out), replace) as tmp:
        save_file(tensors, tmp / DIFFUSERS_LORA_FILE,
                  metadata={"format": "pt", "stablediff.step": str(loaded.step), **metadata})
    return Path(out)


def load_lora_checkpoint(run_dir: Path, step: int | None = None, best: bool = False) -> LoadedCheckpoint:
    """A run's checkpoint for a LoRA export: `step`, the best (a fine-tune's default), or the newest that verifies.
    Unlike a pipeline export it needs no stage or config in the meta (hand-made checkpoints lack them)."""
    from stablediff.models.run_export import choose_step, open_run_store

    from stablediff.models.finetuned_run import is_finetune_run

    store, replicas = open_run_store(Path(run_dir))
    chosen = choose_step(store, step, best, Path(run_dir), prefer_best=is_finetune_run(run_dir))
    return store.load(chosen, fallbacks=replicas)


def run_lora_file(run_dir: Path) -> Path:
    """A fine-tune run's LoRA as a kohya file (`generate --lora RUN_DIR`): its best checkpoint's, written
    once into RUN_DIR/export (atomically, so a file that is there is whole) and reused after."""
    loaded = load_lora_checkpoint(run_dir)
    out = Path(run_dir) / "export" / f"step-{loaded.step:06d}-ema-lora.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_kohya_lora(loaded, out, f"{run_dir} step {loaded.step}")
    return out
