"""Model files as users trade them: read any of them, merge, prune, hash, describe.

Every operation works on one representation, the flat original-SD-layout state
dict plus its metadata (keymap.py), whether the model came as a single file or
a diffusers folder; outputs are written back as either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stablediff.io.pickle_guard import PICKLE_MODEL_SUFFIXES, refuse_pickle
from stablediff.errors import ModelFileError
from stablediff.models import architecture
from stablediff.models.keymap import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from stablediff.models.file_hash import file_hashes
from stablediff.models.state_dict_file import META, header_shapes, read_header, read_model_file

# single_file_pipeline (and with it diffusers) is imported where needed: `ckpt info` on a
# .safetensors file reads only its header and should not pay for diffusers' import.

COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}
EMA_PREFIX = "model_ema."
# The CompVis LatentDiffusion noise-schedule buffers, stored at the top level of SD files.
LDM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2", "logvar"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def read_model(path: Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(original-layout state dict, metadata) of a single file or a diffusers pipeline folder."""
    path = Path(path)
    if path.is_dir():
        from stablediff.models.pipeline_assembly import load_pipeline_folder
        from stablediff.models.single_file_pipeline import pipeline_state

        return pipeline_state(load_pipeline_folder(path, trust_pickle))
    return read_model_file(path, trust_pickle)


def write_model(state: dict[str, torch.Tensor], metadata: dict[str, str], out: Path, source: str,
                replace: bool = False) -> Path:
    """A `.safetensors` path gets a single file; any other path a diffusers pipeline folder. Both are
    written atomically (models/atomic_output.py); `replace` lets a folder replace an existing one."""
    from stablediff.models.atomic_output import save_pipeline_folder
    from stablediff.models.single_file_pipeline import pipeline_from_state, write_safetensors

    out = Path(out)
    if out.suffix.lower() == ".safetensors":
        return write_safetensors(state, metadata, out)
    if out.suffix.lower() in PICKLE_MODEL_SUFFIXES:
        raise ModelFileError(f"{out}: stablediff writes only safetensors (no pickles); name the output .safetensors "
                             "for a single file, or a folder name for a diffusers pipeline")
    return save_pipeline_folder(pipeline_from_state(state, metadata, source), out, replace)


# -- merge ---------------------------------------------------------------------------------------

def check_same_architecture(states: list[dict[str, torch.Tensor]], names: list[str]) -> None:
    """Raise naming the first key or shape where a model differs from the first one."""
    base = states[0]
    for state, name in zip(states[1:], names[1:]):
        only_base, only_other = sorted(set(base) - set(state)), sorted(set(state) - set(base))
        if only_base or only_other:
            key, where = (only_base[0], names[0]) if only_base else (only_other[0], name)
            raise ModelFileError(f"cannot merge {names[0]} and {name}: tensor {key!r} is only in {where} "
                                 f"({len(only_base) + len(only_other)} keys differ). Merging needs models of the same "
                                 "architecture and text encoder.")
        for key, tensor in base.items():
            if tensor.shape != state[key].shape:
                raise ModelFileError(f"cannot merge {names[0]} and {name}: tensor {key!r} has shape "
                                     f"{list(tensor.shape)} in one and {list(state[key].shape)} in the other; they are "
                                     "different architectures")


def merge_states(states: list[dict[str, torch.Tensor]], names: list[str], method: str,
                 alpha: float) -> dict[str, torch.Tensor]:
    """weighted: (1-alpha)*A + alpha*B; add-difference: A + alpha*(B - C). Computed in float32,
    stored in A's dtype; non-float tensors (ids) are taken from A."""
    need = {"weighted": 2, "add-difference": 3}[method]
    if len(states) != need:
        raise ModelFileError(f"--method {method} takes {need} models, got {len(states)}")
    check_same_architecture(states, names)
    merged = {}
    for key, a in states[0].items():
        if not a.is_floating_point():
            merged[key] = a
            continue
        b = states[1][key].float()
        if method == "weighted":
            value = (1.0 - alpha) * a.float() + alpha * b
        else:
            value = a.float() + alpha * (b - states[2][key].float())
        merged[key] = value.to(a.dtype)
    return merged


def merge_files(paths: list[Path], method: str, alpha: float, trust_pickle: bool = False):
    """(merged state, metadata): the first model's metadata plus the recipe under `stablediff.merge`."""
    loaded = [read_model(p, trust_pickle) for p in paths]
    names = [str(p) for p in paths]
    state = merge_states([s for s, _ in loaded], names, method, alpha)
    recipe = {"method": method, "alpha": alpha,
              "formula": "(1-alpha)*A + alpha*B" if method == "weighted" else "A + alpha*(B - C)",
              "inputs": [{"name": Path(p).name, **({"sha256": file_hashes(p)["sha256"]} if Path(p).is_file() else {})}
                         for p in paths]}
    return state, {**loaded[0][1], META + "merge": json.dumps(recipe)}


