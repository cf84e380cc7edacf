"""tools/synthetic_cops.py: existing runs and gate-off evaluations are tabulated without training."""
import json
import os
import sys

import pytest
from tests.conftest import load_script

from .conftest import CONFIG_DIR
from .test_synthetic_ablation import _metrics

ROOT = os.path.dirname(CONFIG_DIR)
sys.path.insert(0, os.path.join(ROOT, "tools"))
cops = load_script("tools/synthetic_cops.py")


def _run(folder, pq, gate_off_pq):
    _metrics(folder, [{"panoptic_seg/PQ": pq, "panoptic_seg/PQ_th": pq - 10, "panoptic_seg/PQ_st": pq + 10}])
    with open(os.path.join(folder, "gate_off.json"), "w") as f:
        json.dump({"PQ": gate_off_pq, "PQ_th": gate_off_pq - 10, "PQ_st": gate_off_pq + 10}, f)


def test_existing_results_are_tabulated_per_stage_and_gate(tmp_path, capsys):
    for seed, offset in ((0, 0.0), (1, 2.0)):
        _run(str(tmp_path / f"pretrain_seed{seed}"), 50 + offset, 49 + offset)
        _run(str(tmp_path / f"full_seed{seed}"), 52 + offset, 51 + offset)
    cops.main(["--seeds", "0", "1", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "running:" not in out
    assert "| pretraining, gate on | 51.00 +- 1.00 | 41.00 +- 1.00 | 61.00 +- 1.00 | 50.00 / 52.00 |" in out
    assert "| pretraining, gate off | 50.00 +- 1.00 |" in out
    assert "| full training, gate on | 53.00 +- 1.00 |" in out
    assert "| full training, gate off | 52.00 +- 1.00 | 42.00 +- 1.00 | 62.00 +- 1.00 | 51.00 / 53.00 |" in out


def test_a_failed_run_stops_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr("subprocess.call", lambda *a, **k: 3)
    with pytest.raises(SystemExit, match="exited with 3"):
        cops.main(["--seeds", "0", "--output-dir", str(tmp_path)])
