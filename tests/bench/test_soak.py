"""Smoke tests of the soak bench's pure parts: the RSS fit, latency windows, drift, the code
classification, the summary of a synthetic run, the server config and the options. No server runs."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from bench.soak import (
    EXPECTED,
    MIX,
    Call,
    Run,
    Sample,
    SoakOptions,
    fit_line,
    latency_windows,
    p99_drift,
    parse_args,
    server_config,
    summarize,
    unexpected,
)


def test_fit_line_matches_closed_form_and_numpy() -> None:
    exact = fit_line([0, 1, 2, 3], [5, 8, 11, 14])  # y = 3x + 5
    assert (exact.slope, exact.intercept, exact.stderr, exact.points) == pytest.approx((3.0, 5.0, 0.0, 4))
    rng = np.random.default_rng(0)
    xs = np.arange(200.0)
    ys = 700.0 * xs + 1e9 + rng.normal(0, 5e4, xs.size)
    fit = fit_line(list(xs), list(ys))
    (slope, intercept), cov = np.polyfit(xs, ys, 1, cov="unscaled")
    residual = ((ys - (slope * xs + intercept)) ** 2).sum()
    assert fit.slope == pytest.approx(slope)
    assert fit.stderr == pytest.approx(np.sqrt(cov[0, 0] * residual / (xs.size - 2)))
    assert fit.slope - 4 * fit.stderr < 700 < fit.slope + 4 * fit.stderr


def test_fit_line_degenerate_inputs_are_nan_not_errors() -> None:
    assert np.isnan(fit_line([], []).slope)
    assert np.isnan(fit_line([1], [2]).slope)
    assert np.isnan(fit_line([4, 4, 4], [1, 2, 3]).slope)  # no calls completed between samples
    assert np.isnan(fit_line([0, 1], [0, 1]).stderr)


def test_latency_windows_and_drift() -> None:
    # Calls end every 0.5 s over 10 s; latency 1 s in the first half, 2 s in the second.
    ends = [0.5 * i for i in range(20)]
    latencies = [1.0 if t < 5 else 2.0 for t in ends]
    windows = latency_windows(ends, latencies, start=0.0, stop=10.0, window=5.0)
    assert [(w["from_s"], w["to_s"], w["count"]) for w in windows] == [(0.0, 5.0, 10), (5.0, 10.0, 10)]
    assert [w["p50"] for w in windows] == [1.0, 2.0]
    assert p99_drift(windows) == pytest.approx(2.0)
    # A tail shorter than half a window is dropped; a window without calls is not a baseline.
    assert len(latency_windows(ends, latencies, 0.0, 12.0, 5.0)) == 2
    empty_first = latency_windows(ends, latencies, start=-10.0, stop=10.0, window=5.0)
    assert empty_first[0]["count"] == 0 and p99_drift(empty_first) == pytest.approx(2.0)
    assert p99_drift(windows[:1]) is None


def test_every_kind_of_call_has_its_expected_codes() -> None:
    kinds = set(MIX) - {"churn"} | {"churn_upload", "churn_generate", "churn_delete"}
    assert kinds == set(EXPECTED)
    assert not unexpected("cancel", "CANCELLED") and not unexpected("bad_field", "NOT_FOUND")
    assert unexpected("generate", "INTERNAL") and unexpected("bad_field", "OK")  # a bad request accepted
    assert unexpected("malformed", "UNKNOWN") and unexpected("no-such-kind", "OK")


def _synthetic_run(bytes_per_call: float) -> Run:
    """3 calls/s for 120 s; RSS jumps by 500 MiB in the first 10 s, then grows `bytes_per_call`."""
    rng = random.Random(0)
    run = Run()
    for i in range(360):
        kind = "generate" if i % 2 else "bad_field"
        code = "OK" if kind == "generate" else "INVALID_ARGUMENT"
        run.calls.append(Call(kind, i % 3, ended=i / 3, latency=0.5 + 0.1 * rng.random(), code=code))
    run.calls.append(Call("generate", 0, ended=60.0, latency=0.4, code="INTERNAL", details="boom"))
    for k in range(41):
        t = 3.0 * k
        calls = int(3 * t)
        rss = 400 * 2**20 + (500 * 2**20 if t >= 10 else 0) + bytes_per_call * calls + rng.uniform(-1, 1) * 1e4
        run.samples.append(Sample(t, int(rss), 20, 17, 2, 0, calls, calls // 2))
    return run


def test_summary_fits_rss_after_the_warmup_and_counts_surprises() -> None:
    options = SoakOptions(minutes=2.0, warmup_minutes=0.25)
    summary = summarize(_synthetic_run(bytes_per_call=300.0), options)
    fit = summary["rss_fit"]
    assert fit["bytes_per_call"] == pytest.approx(300.0, abs=4 * fit["stderr"] + 1)  # the warm-up jump is left out
    assert fit["points"] == len([k for k in range(41) if 15 <= 3 * k <= 120])
    assert summary["codes_by_kind"]["bad_field"] == {"INVALID_ARGUMENT": 180}
    assert summary["unexpected"] == 1
    assert summary["unexpected_by_kind"] == [{"kind": "generate", "code": "INTERNAL", "count": 1, "first_details": "boom"}]
    assert summary["latency_window_seconds"] == pytest.approx(52.5)  # a short run: two windows
    assert len(summary["latency_windows"]) == 2 and summary["p99_drift"] is not None
    assert summary["resources"]["after_warmup"]["t"] == 15.0


def test_warmup_defaults() -> None:
    assert SoakOptions().warmup_seconds == 60.0
    assert SoakOptions(minutes=1.0).warmup_seconds == pytest.approx(12.0)
    assert SoakOptions(minutes=30.0, warmup_minutes=2.0).warmup_seconds == 120.0


def test_server_config_is_a_valid_sdserve_config(tmp_path) -> None:
    from sdserve.server.config import load_config

    keys = ["k0", "k1", "k2"]
    path = tmp_path / "server.toml"
    path.write_text(server_config(50099, tmp_path / "data", "tiny-sd1", keys))
    config = load_config(path)
    assert config.server.port == 50099 and config.models.serve == ("tiny-sd1",)
    assert [t.key_sha256 for t in config.tenants] == [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    assert not config.open_access


def test_options_from_flags() -> None:
    assert parse_args(["--minutes", "1"]).minutes == 1.0
    target = parse_args(["--target", "127.0.0.1:5", "--keys", "a,b,c", "--pid", "7"])
    assert (target.target, target.keys, target.pid) == ("127.0.0.1:5", ("a", "b", "c"), 7)
    for bad in (["--target", "10.0.0.1:5", "--keys", "a,b,c"], ["--target", "127.0.0.1:5", "--keys", "a"],
                ["--minutes", "0"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
