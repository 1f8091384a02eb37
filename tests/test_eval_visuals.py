"""Tests for the evaluation report's pictures and HTML (stratavit.evaluation.visuals)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from stratavit.evaluation import embedding, md_html
from stratavit.evaluation.block_plots import plot_block_panels
from stratavit.evaluation.embedding import embed_2d, plot_embedding_2d
from stratavit.evaluation.md_html import write_html
from stratavit.evaluation.report import write_report
from stratavit.evaluation.visuals import (
    pca_rgb,
    plot_attention_maps,
    plot_confusion,
    plot_matches,
    plot_pca_rgb,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path | None) -> np.ndarray:
    assert path is not None
    path = Path(path)
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 10 and pixels.shape[1] > 10
    return pixels


def _images(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g)


def _attention(b: int, heads: int, gh: int, gw: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, heads, gh * gw, generator=g)
    return logits.softmax(-1).reshape(b, heads, gh, gw)


# --------------------------------------------------------------------------- #
# attention
# --------------------------------------------------------------------------- #
def test_attention_maps_png_and_row_cap(tmp_path: Path) -> None:
    attn = _attention(8, 3, 8, 8)
    few = _assert_png(plot_attention_maps(_images(8), attn, tmp_path / "a2.png", max_images=2))
    many = _assert_png(plot_attention_maps(_images(8), _attention(8, 3, 8, 8), tmp_path / "a6.png"))
    assert many.shape[0] > few.shape[0]  # 6 rows are taller than 2


def test_attention_maps_many_heads_and_flat_maps(tmp_path: Path) -> None:
    # 12 heads (only 6 shown) given flat over a square grid, images larger than the grid
    attn = _attention(2, 12, 4, 4).reshape(2, 12, 16)
    _assert_png(plot_attention_maps(_images(2, 48), attn, tmp_path / "a.png"))
    with pytest.raises(ValueError):
        plot_attention_maps(_images(2), _attention(3, 2, 4, 4), tmp_path / "bad.png")


# --------------------------------------------------------------------------- #
# PCA colouring
# --------------------------------------------------------------------------- #
def test_pca_rgb_recovers_planted_components() -> None:
    g = torch.Generator().manual_seed(0)
    b, gh, gw, c = 3, 8, 8, 48
    m = b * gh * gw
    z = torch.rand(m, 3, generator=g) * 2 - 1
    z, _ = torch.linalg.qr(z - z.mean(0))  # centred, exactly uncorrelated in the sample
    z = z * torch.tensor([6.0, 3.0, 1.5])  # distinct variances: a unique order of components
    basis, _ = torch.linalg.qr(torch.randn(c, 3, generator=g))
    feats = z @ basis.T + 0.01 * torch.randn(m, c, generator=g) + 5.0  # offset: PCA must centre
    rgb = pca_rgb(feats.reshape(b, gh, gw, c))
    assert rgb.shape == (b, gh, gw, 3)
    assert float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0
    flat = rgb.reshape(m, 3)
    for k in range(3):
        corr = np.corrcoef(flat[:, k].numpy(), z[:, k].numpy())[0, 1]
        assert abs(corr) > 0.99, (k, corr)
    assert torch.equal(rgb, pca_rgb(feats.reshape(b, gh, gw, c)))  # deterministic


def test_pca_rgb_few_channels_and_robust_clip() -> None:
    out = pca_rgb(torch.randn(2, 4, 4, 2))
    assert out.shape == (2, 4, 4, 3)
    assert torch.all(out[..., 2] == 0)  # no third component
    feats = torch.randn(1, 10, 10, 8)
    feats[0, 0, 0] = 1e4  # one outlier must not squash everything else into one colour
    out = pca_rgb(feats)
    assert float(out.reshape(-1, 3)[1:, 0].std()) > 0.05


def test_plot_pca_rgb(tmp_path: Path) -> None:
    patches = torch.randn(4, 8, 8, 16)
    _assert_png(plot_pca_rgb(_images(4), patches, tmp_path / "pca.png", max_images=3))
    _assert_png(plot_pca_rgb(None, patches, tmp_path / "pca_only.png"))


# --------------------------------------------------------------------------- #
# matches, confusion
# --------------------------------------------------------------------------- #
def test_plot_matches(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    pa = torch.rand(100, 2, generator=g) * 31
    pb = torch.rand(100, 2, generator=g) * 23
    correct = torch.rand(100, generator=g) > 0.3
    a, b = _images(1)[0], _images(1, 24)[0]  # views of different sizes
    _assert_png(plot_matches(a, b, pa, pb, correct, tmp_path / "m.png", max_lines=20))
    empty = torch.zeros(0, 2)
    _assert_png(plot_matches(_images(1)[0], _images(1)[0], empty, empty, torch.zeros(0, dtype=torch.bool),
                             tmp_path / "none.png"))
    with pytest.raises(ValueError):
        plot_matches(_images(1)[0], _images(1)[0], pa, pb[:5], correct, tmp_path / "bad.png")


def test_plot_confusion(tmp_path: Path) -> None:
    conf = torch.tensor([[5, 1, 0], [2, 7, 1], [0, 0, 0]])  # last class has no samples
    _assert_png(plot_confusion(conf, ["cat", "dog", "ship"], tmp_path / "c3.png"))
    big = torch.randint(0, 20, (25, 25), generator=torch.Generator().manual_seed(0))
    _assert_png(plot_confusion(big, None, tmp_path / "c25.png"))
    # a matrix sized by the largest label seen, more names: padded with empty classes
    _assert_png(plot_confusion(conf[:2, :2], ["cat", "dog", "ship"], tmp_path / "c2.png"))
    with pytest.raises(ValueError):
        plot_confusion(conf, ["a", "b"], tmp_path / "bad.png")


# --------------------------------------------------------------------------- #
# 2-D embedding
# --------------------------------------------------------------------------- #
def _clusters(n_per: int, k: int, c: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(k, c, generator=g) * 5
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + torch.randn(len(labels), c, generator=g), labels


def test_embed_2d_pca() -> None:
    feats, _ = _clusters(20, 3)
    coords, method, idx = embed_2d(feats, method="pca")
    assert method == "pca"
    assert coords.shape == (60, 2) and coords.dtype == torch.float32
    assert torch.equal(idx, torch.arange(60))
    # capped: a seeded subsample of distinct rows, the same for the same seed
    res = embed_2d(feats, method="pca", seed=3, max_points=25)
    assert res.coords.shape == (25, 2) and len(set(res.indices.tolist())) == 25
    assert torch.equal(res.indices, embed_2d(feats, method="pca", seed=3, max_points=25).indices)
    with pytest.raises(ValueError):
        embed_2d(feats, method="mds")


def test_embed_2d_auto_picks_an_installed_method(monkeypatch: pytest.MonkeyPatch) -> None:
    feats, _ = _clusters(10, 2)
    monkeypatch.setattr(embedding, "_have", lambda name: False)  # nothing optional installed
    coords, method, _ = embed_2d(feats)
    assert method == "pca" and coords.shape == (20, 2)
    with pytest.raises(ImportError):
        embed_2d(feats, method="tsne")

    def broken(x: np.ndarray, seed: int) -> np.ndarray:
        raise ImportError("installed but broken")

    # installed but failing to import: "auto" moves on to the next method, an explicit one raises
    monkeypatch.setattr(embedding, "_have", lambda name: True)
    monkeypatch.setattr(embedding, "_tsne", broken)
    monkeypatch.setattr(embedding, "_umap", broken)
    assert embed_2d(feats).method == "pca"
    with pytest.raises(ImportError):
        embed_2d(feats, method="tsne")


def test_embed_2d_tsne() -> None:
    pytest.importorskip("sklearn")
    feats, _ = _clusters(30, 3)
    coords, method, _ = embed_2d(feats, method="tsne", seed=1)
    assert method == "tsne" and coords.shape == (90, 2)
    assert torch.isfinite(coords).all()
    assert embed_2d(feats)[1] == "tsne"  # "auto" prefers t-SNE when scikit-learn is there
    again, _, _ = embed_2d(feats, method="tsne", seed=1)
    assert torch.allclose(coords, again)


def test_plot_embedding_2d(tmp_path: Path) -> None:
    feats, labels = _clusters(10, 3)
    path, method = plot_embedding_2d(feats, labels, ["a", "b", "c"], tmp_path / "e.png", method="pca")
    assert method == "pca"
    _assert_png(path)
    feats, labels = _clusters(3, 25)  # too many classes for a legend
    path, _ = plot_embedding_2d(feats, labels, None, tmp_path / "e25.png", method="pca", max_points=50)
    _assert_png(path)


# --------------------------------------------------------------------------- #
# per-block panels
# --------------------------------------------------------------------------- #
def _full_results() -> dict:
    layers = [
        {"block": i, "knn_top1": 30.0 + 5 * i, "linear_top1": 35.0 + 5 * i,
         "knn_top1_patch": 28.0 + 5 * i, "linear_top1_patch": 33.0 + 4 * i}
        for i in range(1, 5)
    ]
    rnd_layers = [{"block": i, "knn_top1": 20.0 + i, "linear_top1": 22.0 + i} for i in range(1, 5)]
    return {
        "knn": {"top1": 50.0},
        "linear": {"top1": 55.0},
        "layers": layers,
        "dense": {"miou": 20.0, "pixel_acc": 60.0,
                  "layers": [{"block": i, "miou": 10.0 + i, "pixel_acc": 50.0 + i} for i in (2, 4)]},
        "correspondence": {"top1": 70.0, "layers": [{"block": i, "top1": 50.0 + 5 * i} for i in range(1, 5)]},
        "baselines": {
            "random_init": {"knn_top1": 24.0, "layers": rnd_layers,
                            "correspondence": {"top1": 12.0, "layers": [{"block": 4, "top1": 12.0}]}},
            "raw_pixels": {"knn_top1": 25.0},
        },
    }


def test_plot_block_panels_full_and_partial(tmp_path: Path) -> None:
    full = _assert_png(plot_block_panels(_full_results(), tmp_path / "full.png"))

    only_knn = {"layers": [{"block": 1, "knn_top1": 40.0}, {"block": 2, "knn_top1": 45.0}]}
    one = _assert_png(plot_block_panels(only_knn, tmp_path / "one.png"))
    assert one.shape[1] < full.shape[1]  # one panel is narrower than a 2x2 grid

    only_corr = {"correspondence": {"top1": 70.0, "layers": [{"block": 3, "top1": 70.0}]}}
    _assert_png(plot_block_panels(only_corr, tmp_path / "corr.png"))

    # missing / None values and baselines without the model's curve
    odd = {"layers": [{"block": 1, "knn_top1": None}, {"block": 2}],
           "baselines": {"random_init": {"layers": [{"block": 1, "knn_top1": 10.0}]}}}
    assert plot_block_panels(odd, tmp_path / "odd.png") is None
    assert plot_block_panels({"knn": {"top1": 1.0}}, tmp_path / "none.png") is None
    assert plot_block_panels({}, tmp_path / "empty.png") is None
    assert not (tmp_path / "none.png").exists()


# --------------------------------------------------------------------------- #
# HTML
# --------------------------------------------------------------------------- #
EXTRA_MD = """## Notes

