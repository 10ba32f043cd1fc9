"""How AUTOMATIC1111 and ComfyUI decide which of a LoRA file's keys they load, for SD 1.x (REFERENCE 2.1, 2.2).

Re-expressed from the rules, not their code (GPL/AGPL): each loader is a
function (keys and shapes, the model's layers) -> LoaderReport, which names
every key the loader would load and every one it would drop, with the reason.
Both log a dropped key at most ("lora key not loaded"), so a LoRA that misses
half its layers looks like a weak LoRA: that is what `lora check` catches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from stablediff.finetune.lora_targets import LoraTargets

Shapes = dict[str, tuple[int, ...]]


@dataclass
class LoaderReport:
    loader: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why the loader drops it
    refused: str | None = None  # the loader rejects the whole file (nothing loads)

    @property
    def ok(self) -> bool:
        return not self.skipped and self.refused is None and bool(self.loaded)


def shape_problem(shapes: Shapes, key: str, part: str, weight: tuple[int, ...]) -> str | None:
    """Why a down/up matrix cannot apply to a layer with this weight shape (None if it can)."""
    shape = shapes[key]
    if part == "down" and (len(shape) < 2 or shape[1] != weight[1]):
        return f"its shape {shape} does not fit the layer's input width {weight[1]} (weight {weight})"
    if part == "up" and (len(shape) < 2 or shape[0] != weight[0]):
        return f"its shape {shape} does not fit the layer's output width {weight[0]} (weight {weight})"
    return None


# -- AUTOMATIC1111 (extensions-builtin/Lora) ---------------------------------------------------------------

_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
# network parts A1111's module types read: LoRA (up/down, kohya or peft names), LoHa, LoKr, full diff, norm
_A1111_TYPES = ({"lora_up.weight", "lora_down.weight"}, {"lora_A.weight", "lora_B.weight"},
                {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"lokr_w1", "lokr_w2"}, {"diff"},
                {"w_norm", "b_norm"})
_A1111_PARTS = set().union(*_A1111_TYPES) | {"lora_mid.weight", "alpha", "scale", "dora_scale", "bias", "hada_t1",
                                              "hada_t2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "diff_b"}


def _a1111_block(kind: str, rest: str) -> str:
    return _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest


def a1111_compvis_name(module: str) -> str:
    """A1111's rename of a kohya diffusers-named module to its ldm layer name (SD's 3 layers per block)."""
    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_input_blocks_"
         f"{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{_a1111_block(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_middle_block_"
         f"{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_a1111_block(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_output_blocks_"
         f"{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{_a1111_block(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_"
         f"{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m: f"diffusion_model_output_blocks_"
         f"{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_"
         f"{m[1]}_{m[2]}"),
    )
    for pattern, rename in rules:
        match = re.match(pattern, module)
        if match:
            return rename(match)
    return module


def _a1111_layers(targets: LoraTargets) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A1111's network_layer_mapping: ldm module path with `_` -> (our name of the layer, weight shape)."""
    layers = {f"diffusion_model_{ldm.replace('.', '_')}": (d, targets.unet[d]) for d, ldm in targets.ldm.items()}
    for module, shape in targets.text_encoder.items():
        layers[f"transformer_{module.replace('.', '_')}"] = (module, shape)
    return layers


def _a1111_find(module: str, layers: dict) -> str | None:
    candidates = [a1111_compvis_name(module)]
    if "lora_unet" in module:  # ldm-named kohya keys (SDXL style)
        candidates.append(module.replace("lora_unet", "diffusion_model"))
    if "lora_te1_text_model" in module:
        candidates += [module.replace("lora_te1_text_model", p) for p in ("0_transformer_text_model",
                                                                          "transformer_text_model")]
    return next((c for c in candidates if c in layers), None)


def a1111_report(shapes: Shapes, targets: LoraTargets) -> LoaderReport:
    report = LoaderReport("AUTOMATIC1111")
    layers = _a1111_layers(targets)
    by_module: dict[str, dict[str, str]] = {}  # layer -> {network part: key}
    for key in shapes:
        module, _, part = key.partition(".")  # the FIRST dot: a module name must have none
        if module.startswith("bundle_emb"):
            report.loaded.append(key)  # a bundled textual-inversion embedding
            continue
        layer = _a1111_find(module, layers)
        if layer is None:
            why = ("its module name has dots (A1111 splits a key at the first dot, so this is module "
                   f"{module!r}); A1111 reads kohya names such as lora_unet_..." if "." in part and module in
                   ("unet", "text_encoder", "transformer", "diffusion_model") else
                   f"no layer named {a1111_compvis_name(module)!r} in {targets.name}")
            report.skipped[key] = why
            continue
        by_module.setdefault(layer, {})[part] = key
    for layer, parts in by_module.items():
        if not any(t <= parts.keys() for t in _A1111_TYPES):
            report.refused = (f"A1111 refuses the whole file: no LoRA module type accepts the parts "
                              f"{sorted(parts)} of {layer} ('Could not find a module type')")
        _a1111_module(report, parts, layers[layer], shapes)
    return report


