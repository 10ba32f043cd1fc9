"""Which metrics a config computes, and that everything ranking or stopping on one names one it computes.

val_loss is computed every `train.validate_every` steps; the others (fd, kid,
adherence, bpd, clip) every `train.eval_every` steps, those listed in
`train.eval_metrics`. `early_stopping.metric` and `checkpoint.best_metric` are
checked against that here, at load, so a run never trains for an hour to find
its early stopping watching a number nobody computes. Names and directions come
from run_schema.METRIC_MODES (their one home).
"""

from __future__ import annotations

from stablediff.run_schema import BEST_METRIC, METRIC_MODES


def check_metric_name(name: str, key: str) -> str:
    if name not in METRIC_MODES:
        raise ValueError(f"{key}: unknown metric {name!r}; the known metrics are {', '.join(METRIC_MODES)}")
    return name


def check_eval_metrics(names: list[str], eval_every: int | None) -> None:
    """train.eval_metrics: known names, no val_loss (validate_every's), given together with train.eval_every."""
    for name in names:
        check_metric_name(name, "train.eval_metrics")
    if BEST_METRIC in names:
        raise ValueError(f"train.eval_metrics lists {BEST_METRIC}, which train.validate_every computes; remove it "
                         "there and set train.validate_every instead")
    if len(set(names)) != len(names):
        raise ValueError(f"train.eval_metrics names a metric twice: {names}")
    if names and not eval_every:
        raise ValueError(f"train.eval_metrics {names} are computed every train.eval_every steps; set "
                         "train.eval_every (e.g. the checkpoint interval)")
    if eval_every and not names:
        raise ValueError(f"train.eval_every = {eval_every} evaluates train.eval_metrics, which is empty; list "
                         f"some of {', '.join(m for m in METRIC_MODES if m != BEST_METRIC)}, or unset "
                         "train.eval_every")


def check_computed(name: str, key: str, validate_every: int | None, eval_every: int | None,
                   eval_metrics: list[str]) -> None:
    """`key` (early_stopping.metric, checkpoint.best_metric) names a metric this config computes."""
    if name == BEST_METRIC:
        if not validate_every:
            raise ValueError(f"{key} = {name} needs the validation loss computed: set train.validate_every "
                             "(the steps between validation losses)")
    elif not eval_every or name not in eval_metrics:
        raise ValueError(f"{key} = {name} is not computed by this config: add {name} to train.eval_metrics and "
                         f"set train.eval_every (now eval_metrics = {eval_metrics}, eval_every = {eval_every})")


def default_mode(data: object) -> object:
    """early_stopping.mode from METRIC_MODES when not given; an explicit mode that contradicts it is an error."""
    if not isinstance(data, dict):
        return data
    metric = data.get("metric", BEST_METRIC)
    if not isinstance(metric, str):
        return data
    expected = METRIC_MODES.get(check_metric_name(metric, "early_stopping.metric"))
    given = data.get("mode")
    if given is None:
        return {**data, "mode": expected}
    if given != expected:
        raise ValueError(f"early_stopping.mode = {given!r} contradicts metric {metric!r}, whose direction is "
                         f"{expected!r} ({'lower' if expected == 'min' else 'higher'} is better); remove "
                         "early_stopping.mode (it follows the metric)")
    return data


NEEDS_HELD_OUT = ("fd", "kid", "bpd")  # compared with (or scored on) the real held-out images


def check_evaluable(eval_metrics: list[str], pixel_space: bool, holds_out_images: bool) -> None:
    """What train-time evaluation needs of the model and the data."""
    if eval_metrics and pixel_space:
        raise ValueError("train.eval_metrics are computed through the text-to-image pipeline, which a pixel-space "
                         "model (vae.enabled: false) does not have; remove train.eval_every and "
                         "train.eval_metrics (train.validate_every's val_loss works for it)")
    needing = [name for name in eval_metrics if name in NEEDS_HELD_OUT]
    if needing and not holds_out_images:
        raise ValueError(f"train.eval_metrics {needing} compare with held-out images, but data.held_out_fraction "
                         "is 0 and there is no data.validation_source; give one of them, or leave "
                         f"{', '.join(needing)} out")
