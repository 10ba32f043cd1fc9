"""peft LoRA adapters on a model, what of a model trains, and merging adapters into its weights.

A fine-tune's checkpoint stores only the trained tensors (`trained_tensors`): the
adapters of a LoRA run, the unfrozen weights of a frozen-layer run. They go back
onto the base with `load_trained`, which insists that every stored name exists
in the model, so a checkpoint never "loads" onto the wrong base and changes
nothing.
"""

from __future__ import annotations

import torch

from stablediff.errors import CheckpointError

ADAPTER = "default"  # peft's adapter name inside the model (`.lora_A.default.weight`)


def attach_lora(model: torch.nn.Module, config: dict) -> None:
    """Add one peft LoRA adapter (`config`: LoraConfig's keys) and freeze everything else.

    A diffusers model (the UNet) gets it through its own `add_adapter`, which records it for
    diffusers' adapter API. A text encoder (transformers' CLIPTextModel, our BERT) gets peft's
    `inject_adapter_in_model`, which is what transformers' `add_adapter` calls but without its
    peft version requirement; both leave only the adapters trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    from stablediff.models.lora_dropout import peft_keys  # the record's rank/module dropout are not peft's

    lora = LoraConfig(**peft_keys(config))
    if hasattr(model, "set_adapters"):  # diffusers' PeftAdapterMixin
        model.add_adapter(lora, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(lora, model, adapter_name=ADAPTER)


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by state-dict name (views, not copies)."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


@torch.no_grad()
def load_trained(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy stored trained tensors into `model`; every name must be one of its parameters, shapes equal."""
    own = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} stored tensors are not in this model, e.g. {unknown[0]!r}; "
                              "the checkpoint belongs to another base model or adapter setting")
    for name, value in tensors.items():
        if own[name].shape != value.shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, the model's is "
                                  f"{tuple(own[name].shape)}")
        own[name].copy_(value)


@torch.no_grad()
def merged_copy(model: torch.nn.Module, scale: float = 1.0) -> torch.nn.Module:
    """A plain copy of a LoRA'd model (a diffusers UNet, a transformers text encoder) with its adapters
    merged at `scale`.

    peft's own merge does the arithmetic (W + scale * alpha/r * BA, and DoRA's magnitude
    normalisation); the copy has the base class and config and no peft layers, so it saves like
    any model. `model` itself is left as it was."""
    import copy

    from peft.tuners.lora import LoraLayer

    work = copy.deepcopy(model)
    for module in work.modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            module.set_scale(ADAPTER, scale)
            module.merge(adapter_names=[ADAPTER])
    state = {name.replace(".base_layer.", "."): value for name, value in work.state_dict().items()
             if "lora_" not in name}
    cls = type(model)
    plain = cls.from_config(model.config) if hasattr(cls, "from_config") else cls._from_config(model.config)
    plain.load_state_dict(state)
    dtype = next(model.parameters()).dtype
    return (plain if plain.dtype == dtype else plain.to(dtype)).eval()  # .to() only when needed: diffusers warns