# -- prune ---------------------------------------------------------------------------------------

def ema_key(unet_key: str) -> str:
    """CompVis keeps the EMA under `model_ema.` with the dots of the name after `model.` removed."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def prune_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None, ema_only: bool, source: str):
    """(pruned state, {reason: dropped count}): model weights only, EMA promoted when asked, cast floats."""
    if ema_only:
        state = _promote_ema(state, source)
    kept, dropped = {}, {}
    for key, tensor in state.items():
        if key.startswith(tuple(COMPONENT_PREFIXES.values())) or key in LDM_BUFFERS:
            kept[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        else:
            group = key.split(".")[0]
            dropped[group] = dropped.get(group, 0) + 1
    if not any(k.startswith(UNET_PREFIX) for k in kept):
        raise ModelFileError(f"{source} has no UNet weights ({UNET_PREFIX}*); it is not an SD 1.x/2.x checkpoint, "
                             "so there is nothing to prune it to")
    return kept, dropped


def _promote_ema(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    if not any(k.startswith(EMA_PREFIX) for k in state):
        raise ModelFileError(f"--ema-only: {source} has no EMA weights ({EMA_PREFIX}* tensors); prune without "
                             "--ema-only (our own exports already hold the EMA as their main weights)")
    missing = [k for k in unet_keys if ema_key(k) not in state]
    if missing:
        raise ModelFileError(f"--ema-only: {source} has EMA weights, but none for {missing[0]!r} "
                             f"({len(missing)} UNet tensors lack one); prune without --ema-only")
    promoted = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    promoted.update({k: state[ema_key(k)] for k in unet_keys})
    return promoted


# -- hash and info -------------------------------------------------------------------------------

def _shapes_dtypes_metadata(path: Path, trust_pickle: bool):
    # The bytes decide, as for every other command: a pickle named .safetensors is described as a pickle.
    kind = refuse_pickle(path, trust_pickle) if path.is_file() else None
    if kind == "safetensors" or (kind == "unknown" and path.suffix.lower() == ".safetensors"):
        header, metadata = read_header(path)  # no tensor bytes read
        return header_shapes(header), {k: e["dtype"] for k, e in header.items()}, metadata, "safetensors"
    state, metadata = read_model(path, trust_pickle)
    kind = "diffusers folder" if path.is_dir() else "pickle"
    dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}
    return {k: tuple(v.shape) for k, v in state.items()}, dtypes, metadata, kind


def model_info(path: Path, trust_pickle: bool = False) -> dict:
    """Architecture, dtypes, parameters per component, EMA presence and metadata of a model."""
    path = Path(path)
    shapes, dtypes, metadata, kind = _shapes_dtypes_metadata(path, trust_pickle)
    params: dict[str, int] = {}
    for key, shape in shapes.items():
        part = next((n for n, p in COMPONENT_PREFIXES.items() if key.startswith(p)),
                    "ema" if key.startswith(EMA_PREFIX) else "other")
        params[part] = params.get(part, 0) + int(torch.Size(shape).numel())
    counts: dict[str, int] = {}
    for dtype in dtypes.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    return {"path": str(path), "format": kind, "architecture": _architecture(shapes, metadata),
            "parameters": params, "dtypes": counts, "tensors": len(shapes),
            "has_ema": "ema" in params, "metadata": _readable_metadata(metadata)}


def _architecture(shapes, metadata: dict[str, str]) -> dict:
    try:
        architecture.require_components(shapes, "the model")
        text_kind = architecture.text_encoder_kind(shapes)
        unet, vae = architecture.model_configs(metadata, shapes)
    except ValueError as exc:
        return {"name": "not a Stable Diffusion 1.x/2.x model", "reason": str(exc)}
    return {"name": architecture.describe(unet, text_kind), "text_encoder": text_kind,
            "config_source": "metadata" if META + "unet_config" in metadata else "inferred from tensor shapes",
            "in_channels": unet["in_channels"], "latent_channels": vae["latent_channels"],
            "unet_channels": unet["block_out_channels"], "layers_per_block": unet["layers_per_block"],
            "attention_blocks": [t.startswith("CrossAttn") for t in unet["down_block_types"]],
            "cross_attention_dim": unet["cross_attention_dim"], "vae_channels": vae["block_out_channels"]}


def _readable_metadata(metadata: dict[str, str]) -> dict:
    """Metadata for a person: JSON values parsed, the stored tokenizer files only named."""
    out = {}
    for key, value in metadata.items():
        if key == META + "tokenizer":
            out[key] = f"{len(json.loads(value))} tokenizer files"
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value if len(value) <= 500 else value[:500] + "…"
    return out
