"""`stablediff demo` end to end at a tiny size: it trains, evaluates at its eval steps, and ends with the final
checkpoint's FD, KID and adherence next to what real digits score, and with the report."""

import json
import re

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

# The demo recipe made as small as tiny.yaml, evaluating at steps 2 and 4 on 20 generated digits.
TINY = {"data.resolution": "16", "data.limit": "64", "vae.block_out_channels": "[8,16]", "vae.norm_num_groups": "8",
        "vae.train_steps": "2", "vae.batch_size": "8", "unet.block_out_channels": "[16,32]",
        "unet.down_block_types": "[DownBlock2D,CrossAttnDownBlock2D]",
        "unet.up_block_types": "[CrossAttnUpBlock2D,UpBlock2D]", "unet.attention_head_dim": "4",
        "unet.norm_num_groups": "8", "train.max_steps": "4", "train.batch_size": "8", "train.warmup_steps": "1",
        "train.validate_every": "2", "train.eval_every": "2", "train.eval_samples": "20",
        "sample.per_prompt": "1", "sample.steps": "2", "train.threads": "1"}


def _row(stdout: str, label: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith(label))
    return re.split(r"\s{2,}", line[len(label):].strip())


def test_the_demo_prints_the_final_scores_next_to_real_digits_and_writes_the_report(tmp_path):
    run_dir = tmp_path / "demo"
    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    result = run_cli("demo", "--run-dir", str(run_dir), *overrides)
    assert result.returncode == 0, result.stderr
    assert "step 4: fd, kid, adherence cached" in result.stderr  # train-time evaluation's, not generated again
    metrics = json.loads((run_dir / "eval.json").read_text())["checkpoints"]["4"]["metrics"]
    assert f"step 4, {metrics['fd']['count']} generated digits" in result.stdout
    ours, real = _row(result.stdout, "FD (digit features, lower is better)")
    assert float(ours) == pytest.approx(metrics["fd"]["value"], rel=1e-2)
    assert 0 < float(real) < float(ours)  # an untrained model is far from what 20 real digits score
    ours, real = _row(result.stdout, "adherence: accuracy")
    assert ours == f"{metrics['adherence']['value']:.1%}"
    assert float(real.rstrip("%")) > 95  # the classifier on real held-out digits
    for part in ("precision", "recall", "f1"):
        ours, real = _row(result.stdout, f"adherence: macro {part}")
        assert float(ours) == pytest.approx(metrics["adherence"]["macro"][part], abs=1e-3)
    assert _row(result.stdout, "KID (lower is better)")[0].count("±") == 1
    report = (run_dir / "report.html").read_text()
    assert f"report: {run_dir / 'report.html'}" in result.stdout and "<img" in report
    assert (run_dir / "samples" / "step-0000004.png").is_file()  # the evaluation's grid, for the report
