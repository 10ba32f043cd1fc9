"""`stablediff lora check`: which keys of a LoRA file AUTOMATIC1111, ComfyUI and diffusers load, and which they drop.

All three load what they can and skip the rest with a log line at most, so a
LoRA in the wrong layout "works" and changes little. The check replays each
loader's key matching against the base model's layers (lora_targets.py): A1111
and ComfyUI by their rules re-expressed in lora_rules.py; diffusers by its own
conversion functions (`lora_state_dict`, which turns kohya names into diffusers
ones, and the peft key conversion `load_lora_weights` applies), then a lookup of
each converted layer in the model. A key aimed at a layer that exists, with a
shape that does not fit it, is reported too: no loader can apply it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stablediff.errors import MissingPathError, ModelFileError
from stablediff.finetune.lora_rules import LoaderReport, Shapes, a1111_report, comfyui_report, shape_problem
from stablediff.finetune.lora_targets import LoraTargets

# A key only a LoRA (or LoCon/LoHa/LoKr/DoRA) file has; a model's weights have none of them.
_LORA_KEY = re.compile(r"lora|\.alpha$|hada_|lokr_|dora_scale", re.IGNORECASE)
# one layer's tensors share the name before the first LoRA part (kohya keys: before the first dot)
_BASE = re.compile(r"(.+?)(?:_lora\.(?:up|down)\.weight|\.(?:lora_A|lora_B|lora_up|lora_down|lora_mid|lora|"
                   r"lora_linear_layer|lora_magnitude_vector|alpha|dora_scale)(?:\..*)?)")
_PEFT_KEY = re.compile(r"(.+)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?")


@dataclass
class CheckResult:
    path: Path
    base: str
    keys: int
    reports: list[LoaderReport]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports)


def read_lora_shapes(path: Path) -> Shapes:
    """The tensor shapes of a LoRA `.safetensors` file (or a save_lora_weights folder); clear errors otherwise."""
    from stablediff.inference.lora import DIFFUSERS_LORA_FILE
    from stablediff.io.pickle_guard import sniff_format
    from stablediff.models.state_dict_file import header_shapes, read_header

    path = Path(path)
    if path.is_dir() and (path / DIFFUSERS_LORA_FILE).is_file():
        path = path / DIFFUSERS_LORA_FILE
    if not path.is_file():
        raise MissingPathError(f"{path} does not exist; give a LoRA .safetensors file (or a folder holding "
                               f"{DIFFUSERS_LORA_FILE}) to `stablediff lora check`")
    with open(path, "rb") as f:
        kind = sniff_format(f.read(16))
    if kind in ("zip", "pickle") or path.suffix.lower() != ".safetensors":
        raise ModelFileError(f"{path} is not a .safetensors file ({kind} format); A1111, ComfyUI and diffusers "
                             "share LoRAs as safetensors, and pickle files (.pt/.ckpt/.bin) can run code when "
                             "loaded. Convert it to safetensors, or check the safetensors version of it")
    header, _metadata = read_header(path)
    shapes = header_shapes(header)
    if not any(_LORA_KEY.search(key) for key in shapes):
        raise ModelFileError(f"{path} is not a LoRA: none of its {len(shapes)} tensors is a LoRA tensor "
                             f"(lora_down/lora_up, lora_A/lora_B, .alpha); its keys look like "
                             f"{next(iter(shapes), 'none')!r}. A whole model is checked with `stablediff ckpt info`")
    return shapes


def _groups(keys) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        match = _BASE.fullmatch(key)
        groups.setdefault(match[1] if match else key, []).append(key)
    return groups


def _text_encoder_names(text_keys: list[str]) -> tuple[dict[str, str], str | None]:
    """diffusers' renaming of the file's text encoder keys, done on all of them at once as load_lora_weights does
    (it infers the format from the whole set): {key: peft name}, or why it raises."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    stripped = {k[len("text_encoder."):]: None for k in text_keys}
    try:  # both keep one key per key, in order
        renamed = list(convert_state_dict_to_peft(convert_state_dict_to_diffusers(dict(stripped))))
    except ValueError as exc:
        return {}, f"diffusers cannot read the file's text encoder keys ({exc})"
    return {k: n if n.startswith("text_model.") else f"text_model.{n}" for k, n in zip(text_keys, renamed)}, None


