"""A resume compares the config and fingerprints with its checkpoint's: refuse, or allow and record."""

import json

import pytest

from stablediff.config import RunConfig
from stablediff.data.order import BatchOrder
from stablediff.training.metrics import MetricsLog
from stablediff.training.resume_check import ConfigChangeRefused, ResumeCheck, explain_load_errors

FINGERPRINTS = {"code": "0.1+aaa", "data": "d1", "text_encoder": "t1"}


def dump(**sections) -> dict:
    return RunConfig.model_validate(sections).model_dump(mode="json")


def saved_meta(**sections) -> dict:
    order = BatchOrder(num_samples=10, seed=0)
    return {"config": dump(**sections), "fingerprints": FINGERPRINTS,
            "sampler": {**order.state_dict(), "epoch": 3, "position": 4}}


def check(allow=False, meta=None, said=None) -> ResumeCheck:
    return ResumeCheck("runs/x", 40, meta or saved_meta(), allow, (said if said is not None else []).append)


def test_a_change_that_alters_the_run_is_refused_with_the_key_by_key_diff():
    with pytest.raises(ConfigChangeRefused) as refused:
        check().check_config(dump(data={"source": "/photos"}, unet={"layers_per_block": 2}))
    message = str(refused.value)
    assert "cannot resume runs/x at step 40" in message
    assert "data.source: builtin:digits -> /photos   (data order)" in message
    assert "unet.layers_per_block: 1 -> 2   (model shape)" in message
    assert "--allow-config-change" in message


def test_safe_keys_change_freely_and_are_said():
    said = []
    resume = check(said=said)
    resume.check_config(dump(train={"max_steps": 80}, checkpoint={"keep_last": 5}))
    assert said == ["resuming step 40 with train.max_steps: 1000 -> 80",
                    "resuming step 40 with checkpoint.keep_last: 3 -> 5"]
    assert resume.allowed_changes() == []


def test_other_data_or_text_encoder_is_refused_new_code_is_not():
    with pytest.raises(ConfigChangeRefused, match="fingerprints.data: d1 -> d2"):
        check().check_fingerprints({**FINGERPRINTS, "data": "d2"})
    with pytest.raises(ConfigChangeRefused, match="fingerprints.text_encoder: t1 -> t2"):
        check().check_fingerprints({**FINGERPRINTS, "text_encoder": "t2"})
    resume = check()
    resume.check_fingerprints({**FINGERPRINTS, "code": "0.1+bbb"})
    assert [c.key for c in resume.changes] == ["fingerprints.code"]


def test_allowed_changes_are_recorded_in_metrics_and_in_the_checkpoint_meta(tmp_path):
    meta = {**saved_meta(), "config_changes": [{"step": 10, "changes": []}]}
    resume = check(allow=True, meta=meta)
    resume.check_config(dump(unet={"attention_head_dim": 4}))
    extra: dict = {}
    resume.record(MetricsLog(tmp_path / "metrics.jsonl"), extra)
    (event,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert event["event"] == "config_changed" and event["step"] == 40
    assert event["allowed"] == ["unet.attention_head_dim"]
    assert event["changes"] == [{"key": "unet.attention_head_dim", "old": 8, "new": 4, "kind": "model shape"}]
    assert extra["config_changes"] == [{"step": 10, "changes": []}, {"step": 40, "changes": event["changes"]}]
    resume.record(MetricsLog(tmp_path / "metrics.jsonl"), {})  # killed before the next checkpoint, resumed again
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_the_data_order_starts_the_saved_epoch_over_when_the_data_changed_by_permission():
    resume = check(allow=True)
    resume.check_config(dump(data={"source": "/photos"}))
    meta = resume.restorable_meta(BatchOrder(num_samples=7, seed=0))
    assert meta["sampler"] == {"epoch": 3, "position": 0, "seed": 0, "num_samples": 7}
    same = check(allow=True)
    assert same.restorable_meta(BatchOrder(num_samples=10, seed=0)) is same.meta  # nothing changed


def test_weights_that_do_not_fit_an_allowed_shape_change_get_a_clear_error():
    resume = check(allow=True)
    resume.check_config(dump(unet={"layers_per_block": 2}))
    with pytest.raises(ConfigChangeRefused, match="do not fit the changed model \\(unet.layers_per_block\\)"):
        with explain_load_errors(resume):
            raise RuntimeError("Error(s) in loading state_dict for UNet2DConditionModel:\n\tsize mismatch")
    with pytest.raises(RuntimeError, match="unrelated"):
        with explain_load_errors(resume):
            raise RuntimeError("unrelated")
