"""Each bad sample is rejected with its reason, in every format; good ones pass; nothing crashes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from stablediff.data.sources import RawSample, open_source
from stablediff.data.validate import (
    REASONS,
    DataError,
    ImageRejected,
    Quarantine,
    TooManyRejectsError,
    ValidationConfig,
    Validator,
    check_reject_fraction,
    content_hash,
    decode_image,
)

from .corpus import FORMATS, GOOD_CHECKS, corpus_items, encode, expected, strip_png


def judge_all(samples, validator: Validator, quarantine: Quarantine) -> list:
    """The accepted samples; every reject to the quarantine (what `loading` does while it ingests)."""
    kept = []
    for sample in samples:
        verdict = validator.judge(sample)
        if verdict.ok:
            kept.append((sample, verdict))
        else:
            quarantine.add(sample, verdict)
    return kept


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_sample_gets_its_expected_verdict(corpus_specs, fmt):
    validator = Validator()
    verdicts = {s.key: validator.judge(s) for s in open_source(corpus_specs[fmt])}
    assert {key: v.reason for key, v in verdicts.items()} == expected(fmt)
    assert all(v.ok == (v.reason is None) for v in verdicts.values())
    assert validator.total == len(verdicts)
    assert sum(validator.rejects.values()) == sum(1 for r in expected(fmt).values() if r)


@pytest.mark.parametrize("fmt", FORMATS)
def test_good_samples_report_their_upright_size_and_hash(corpus_specs, fmt):
    validator = Validator()
    for sample in open_source(corpus_specs[fmt]):
        verdict = validator.judge(sample)
        if sample.key in GOOD_CHECKS:
            assert verdict.ok, (sample.key, verdict)
            assert (verdict.width, verdict.height) == GOOD_CHECKS[sample.key][0], sample.key
            assert verdict.content_hash == content_hash(sample.image_bytes)


def test_all_reasons_have_exact_documented_names():
    assert {"zero_bytes", "undecodable", "truncated", "decompression_bomb", "too_small",
            "unsupported_mode", "missing_caption", "caption_not_utf8", "duplicate",
            "resource_fork"} <= set(REASONS)


def test_pixel_limit_is_configurable_and_a_warning_counts_as_a_bomb():
    # 120x100 = 12,000 pixels: over a 10,000 limit but under twice it, where Pillow only warns.
    data = encode(Image.new("RGB", (120, 100), (1, 1, 1)), "PNG")
    with pytest.raises(ImageRejected) as rejected:
        decode_image(data, ValidationConfig(max_pixels=10_000))
    assert rejected.value.reason == "decompression_bomb"
    assert decode_image(data, ValidationConfig(max_pixels=20_000)).size == (120, 100)
    assert Image.MAX_IMAGE_PIXELS != 10_000  # the process-wide limit is restored


def test_an_extreme_aspect_under_the_pixel_limit_is_rejected_before_decoding():
    data = strip_png(10_000_000, 8)  # 80,000,000 pixels (under the limit of 89,478,485) in 78 kB
    with pytest.raises(ImageRejected) as rejected:
        decode_image(data)
    assert rejected.value.reason == "max_aspect"
    assert rejected.value.detail == "10000000x8: the aspect ratio 1,250,000.0:1 is over data.max_aspect = 20"


def test_max_aspect_is_configurable_and_counts_either_way_round():
    wide, tall = (encode(Image.new("RGB", size, (1, 1, 1)), "PNG") for size in ((250, 10), (10, 250)))
    for data in (wide, tall):
        with pytest.raises(ImageRejected, match="max_aspect"):
            decode_image(data)
        assert decode_image(data, ValidationConfig(max_aspect=25)).size in ((250, 10), (10, 250))


def test_min_size_is_configurable():
    data = encode(Image.new("RGB", (20, 40), (1, 1, 1)), "PNG")
    with pytest.raises(ImageRejected, match="too_small"):
        decode_image(data, ValidationConfig(min_size=32))
    assert decode_image(data, ValidationConfig(min_size=20)).size == (20, 40)


def test_duplicate_keeps_the_first_and_names_it():
    data = corpus_items("folder")[1].data
    validator = Validator()
    first = validator.judge(RawSample("a", data, "cat", None, "a.jpg"))
    second = validator.judge(RawSample("b", data, "another cat", None, "b.jpg"))
    assert first.ok and (second.reason, second.detail) == ("duplicate", "same bytes as a")


def test_a_rejected_sample_does_not_make_its_copy_a_duplicate():
    data = corpus_items("folder")[1].data
    validator = Validator()
    first = validator.judge(RawSample("a", data, None, "missing_caption", "a.jpg"))
    second = validator.judge(RawSample("b", data, "a cat", None, "b.jpg"))
    assert first.reason == "missing_caption" and second.ok


def test_quarantine_appends_one_json_line_per_reject(corpus_specs, tmp_path):
    validator = Validator()
    with Quarantine(tmp_path) as quarantine:
        kept = judge_all(open_source(corpus_specs["tar"]), validator, quarantine)
    lines = (tmp_path / "quarantine.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    want = {key: reason for key, reason in expected("tar").items() if reason}
    assert {r["key"]: r["reason"] for r in records} == want
    assert all(set(r) == {"key", "origin", "reason", "detail"} for r in records)
    assert all("shard-00" in r["origin"] for r in records)
    assert len(kept) == sum(1 for r in expected("tar").values() if r is None)
    assert quarantine.counts == validator.rejects
    with Quarantine(tmp_path) as again:  # a resumed run appends, never truncates
        again.add(RawSample("x", b"", None, None, "x.png"), validator.judge(
            RawSample("x", b"", None, None, "x.png")))
    assert len((tmp_path / "quarantine.jsonl").read_text().splitlines()) == len(lines) + 1


def test_reject_fraction_within_the_limit_passes():
    check_reject_fraction({"undecodable": 5}, total=100, max_fraction=0.05)
    check_reject_fraction(0, total=10, max_fraction=0.0)


def test_reject_fraction_error_names_counts_reasons_and_config_key():
    counts = {"undecodable": 30, "missing_caption": 12, "too_small": 2, "duplicate": 1}
    with pytest.raises(TooManyRejectsError) as error:
        check_reject_fraction(counts, total=100, max_fraction=0.1)
    message = str(error.value)
    assert "45 of 100 samples (45.0%)" in message
    assert "undecodable 30, missing_caption 12, too_small 2" in message
    assert "duplicate" not in message  # only the top three
    assert "data.max_reject_fraction" in message and "quarantine.jsonl" in message
    assert isinstance(error.value, ValueError)


def test_reject_fraction_with_a_plain_count_and_an_empty_source():
    with pytest.raises(TooManyRejectsError, match="3 of 4 samples"):
        check_reject_fraction(3, total=4, max_fraction=0.5)
    with pytest.raises(DataError, match="no samples"):
        check_reject_fraction(0, total=0, max_fraction=0.5)


def test_no_rejects_by_reason_passes_the_fraction_check():
    check_reject_fraction({}, 10, 0.0)


def test_a_resumed_run_quarantines_each_rejected_file_once(corpus_specs, tmp_path):
    for _ in range(2):  # the run, then its resume judging the same files again
        validator = Validator()
        with Quarantine(tmp_path) as quarantine:
            judge_all(open_source(corpus_specs["tar"]), validator, quarantine)
        assert quarantine.counts == validator.rejects  # counted every time, written once
    records = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in records) == sorted(k for k, reason in expected("tar").items() if reason)


def test_the_torn_last_line_of_a_killed_run_is_cut_before_appending(tmp_path):
    killed = '{"key": "a", "origin": "a.png", "reason": "zero_bytes"}\n{"key": "b", "or'
    (tmp_path / "quarantine.jsonl").write_text(killed)
    sample = RawSample("b", b"", None, None, "b.png")
    with Quarantine(tmp_path) as quarantine:
        quarantine.add(sample, Validator().judge(sample))
    records = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in records] == [("a", "zero_bytes"), ("b", "zero_bytes")]