Some **bold** text, `code <b>` and a [link](https://example.org/?a=1&b=2).
Danger: <script>alert("x")</script> stays text.

- top
  - nested one
  - nested two
- back at top

| a | b |
|---|--:|
| 1 | <i>2</i> |

### Attention

![attention maps](attention.png)
"""


def _report(tmp_path: Path) -> Path:
    out = tmp_path / "report"
    results = _full_results()
    results["meta"] = {"recipe": "demo", "data": {"name": "cifar10", "size": 32}}
    plot_attention_maps(_images(2), _attention(2, 2, 4, 4), out / "attention.png")
    return write_report(out, results, extra_md=EXTRA_MD)


def _check_html(page: str) -> None:
    srcs = re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', page)
    assert len(srcs) == 2  # layer curve of write_report + the attention maps
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert ".png" not in page.replace('alt="', "")  # no file reference left outside alt text
    assert "<table>" in page and "<th" in page and "<td" in page
    assert "<h1>" in page and "<h2>" in page and "<h3>" in page
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    assert "<strong>bold</strong>" in page
    assert "<code>code &lt;b&gt;</code>" in page
    assert 'href="https://example.org/?a=1&amp;b=2"' in page
    assert re.search(r"<li>\s*<p>?\s*top|<li>top", page)
    assert re.search(r"top\s*<ul>\s*<li>\s*nested one", page)  # nested list


def test_write_html_builtin(tmp_path: Path) -> None:
    report = _report(tmp_path)
    out = write_html(report, tmp_path / "html" / "report.html", engine="builtin")
    page = out.read_text(encoding="utf-8")
    _check_html(page)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<title>stratavit evaluation</title>" in page
    assert '<td style="text-align: right">&lt;i&gt;2&lt;/i&gt;</td>' in page
    assert "<ul><li>top<ul><li>nested one</li><li>nested two</li></ul></li><li>back at top</li></ul>" in page
    # write_report's nested meta list (2-space indent) nests too
    assert "<li><strong>data</strong>:<ul><li><strong>name</strong>: cifar10</li>" in page


def test_write_html_auto(tmp_path: Path) -> None:
    # whichever engine is installed: the same guarantees
    _check_html(write_html(_report(tmp_path), tmp_path / "r.html").read_text(encoding="utf-8"))


def test_write_html_markdown_package(tmp_path: Path) -> None:
    pytest.importorskip("markdown")
    page = write_html(_report(tmp_path), tmp_path / "r.html", engine="markdown").read_text(encoding="utf-8")
    _check_html(page)


def test_builtin_converter_details() -> None:
    html_ = md_html.markdown_to_html(
        "# T\n\ntext _it_ and snake_case_name\nline two\n\n```\n<raw> **x**\n```\n\n---\n\n"
        "> quoted\n\n[bad](javascript:alert(1))\n"
    )
    assert "<h1>T</h1>" in html_
    assert "<em>it</em>" in html_ and "snake_case_name" in html_
    assert "<pre><code>&lt;raw&gt; **x**</code></pre>" in html_
    assert "<hr>" in html_ and "<blockquote><p>quoted</p></blockquote>" in html_
    assert "javascript" not in html_


def test_write_html_missing_image_warns(tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    md.write_text("# R\n\n![gone](missing.png)\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="missing.png"):
        write_html(md, tmp_path / "r.html", engine="builtin")
