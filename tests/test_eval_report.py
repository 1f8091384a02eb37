"""Tests for plots and the Markdown report (stratavit.evaluation.report)."""

from __future__ import annotations

from pathlib import Path

from stratavit.evaluation.report import plot_block_curve, plot_loss_curve, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Lightning's CSVLogger writes one row per log call: cells are often empty.
SPARSE_CSV = """epoch,step,loss,loss/global,loss/patch,lr
0,0,5.0,3.0,2.0,
0,0,,,,0.0001
0,10,4.5,2.8,1.7,
0,10,,,,0.0005
1,20,,,,0.001
1,20,4.0,2.5,1.5,
1,30,3.2,,,
"""


def _results() -> dict:
    return {
        "knn": {"top1": 61.234},
        "linear": {"top1": 66.5},
        "layers": [
            {"block": 1, "knn_top1": 40.0, "linear_top1": 42.0},
            {"block": 2, "knn_top1": 52.5, "linear_top1": 55.0},
            {"block": 3, "knn_top1": 61.234, "linear_top1": 66.5},
        ],
        "baselines": {
            "random_init": {
                "knn_top1": 27.0,
                "layers": [{"block": b, "knn_top1": 30.0 - b} for b in (1, 2, 3)],
            },
            "raw_pixels": {"knn_top1": 38.9},
        },
        "meta": {"recipe": "tiny", "run_dir": "runs/x", "images": 5000, "wall_time_s": 12.5},
    }


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_loss_curve_sparse_csv(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(SPARSE_CSV)
    out = plot_loss_curve(csv_path, tmp_path / "loss.png")
    assert out == tmp_path / "loss.png" and _is_png(out)


def test_plot_loss_curve_missing_or_empty(tmp_path):
    assert plot_loss_curve(tmp_path / "nope.csv", tmp_path / "a.png") is None
    no_loss = tmp_path / "no_loss.csv"
    no_loss.write_text("epoch,step,loss,lr\n0,0,,0.1\n0,1,,0.2\n")
    assert plot_loss_curve(no_loss, tmp_path / "b.png") is None
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_plot_block_curve(tmp_path):
    out = plot_block_curve(
        _results()["layers"],
        tmp_path / "plots" / "layers.png",
        baselines={"random init (last block)": 27.0, "raw pixels": 38.9},
        title="t",
    )
    assert _is_png(out)
    out2 = plot_block_curve(_results()["layers"], tmp_path / "lin.png", key="linear_top1")
    assert _is_png(out2)


def test_write_report_full(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(SPARSE_CSV)
    out_dir = tmp_path / "report"
    report = write_report(
        out_dir, _results(), metrics_csv=csv_path, title="My eval", extra_md="## Notes\nhello"
    )
    assert report == out_dir / "report.md"
    text = report.read_text()
    assert text.startswith("# My eval")
    # headline: backbone next to the baselines
    assert "| pre-trained backbone (last block) | 61.23 | 66.50 |" in text
    assert "| random init (last block) | 27.00 | – |" in text
    assert "| raw pixels | 38.90 | – |" in text
    # per-layer table with every per-layer key, plus the random-init curve
    assert "| block | knn_top1 | linear_top1 | random init knn_top1 |" in text
    assert "| 2 | 52.50 | 55.00 | 28.00 |" in text
    # meta and extra markdown
    assert "- **recipe**: tiny" in text and "- **images**: 5000" in text
    assert "## Notes\nhello" in text
    # headline first (title, summary, headline table), the extra markdown, the settings last
    summary = "The teacher backbone of `runs/x` (recipe tiny). Last block: kNN top-1 61.23 %, linear top-1 66.50 %"
    assert text.index(summary) < text.index("## Headline") < text.index("hello") < text.index("## Settings")
    assert text.index("## Settings") < text.index("- **recipe**: tiny")
    # images written and linked relatively
    assert "![training loss](loss_curve.png)" in text
    assert "(layer_curve.png)" in text
    assert _is_png(out_dir / "loss_curve.png") and _is_png(out_dir / "layer_curve.png")


def test_report_warnings_come_before_the_headline(tmp_path):
    results = _results()
    results["meta"]["warnings"] = ["evaluating at 224 px; the run trained at 64 px (--img-size)"]
    text = write_report(tmp_path, results, html=True).read_text()
    line = "> **Warning:** evaluating at 224 px; the run trained at 64 px (--img-size)"
    assert text.index("# stratavit evaluation") < text.index(line) < text.index("## Headline") < text.index("## Settings")
    assert "- **warnings**" not in text  # shown once, at the top
    html = (tmp_path / "report.html").read_text()
    assert html.index("evaluating at 224 px") < html.index("Headline") < html.index("Settings and provenance")


def test_write_report_minimal_and_missing_csv(tmp_path):
    results = {"knn": {"top1": 50.0}, "linear": {"top1": 55.0}, "layers": [{"block": 1, "knn_top1": 50.0}]}
    report = write_report(tmp_path, results, metrics_csv=tmp_path / "missing.csv")
    text = report.read_text()
    assert "| pre-trained backbone (last block) | 50.00 | 55.00 |" in text
    assert "random init" not in text and "loss_curve.png" not in text
    assert not (tmp_path / "loss_curve.png").exists()
    assert _is_png(tmp_path / "layer_curve.png")
