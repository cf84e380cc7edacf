"""tools/synthetic_ablation.py: reading a run's result, rows, and the table it prints."""
import json
import os

import pytest
from tests.conftest import load_script

from .conftest import CONFIG_DIR

ROOT = os.path.dirname(CONFIG_DIR)
ablation = load_script("tools/synthetic_ablation.py")


def _metrics(folder, records):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_final_pq_is_the_last_evaluation(tmp_path):
    assert ablation.final_pq(str(tmp_path / "missing")) is None
    _metrics(tmp_path / "run", [{"iteration": 9, "total_loss": 3.0},
                                {"iteration": 9, "panoptic_seg/PQ": 10.0, "panoptic_seg/PQ_th": 5.0,
                                 "panoptic_seg/PQ_st": 20.0},
                                {"iteration": 19, "panoptic_seg/PQ": 12.5, "panoptic_seg/PQ_th": 6.0,
                                 "panoptic_seg/PQ_st": 25.0}])
    assert ablation.final_pq(str(tmp_path / "run")) == {"PQ": 12.5, "PQ_th": 6.0, "PQ_st": 25.0}
    _metrics(tmp_path / "no_eval", [{"iteration": 9, "total_loss": 3.0}])
    assert ablation.final_pq(str(tmp_path / "no_eval")) is None


def test_a_corrupt_metrics_file_is_an_error_naming_it(tmp_path):
    _metrics(tmp_path / "bad", [{"iteration": 9}, "{not json"])
    with pytest.raises(ValueError, match=r"metrics.json, line 2: not JSON"):
        ablation.final_pq(str(tmp_path / "bad"))


def _values(opts):
    values = {}
    for key, value in zip(opts[::2], opts[1::2]):  # later entries override earlier ones, as in yacs
        values[key] = value
    return values


def test_rows_follow_the_papers_order_and_the_last_is_the_config_itself():
    names = [name for name, _ in ablation.ROWS]
    assert names[0] == "MaX-S baseline" and names[3] == "stronger decoder baseline"
    assert names[-1].endswith("(CMT-DeepLab)") and ablation.ROWS[-1][1] == []
    for row in (0, 3):
        baseline = _values(ablation.ROWS[row][1])
        assert baseline["MODEL.CMT.INSDIS_TYPE"] == "instance"
        assert all(baseline[f"MODEL.CMT.{s}"] == "False" for s in
                   ("USE_CLUSTER_UPDATE", "USE_ASSIGNMENT_RESIDUAL", "USE_PIXEL_UPDATE", "USE_REFERENCE_MASK",
                    "USE_COORD_CONV"))
    layouts = [_values(opts).get("MODEL.CMT.TRANSFORMER_DECODER_NAME") for _, opts in ablation.ROWS]
    assert layouts == ["MaXSTransformerDecoder"] * 3 + [None] * 6


def test_the_max_s_rows_build_the_max_s_layout(tiny_synthetic):
    import argparse

    from detectron2.modeling import build_model

    from cmt_cops_d2.engine import setup_cfg

    for _, opts in ablation.ROWS[:3]:
        cfg = setup_cfg(argparse.Namespace(config_file=ablation.CONFIG, opts=["MODEL.DEVICE", "cpu", *opts]))
        t = build_model(cfg).sem_seg_head.transformer_decoder
        assert (len(t.stage5), len(t.extra)) == (2, 1)


def test_existing_results_are_tabulated_without_training(tmp_path, capsys):
    for name, _ in ablation.ROWS:
        for seed, pq in ((0, 40.0), (1, 44.0)):
            _metrics(ablation.run_folder(str(tmp_path), name, seed), [{"panoptic_seg/PQ": pq, "panoptic_seg/PQ_th": pq - 20,
                                                        "panoptic_seg/PQ_st": pq + 20}])
    ablation.main(["--seeds", "0", "1", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "running:" not in out
    assert out.count("| 42.00 +- 2.00 | 22.00 +- 2.00 | 62.00 +- 2.00 | 40.00 / 44.00 |") == len(ablation.ROWS)
    with pytest.raises(SystemExit):
        ablation.main(["--rows", str(len(ablation.ROWS) + 1), "--output-dir", str(tmp_path)])


def test_each_clustering_row_switches_on_exactly_one_more_part():
    """Rows 4-7 are cumulative: each adds one of eqs. 7 (clustering term), 6 (residual), 8 (pixel update)."""
    switches = ("USE_CLUSTER_UPDATE", "USE_ASSIGNMENT_RESIDUAL", "USE_PIXEL_UPDATE")
    on = []
    for _, opts in ablation.ROWS[3:7]:
        values = _values(opts)
        on.append([s for s in switches if values[f"MODEL.CMT.{s}"] == "True"])
    assert on == [[], list(switches[:1]), list(switches[:2]), list(switches)]
