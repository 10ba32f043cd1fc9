"""Which parameters train: `finetune.freeze` / `finetune.train_only` glob patterns, and the report.

Patterns are shell globs (fnmatch: `*` also crosses dots) matched against each
parameter's full name, e.g. `down_blocks.*` or `*attn2*`. With LoRA they choose
among the adapters (the base is frozen anyway). A pattern that matches nothing
is an error: it is almost always a typo, and silently training everything (or
nothing) would cost the user a run.
"""

from __future__ import annotations

from collections import defaultdict
from fnmatch import fnmatchcase

import torch

from stablediff.errors import ConfigError


def _check_matches(patterns: list[str], names: list[str], key: str) -> None:
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            blocks = sorted({block_of(name) for name in names})
            raise ConfigError(f"finetune.{key}: the pattern {pattern!r} matches no trainable parameter of the model. "
                              f"Parameter names start with {', '.join(blocks[:10])}; patterns are globs over the "
                              "full name, e.g. 'down_blocks.*' or '*attn2*'")


def apply_freeze(model: torch.nn.Module, freeze: list[str], train_only: list[str]) -> None:
    """Turn requires_grad off for what the patterns exclude (among the parameters that train now)."""
    candidates = [name for name, p in model.named_parameters() if p.requires_grad]
    _check_matches(train_only, candidates, "train_only")
    _check_matches(freeze, candidates, "freeze")
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kept = not train_only or any(fnmatchcase(name, p) for p in train_only)
        if not kept or any(fnmatchcase(name, p) for p in freeze):
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("finetune.freeze / finetune.train_only leave no parameter to train; loosen the patterns")


def block_of(name: str) -> str:
    """The top-level block of a parameter: `down_blocks.1`, `mid_block`, `conv_in`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def trainable_report(model: torch.nn.Module) -> list[dict]:
    """Per top-level block: trainable and frozen parameter counts, in model order."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        counts[block_of(name)][0 if param.requires_grad else 1] += param.numel()
    return [{"block": block, "trainable": t, "frozen": f} for block, (t, f) in counts.items()]


def format_report(rows: list[dict]) -> str:
    trainable, total = sum(r["trainable"] for r in rows), sum(r["trainable"] + r["frozen"] for r in rows)
    width = max(len(r["block"]) for r in rows)
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"]
    lines += [f"  {r['block']:<{width}}  {r['trainable']:>12,} trainable  {r['frozen']:>12,} frozen" for r in rows]
    return "\n".join(lines)
