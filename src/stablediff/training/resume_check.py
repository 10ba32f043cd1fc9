"""A resume continues the run it finds, or says what changed: config and fingerprints against the checkpoint.

The run calls `check_config` as soon as it has found the checkpoint (before any
data is read) and `check_fingerprints` once the data and text encoder are
loaded, before the state is restored; nothing in the run directory is rewritten
before both pass. A change that alters the run (config.changes.RULES) is refused
with the key-by-key diff unless --allow-config-change; then `record` writes what
changed as an event in metrics.jsonl and into every later checkpoint's meta.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from stablediff.config import RunConfig
from stablediff.config.changes import SAFE, ConfigChange, diff_configs
from stablediff.errors import ConfigError
from stablediff.training import state as train_state

# Fingerprints every checkpoint holds -> what a different one means. New code is not
# refused: fixes must reach a running run; it is said and recorded.
FINGERPRINT_RULES = {"data": "data order (the images or captions read differ)",
                     "text_encoder": "text encoder (its weights or tokenizer differ)", "code": SAFE}
CHANGES_META_KEY = "config_changes"


class ConfigChangeRefused(ConfigError):
    """The resumed run's config or data differs from its checkpoint's in a way that alters the run."""


class ResumeCheck:
    def __init__(self, run_dir, step: int, meta: dict, allow_change: bool, say: Callable[[str], None]) -> None:
        self.run_dir, self.step, self.meta = run_dir, step, meta
        self.allow_change, self.say = allow_change, say
        self.changes: list[ConfigChange] = []

    def check_config(self, config_dump: dict) -> None:
        saved = self.meta.get("config")
        if saved is not None:
            self._judge(diff_configs(saved, config_dump, RunConfig().model_dump(mode="json")))

    def check_fingerprints(self, fingerprints: dict) -> None:
        saved = self.meta.get("fingerprints") or {}
        self._judge([ConfigChange(f"fingerprints.{name}", saved[name], fingerprints.get(name), kind)
                     for name, kind in FINGERPRINT_RULES.items()
                     if name in saved and saved[name] != fingerprints.get(name)])

    def _judge(self, changes: list[ConfigChange]) -> None:
        altering = [c for c in changes if not c.safe]
        if altering and not self.allow_change:
            raise ConfigChangeRefused(refusal(self.run_dir, self.step, altering))
        for change in changes:
            flag = "" if change.safe else f" (changes the {change.kind}; allowed by --allow-config-change)"
            self.say(f"resuming step {self.step} with {change.describe()}{flag}")
        self.changes += changes

    def restorable_meta(self, order) -> dict:
        """The checkpoint's meta to restore; after an allowed change of the data, seed or batching,
        the saved data order means nothing for the new data: the saved epoch starts over."""
        # Meta key "sampler" is the data order: the old spelling, kept so old checkpoints resume.
        saved, fresh = self.meta["sampler"], order.state_dict()
        order_keys = (saved.keys() | fresh.keys()) - {"epoch", "position"}
        if all(saved.get(k) == fresh.get(k) for k in order_keys) or not self.allowed_changes():
            return self.meta
        epoch = int(saved.get("epoch", 0))
        self.say(f"the data order changed with the config: continuing at the start of epoch {epoch} "
                 "over the new data")
        return {**self.meta, "sampler": {**fresh, "epoch": epoch, "position": 0}}

    def allowed_changes(self) -> list[ConfigChange]:
        return [c for c in self.changes if not c.safe]

    def record(self, metrics, state_extra: dict) -> None:
        """What changed, as an event in metrics.jsonl and in the meta of every later checkpoint."""
        earlier = list(self.meta.get(CHANGES_META_KEY) or [])
        if not self.changes:
            if earlier:  # absent when nothing ever changed: a resumed run's meta equals an uninterrupted one's
                state_extra[CHANGES_META_KEY] = earlier
            return
        records = [c.as_record() for c in self.changes]
        state_extra[CHANGES_META_KEY] = [*earlier, {"step": self.step, "changes": records}]
        event = {"event": "config_changed", "step": self.step, "changes": records,
                 "allowed": [c.key for c in self.allowed_changes()]}
        if metrics is not None and not metrics.has_event(event):  # once, also when killed and resumed again
            metrics.write(**event)


def start_resume_check(config: RunConfig, run_dir, resume, allow_change: bool,
                       say: Callable[[str], None]) -> ResumeCheck | None:
    """The config compared with the resumed checkpoint's (None for a fresh run); raises when refused."""
    if resume is None:
        return None
    check = ResumeCheck(run_dir, resume.step, resume.meta, allow_change, say)
    check.check_config(config.model_dump(mode="json"))
    say(train_state.resume_message(resume))
    return check


@contextmanager
def explain_load_errors(check: ResumeCheck | None) -> Iterator[None]:
    """An allowed change of a model's shape leaves weights that do not fit: say so instead of a traceback."""
    try:
        yield
    except RuntimeError as exc:
        if check is None or not check.allowed_changes() or "state_dict" not in str(exc):
            raise
        keys = ", ".join(c.key for c in check.allowed_changes())
        raise ConfigChangeRefused(
            f"cannot resume {check.run_dir} at step {check.step} even with --allow-config-change: the "
            f"checkpoint's weights do not fit the changed model ({keys}): {str(exc).splitlines()[0]} "
            "Start a new --run-dir for a model of another shape.") from None


def refusal(run_dir, step: int, changes: list[ConfigChange]) -> str:
    diff = "\n".join(f"  {c.describe()}   ({c.kind})" for c in changes)
    return (f"cannot resume {run_dir} at step {step}: this config changes what the run trains, so its "
            f"checkpoints would continue a different run:\n{diff}\n"
            "Resume with the values the run was trained with (RUN_DIR/config.yaml), use a new --run-dir, or "
            "pass --allow-config-change to continue from the checkpoint anyway (the change is recorded in "
            "metrics.jsonl and the checkpoint).")