def _peft_names(converted: dict, targets: LoraTargets, text_names: tuple) -> tuple[dict[str, tuple], str | None]:
    """One layer's keys as diffusers' load_lora_weights hands them to peft: {peft name: shape}, or a problem."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = {k[len("unet."):]: v for k, v in converted.items() if k.startswith("unet.")}
    text = {k: v for k, v in converted.items() if k.startswith("text_encoder.")}
    if len(unet) + len(text) < len(converted):
        return {}, "diffusers loads only keys under unet. and text_encoder. (after converting kohya names)"
    if text and targets.text_encoder_kind != "clip":
        return {}, f"the text encoder of {targets.name} is not CLIP"
    if text and text_names[1]:
        return {}, text_names[1]
    names = {k: tuple(v.shape) for k, v in convert_unet_state_dict_to_peft(unet).items()} if unet else {}
    return names | {text_names[0][k]: tuple(v.shape) for k, v in text.items()}, None


def _diffusers_problem(converted: dict, targets: LoraTargets, text_names: tuple) -> str | None:
    names, problem = _peft_names(converted, targets, text_names)
    for name, shape in names.items():
        if problem:
            break
        match = _PEFT_KEY.fullmatch(name)
        layers = targets.text_encoder if name.startswith("text_model.") else targets.unet
        if match is None:
            problem = f"diffusers turns it into {name!r}, which peft does not read"
        elif match[1] not in layers:
            problem = f"no layer {match[1]!r} in {targets.name} (peft skips unknown layers)"
        elif match[2] != "lora_magnitude_vector":
            side = "down" if match[2] == "lora_A" else "up"
            problem = shape_problem({name: shape}, name, side, layers[match[1]])
    return problem


def diffusers_report(tensors: dict, targets: LoraTargets) -> LoaderReport:
    from diffusers import StableDiffusionPipeline

    from stablediff.models.quiet import quiet_hf_libraries

    report = LoaderReport("diffusers")
    converted: dict[tuple[str, ...], dict] = {}
    for keys in _groups(tensors).values():
        try:
            with quiet_hf_libraries():
                converted[tuple(keys)] = StableDiffusionPipeline.lora_state_dict({k: tensors[k] for k in keys})[0]
        except (ValueError, KeyError) as exc:  # its converter raises for keys it cannot rename: the load fails
            report.refused = f"load_lora_weights raises for {keys[0]!r}: {str(exc).strip()[:200]}"
            report.skipped |= {k: "diffusers cannot convert it, and the whole load fails" for k in keys}
    text_names = _text_encoder_names([k for c in converted.values() for k in c if k.startswith("text_encoder.")])
    for keys, layer in converted.items():
        problem = _diffusers_problem(layer, targets, text_names)
        if problem:
            report.skipped |= {k: problem for k in keys}
        else:
            report.loaded += keys
    return report


def check_lora(path: Path, targets: LoraTargets) -> CheckResult:
    from safetensors.torch import load_file

    from stablediff.inference.lora import DIFFUSERS_LORA_FILE

    shapes = read_lora_shapes(path)
    file = Path(path) / DIFFUSERS_LORA_FILE if Path(path).is_dir() else Path(path)
    reports = [a1111_report(shapes, targets), comfyui_report(shapes, targets),
               diffusers_report(load_file(file), targets)]
    return CheckResult(Path(path), targets.name, len(shapes), reports)


def report_lines(result: CheckResult) -> list[str]:
    """One line per loader, then every key each loader drops and why."""
    lines = []
    for r in result.reports:
        verdict = f", and REFUSES the file: {r.refused}" if r.refused else ""
        lines.append(f"{r.loader}: {len(r.loaded)} keys load, {len(r.skipped)} skipped{verdict}")
    for r in result.reports:
        if r.skipped:
            lines.append(f"skipped by {r.loader}:")
            lines += [f"  {key}: {why}" for key, why in r.skipped.items()]
    return lines


def report_json(result: CheckResult) -> dict:
    return {"file": str(result.path), "base": result.base, "keys": result.keys, "ok": result.ok,
            "loaders": {r.loader: {"loaded": len(r.loaded), "skipped": r.skipped, "refused": r.refused}
                        for r in result.reports}}
