"""benchmarks/gckd_dev.py: development draws are never benchmark seeds, and its paired differences are the
per-draw differences of the variants, checked against a hand computation."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
_SPEC = importlib.util.spec_from_file_location("gckd_dev_benchmark", BENCHMARKS / "gckd_dev.py")
dev = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dev)


def test_draws_are_development_seeds_with_a_setting() -> None:
    assert dev.parse_draw("100:C:I") == (100, "C", "I")
    assert [dev.parse_draw(d)[0] for d in dev.DRAWS] == list(range(100, 109))
    for bad, why in (("3:C:I", "is a benchmark seed"), ("100:C:C", "two of"), ("100:X:I", "two of"),
                     ("100-C-I", "expected SEED:SOURCE:TARGET"), ("x:C:I", "expected SEED:SOURCE:TARGET")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            dev.parse_draw(bad)
    with pytest.raises(SystemExit) as exit_info:  # the CLI refuses it with a usage error (exit 2)
        dev.main(["--draws", "0:C:I"])
    assert exit_info.value.code == 2


def test_every_variant_sets_its_target_terms_explicitly() -> None:
    """What a variant runs does not depend on the benchmark protocol's target-term settings."""
    for name, change in dev.DEV_VARIANTS.items():
        assert {"cd_itm_mining", "delta"} <= set(change)
        assert (change.get("memory_size") == 0) == name.endswith("-no-memory")


def _rows() -> list[dict]:
    values = {  # (seed, variant): (ITM, ITC) mAP
        (100, "batch-itm"): (0.05, 0.06), (100, "bank-itm"): (0.06, 0.07), (100, "bank-itm-no-memory"): (0.04, 0.05),
        (101, "batch-itm"): (0.03, 0.04), (101, "bank-itm"): (0.02, 0.06), (101, "bank-itm-no-memory"): (0.02, 0.02),
        (102, "bank-itm"): (0.09, 0.09),  # no partner variant on this draw: left out of the pairs
    }
    return [{"seed": s, "setting": "C->I", "variant": v, "itm_map": itm, "itc_map": itc,
             "pseudo_pairs_per_step": 1.0, "pseudo_pair_precision": 0.2, "train_seconds": 1.0, "config": {}}
            for (s, v), (itm, itc) in values.items()]


def test_comparisons_are_paired_per_draw() -> None:
    out = {(c["variant"], c["minus"]): c for c in dev.comparisons(_rows())}
    assert set(out) == {("bank-itm", "batch-itm"), ("bank-itm", "bank-itm-no-memory")}  # no batch-itm-no-memory rows
    mining = out[("bank-itm", "batch-itm")]
    assert mining["draws"] == 2
    assert mining["itm_map"]["mean"] == pytest.approx(0.0)  # (+1, -1) points
    assert mining["itc_map"]["mean"] == pytest.approx(1.5)  # (+1, +2)
    assert mining["itm_map"]["ci95"] == pytest.approx([-1.0, 1.0])
    memory = out[("bank-itm", "bank-itm-no-memory")]
    assert memory["itm_map"]["mean"] == pytest.approx(1.0) and memory["itc_map"]["mean"] == pytest.approx(3.0)
    text = dev.markdown(_rows(), {"weights": "abc", "generic_test": {"map": 0.8}})
    assert "| bank-itm − batch-itm (bank mining − in-batch mining (with banks)) | +0.00 [-1.00, +1.00] |" in text
    assert "| bank-itm | 5.67 | 7.33 | 20.0 % | 3 |" in text  # means over its three draws
    assert "weights abc (held-out generic mAP 80.00)" in text
