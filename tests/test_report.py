"""Figures are valid, non-blank PNGs written atomically; reports carry the tables and images
(Markdown by relative path, HTML embedded as base64) and the HTML parses."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from metainfluence.errors import SettingsError
from metainfluence.evaluation.metrics import harmful_first, recall_curve
from metainfluence.experiments.plots import accuracy_vs_removed, recall_curves, scatter_predicted_vs_actual, task_image_grid
from metainfluence.experiments.report import SIGN_CONVENTION, Image, Section, Table, markdown_table, write_report
from metainfluence.tasks.tensors import TaskTensors

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> PILImage.Image:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with PILImage.open(path) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[0] > 50 and arr.shape[1] > 50
    assert not np.all(arr == arr[0, 0]), "image is blank (all pixels equal)"
    return arr


def assert_no_temp_files(folder: Path) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


# --------------------------------------------------------------------------- plots

def test_scatter_png(tmp_path):
    rng = np.random.default_rng(0)
    pred = rng.normal(size=40)
    out = scatter_predicted_vs_actual(torch.tensor(pred), pred + 0.3 * rng.normal(size=40), tmp_path / "scatter.png",
                                      title="task-IF vs LOO", xlabel="predicted Δf", ylabel="true Δf")
    assert out == tmp_path / "scatter.png"
    assert_valid_png(out)
    assert_no_temp_files(tmp_path)


def test_scatter_overwrites_atomically_and_handles_constant(tmp_path):
    p = tmp_path / "s.png"
    scatter_predicted_vs_actual([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], p)
    first = p.read_bytes()
    scatter_predicted_vs_actual([1.0, 1.0, 1.0], [0.0, 2.0, 5.0], p, title="constant prediction")  # NaN r: no crash
    assert p.read_bytes() != first
    assert_valid_png(p)
    assert_no_temp_files(tmp_path)


def test_scatter_bad_inputs(tmp_path):
    with pytest.raises(SettingsError, match="entries"):
        scatter_predicted_vs_actual([1.0, 2.0], [1.0], tmp_path / "a.png")
    with pytest.raises(SettingsError, match="NaN"):
        scatter_predicted_vs_actual([1.0, float("nan")], [1.0, 2.0], tmp_path / "a.png")
    with pytest.raises(SettingsError, match=r"\.png"):
        scatter_predicted_vs_actual([1.0, 2.0], [1.0, 2.0], tmp_path / "a.jpg")
    assert list(tmp_path.iterdir()) == []


def test_recall_curves_png(tmp_path):
    flags = np.zeros(30, bool)
    flags[:6] = True
    rng = np.random.default_rng(0)
    scores = np.where(flags, -1.0, 0.0) + rng.normal(scale=0.5, size=30)
    curves = {
        "task-IF": recall_curve(harmful_first(scores), flags),
        "random": recall_curve(rng.permutation(30), flags),
    }
    out = recall_curves(curves, tmp_path / "recall.png", corrupted_fraction=0.2)
    assert_valid_png(out)
    assert_no_temp_files(tmp_path)
    with pytest.raises(SettingsError, match="no curves"):
        recall_curves({}, tmp_path / "r.png")
    with pytest.raises(SettingsError, match="equal lengths"):
        recall_curves({"x": ([0, 1], [0, 0.5, 1])}, tmp_path / "r.png")


def test_accuracy_vs_removed_png(tmp_path):
    fr = np.array([0.0, 0.2, 0.4])
    results = {
        "retrain": (fr, np.array([0.79, 0.80, 0.79]), np.array([0.01, 0.01, 0.012])),
        "task-IF": (fr, [0.79, 0.785, 0.78], None),
    }
    out = accuracy_vs_removed(results, tmp_path / "acc.png")
    assert_valid_png(out)
    assert_no_temp_files(tmp_path)
    with pytest.raises(SettingsError, match="half-width"):
        accuracy_vs_removed({"a": (fr, fr, [0.1])}, tmp_path / "b.png")


def test_task_image_grid_grayscale_and_rgb(tmp_path):
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(3, 6, 1, 12, 12, generator=g)
    given = torch.arange(6).repeat(3, 1) % 3
    true = given.clone()
    true[1, 2] = (true[1, 2] + 1) % 3  # one corrupted label
    out = task_image_grid(gray, tmp_path / "gray.png", given, true, n_support=3, task_ids=[5, 9, 12])
    arr = assert_valid_png(out)
    # the corrupted label is drawn in red somewhere: strongly red pixels exist
    red = (arr[..., 0] > 200) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
    assert red.any()
    rgb = torch.rand(2, 4, 3, 10, 10, generator=g)
    assert_valid_png(task_image_grid(rgb, tmp_path / "rgb.png", np.zeros((2, 4), int), title="RGB"))
    assert_no_temp_files(tmp_path)


def test_task_image_grid_accepts_task_tensors_and_flat_images(tmp_path):
    tasks = TaskTensors(torch.rand(2, 2, 1, 8, 8), torch.tensor([[0, 1], [1, 0]]),
                        torch.rand(2, 3, 1, 8, 8), torch.tensor([[0, 1, 1], [1, 0, 0]]))
    assert_valid_png(task_image_grid(tasks, tmp_path / "tt.png"))
    flat = torch.rand(2, 3, 64)  # MNIST-style flattened square images
    assert_valid_png(task_image_grid(flat, tmp_path / "flat.png", np.ones((2, 3), int)))
    with pytest.raises(SettingsError, match="one label per image"):
        task_image_grid(flat, tmp_path / "bad.png", np.ones((2, 2), int))
    with pytest.raises(SettingsError, match=r"\(tasks, examples, C, H, W\)"):
        task_image_grid(torch.rand(2, 3, 5), tmp_path / "bad.png", np.ones((2, 3), int))


# --------------------------------------------------------------------------- markdown tables

def test_markdown_table_format():
    rows = [{"method": "task-IF", "acc": 0.78041, "time_s": 65.69, "n": 600},
            {"method": "retrain", "acc": (0.7908, 0.0123), "n": 600, "note": "a|b"}]
    md = markdown_table(rows)
    lines = md.splitlines()
    assert lines[0] == "| method | acc | time_s | n | note |"
    assert lines[1] == "|---|---:|---:|---:|---|"
    assert lines[2] == "| task-IF | 0.7804 | 65.6900 | 600 |  |"
    assert lines[3] == "| retrain | 0.7908 ± 0.0123 |  | 600 | a\\|b |"
    # explicit columns and format; tiny nonzero values are not printed as zero
    md2 = markdown_table([{"a": 1.23456, "b": 3e-7, "c": np.float32(2.5)}], columns=["b", "a"], floatfmt=".2f")
    assert md2.splitlines()[2] == "| 3.0e-07 | 1.23 |"
    assert "nan" in markdown_table([{"x": float("nan")}])
    with pytest.raises(SettingsError, match="no rows and no columns"):
        markdown_table([])
    with pytest.raises(SettingsError, match="not a dict"):
        markdown_table([1, 2])


# --------------------------------------------------------------------------- reports

class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _report(tmp_path: Path) -> Path:
    scatter_predicted_vs_actual([0.1, 0.2, 0.4], [0.12, 0.18, 0.5], tmp_path / "scatter.png")
    (tmp_path / "figs").mkdir()
    recall_curves({"a": ([0, 0.5, 1], [0, 0.8, 1])}, tmp_path / "figs" / "recall.png", corrupted_fraction=0.4)
    sections = [
        {"heading": "Removal table", "paragraphs": "Top 40% harmful tasks removed; `task-IF` is **fast**.",
         "tables": [{"method": "retrain", "acc": (0.7908, 0.0101), "time_s": 316.74},
                    {"method": "task-IF", "acc": (0.7804, 0.0112), "time_s": 65.69}],
         "images": [("scatter.png", "predicted vs actual <Δf>")]},
        Section("Detection", paragraphs=["AUC & recall."],
                tables=[Table(rows=[{"method": "task-IF", "auc": 0.97312}], caption="AUC", floatfmt=".3f"),
                        {"rows": [{"k": 1}], "caption": "second"}],
                images=[Image("figs/recall.png")]),
    ]
    return write_report(tmp_path, "Omniglot <5-way> report", sections)


def test_write_report_markdown(tmp_path):
    md_path = _report(tmp_path)
    assert md_path == tmp_path / "report.md"
    md = md_path.read_text()
    assert md.startswith("# Omniglot <5-way> report\n")
    assert SIGN_CONVENTION in md
    assert "## Removal table" in md and "## Detection" in md
    for value in ("0.7908 ± 0.0101", "316.7400", "0.7804 ± 0.0112", "65.6900", "0.973"):
        assert value in md
    assert "| method | acc | time_s |" in md
    assert "*AUC*" in md
    assert re.search(r"!\[[^\]]*\]\(scatter\.png\)", md)
    assert "](figs/recall.png)" in md
    assert_no_temp_files(tmp_path)


def test_write_report_html_is_self_contained_and_parses(tmp_path):
    _report(tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert parser.tags.count("table") == 3 and "th" in parser.tags and "style" in parser.tags
    assert len(parser.imgs) == 2
    for src, png in zip(parser.imgs, ["scatter.png", "figs/recall.png"]):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == (tmp_path / png).read_bytes()
    text = "".join(parser.text)
    assert "Omniglot <5-way> report" in text  # escaped in the markup, restored by the parser
    assert "0.7908 ± 0.0101" in text and "predicted vs actual <Δf>" in text
    assert "<code>task-IF</code>" in page and "<strong>fast</strong>" in page
    assert "src=\"scatter.png\"" not in page  # no external references


def test_write_report_bad_inputs_write_nothing(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        write_report(tmp_path, "t", [{"heading": "h", "images": ["missing.png"]}])
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(SettingsError, match="not a PNG"):
        write_report(tmp_path, "t", [{"heading": "h", "images": ["fake.png"]}])
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    scatter_predicted_vs_actual([1.0, 2.0], [1.0, 2.0], outside)
    try:
        with pytest.raises(SettingsError, match="outside the report folder"):
            write_report(tmp_path, "t", [{"heading": "h", "images": [outside]}])
    finally:
        outside.unlink()
    with pytest.raises(SettingsError, match="heading"):
        write_report(tmp_path, "t", [{"paragraphs": ["x"]}])
    with pytest.raises(SettingsError, match="unknown key"):
        write_report(tmp_path, "t", [{"heading": "h", "figures": []}])
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.html").exists()


def test_write_report_overwrites_and_can_omit_convention(tmp_path):
    write_report(tmp_path, "first", [{"heading": "a"}])
    write_report(tmp_path, "second", [{"heading": "b", "paragraphs": ["only text"]}], sign_convention=False)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# second") and SIGN_CONVENTION not in md and "only text" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]