def _a1111_module(report: LoaderReport, parts: dict[str, str], layer: tuple, shapes: Shapes) -> None:
    _, weight = layer
    for part, key in parts.items():
        side = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up",
                "lora_B.weight": "up"}.get(part)
        problem = shape_problem(shapes, key, side, weight) if side else None
        if part not in _A1111_PARTS:
            report.skipped[key] = f"A1111's LoRA modules read no {part!r} part"
        elif problem:
            report.skipped[key] = problem
        else:
            report.loaded.append(key)


# -- ComfyUI (comfy/lora.py key maps, weight_adapter/lora.py suffixes) ------------------------------------

# (up, down) names of one LoRA's two matrices after a layer's base name, in the forms ComfyUI reads
COMFY_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
               (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
               (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
               (".lora_B.default.weight", ".lora_A.default.weight"))
COMFY_EXTRAS = (".alpha", ".dora_scale", ".reshape_weight", ".lora_mid.weight", ".diff", ".diff_b", ".set_weight",
                ".w_norm", ".b_norm", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
                ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(mlp\.fc[12]|self_attn\.(?:q|k|v|out)_proj)")


def _processor_form(module: str) -> str:
    """The old diffusers attention-processor name, the only diffusers UNet form ComfyUI maps."""
    name = module.replace(".to_", ".processor.to_")
    return name[:-2] if name.endswith(".to_out.0") else name


def comfy_key_map(targets: LoraTargets) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every base name ComfyUI accepts for a layer -> (our name of the layer, weight shape)."""
    names: dict[str, tuple[str, tuple[int, ...]]] = {}
    for module, ldm in targets.ldm.items():
        layer = (module, targets.unet[module])
        for base in (f"lora_unet_{ldm.replace('.', '_')}", f"diffusion_model.{ldm}",
                     f"lora_unet_{module.replace('.', '_')}", f"lycoris_{module.replace('.', '_')}",
                     _processor_form(module), f"unet.{_processor_form(module)}"):
            names[base] = layer
    for module, shape in targets.text_encoder.items():
        names[f"text_encoders.clip_l.transformer.{module}"] = (module, shape)
        match = _CLIP_LAYER.fullmatch(module)
        if match and targets.text_encoder_kind == "clip":
            flat = f"text_model_encoder_layers_{match[1]}_{match[2].replace('.', '_')}"
            for base in (f"lora_te_{flat}", f"lora_te1_{flat}", f"text_encoder.{module}"):
                names[base] = (module, shape)
    return names


def _comfy_split(key: str, names: dict) -> tuple[str, str] | None:
    for up, down in COMFY_PAIRS:
        for suffix in (up, down):
            if key.endswith(suffix) and key[:-len(suffix)] in names:
                return key[:-len(suffix)], suffix
    for suffix in COMFY_EXTRAS:
        if key.endswith(suffix) and key[:-len(suffix)] in names:
            return key[:-len(suffix)], suffix
    return None


def _comfy_unmapped(key: str, targets: LoraTargets) -> str:
    suffixes = [s for pair in COMFY_PAIRS for s in pair] + list(COMFY_EXTRAS)
    suffix = next((s for s in suffixes if key.endswith(s)), None)
    if suffix is None:
        return "not a LoRA tensor name ComfyUI reads (lora_up/lora_down, lora_A/lora_B, alpha, ...)"
    base = key[:-len(suffix)]
    if base.startswith("unet.") and ".processor." not in base:
        return (f"ComfyUI maps diffusers-named UNet layers only in the old attention-processor form "
                f"(`...attn1.processor.to_q`), not {base!r} ('lora key not loaded'); kohya names load")
    return f"no layer {base!r} in ComfyUI's key map for {targets.name} ('lora key not loaded')"


def comfyui_report(shapes: Shapes, targets: LoraTargets) -> LoaderReport:
    report = LoaderReport("ComfyUI")
    names = comfy_key_map(targets)
    for key in shapes:
        split = _comfy_split(key, names)
        if split is None:
            report.skipped[key] = _comfy_unmapped(key, targets)
            continue
        base, suffix = split
        pair = next(((u, d) for u, d in COMFY_PAIRS if suffix in (u, d)), None)
        if pair is None:
            report.loaded.append(key)
            continue
        missing = [base + s for s in pair if base + s not in shapes]
        problem = shape_problem(shapes, key, "up" if suffix == pair[0] else "down", names[base][1])
        if missing:
            report.skipped[key] = f"its other matrix {missing[0]!r} is not in the file"
        elif problem:
            report.skipped[key] = problem
        else:
            report.loaded.append(key)
    return report
