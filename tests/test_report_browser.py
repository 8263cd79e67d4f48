"""The HTML report in a real browser (headless Chromium): it renders, its plots load, the
verdict figure comes first, every link opens a page that renders, no legend lies on its
axes, the index of a protocol-sized report fits in about four screens, and a screenshot is
not blank.

Needs Debian's chromium (``apt-get install -y --no-install-recommends chromium``); the
tests skip with that hint when it is absent."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from pipeline.evaluation import html_report
from pipeline.evaluation import report as report_plots
from pipeline.evaluation.report import layout_path
from pipeline.training.manifest import CoderManifest
from stages import evaluate, train
from tests.test_report_pages import synthetic_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER = next((path for name in BROWSERS if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="headless Chromium not found: apt-get install -y --no-install-recommends chromium",
)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio")
CODERS = {
    "crosscoder": {"kind": "crosscoder", "n_latents": 64, "activation": "topk", "k": 4},
    "fmxcoder": {
        "kind": "fmxcoder",
        "n_latents": 64,
        "activation": "topk",
        "k": 4,
        "encoder_factorization": "shared_basis",
        "decoder_factorization": "shared_basis",
        "rank": 2,
        "masking_probability": 0.3,
    },
}
SCREEN = (1280, 900)  # the window the page heights are measured in (CSS pixels)
MAX_SCREENS = 4  # the index at 3 seeds x 8 variants fits in about four screens
# Opens the report in an iframe of one screen, measures it, checks its images, then follows
# every link (and each latent page's link back) and records what rendered; the result lands
# in <pre id=out>.
HARNESS = """<!DOCTYPE html><html><body><pre id="out">pending</pre><script>
function open(frame, src) { return new Promise(r => { frame.onload = r; frame.src = src; }); }
function images(doc) {
  return [...doc.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight,
                                   i.getBoundingClientRect().top]);
}
async function main() {
  const frame = document.createElement('iframe');
  frame.style.width = WIDTH + 'px'; frame.style.height = HEIGHT + 'px'; frame.style.border = '0';
  document.body.appendChild(frame);
  await open(frame, INDEX);
  const doc = frame.contentDocument;
  const height = doc.documentElement.scrollHeight;
  const tables = [...doc.querySelectorAll('table')].map(t => t.getBoundingClientRect().top);
  const index = images(doc);
  const hrefs = [...doc.querySelectorAll('a[href]')].map(a => a.href)
    .filter(href => FOLLOW !== null && new RegExp(FOLLOW).test(href));
  const pages = [];
  for (const href of hrefs) {
    await open(frame, href);
    const page = frame.contentDocument;
    const h1 = page.querySelector('h1');
    const back = page.querySelector('a[href]');
    const count = selector => page.querySelectorAll(selector).length;
    pages.push({href, h1: h1 && h1.textContent, contexts: count('.context'), marks: count('mark'),
                charts: count('svg'), back: back && back.href, bands: count('.band'),
                chosen: page.querySelector('.chosen') && page.querySelector('.chosen').textContent,
                axes: [...page.querySelectorAll('svg')].map(s => s.querySelectorAll('text').length),
                images: images(page), rows: count('tr'),
                broken: page.body.textContent.includes('\\ufffd')});
  }
  const latent = pages.find(p => p.href.includes('/latents/'));
  let backTitle = null;
  if (latent) { await open(frame, latent.back); backTitle = frame.contentDocument.title; }
  const rows = doc.querySelectorAll('table')[0].querySelectorAll('tr').length;
  document.getElementById('out').textContent =
    JSON.stringify({title: doc.title, rows, height, tables, images: index, pages, backTitle});
}
main().catch(e => { document.getElementById('out').textContent = 'ERROR ' + e; });
</script></body></html>
"""


@pytest.fixture(scope="module")
def report(tiny_store: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    manifests = [
        CoderManifest.model_validate(
            {
                "name": name,
                "cache": {"key": tiny_store.name, "root": str(tiny_store.parent)},
                "coder": coder,
                "training": {"tokens": 10 * 128, "batch_size": 128, "checkpoint_every": 50},
                "run": {"runs_root": str(root / "runs"), "progress": False},
            }
        )
        for name, coder in CODERS.items()
    ]
    runs = [r.run_dir for r in train.run([(m, root) for m in manifests])]
    options = evaluate.EvaluateOptions(
        latents_sampled=2, splice_windows=2, masking_tokens=256, progress=False, device="cpu"
    )
    return evaluate.run(runs, root / "report", options)


def _chromium(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [BROWSER, *FLAGS, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def walk(index: Path, tmp_path: Path, follow: str | None = "") -> dict:
    """What Chromium saw of a report: the index in a one-screen frame (its height, the top
    of each table and image) and every page it links to whose URL matches the regular
    expression ``follow`` (all by default, none for None)."""
    harness = tmp_path / "harness.html"
    script = HARNESS.replace("INDEX", json.dumps(index.resolve().as_uri()))
    script = script.replace("WIDTH", str(SCREEN[0])).replace("HEIGHT", str(SCREEN[1]))
    script = script.replace("FOLLOW", json.dumps(follow))
    harness.write_text(script, encoding="utf-8")
    dom = _chromium(
        "--allow-file-access-from-files",
        "--virtual-time-budget=60000",
        "--dump-dom",
        harness.as_uri(),
    )
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found and not found.group(1).startswith(("pending", "ERROR")), dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def page_height(index: Path, tmp_path: Path) -> int:
    """The height of a report's index in CSS pixels, laid out in a ``SCREEN``-wide window
    (the figure the report's "about four screens" bound is about)."""
    return walk(index, tmp_path, follow=None)["height"]


def overlaps(a: list[float], b: list[float], tolerance: float = 1.0) -> bool:
    """Do two pixel boxes ``[x0, y0, x1, y1]`` share more than a border?"""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width > tolerance and height > tolerance


def legend_overlaps(png: Path) -> list[str]:
    """Each legend of a saved figure that lies over one of its axes (its layout sidecar)."""
    layout = json.loads(layout_path(png).read_text())
    return [
        f"{png.name}: legend {legend} over axes {axes}"
        for legend in layout["legends"]
        for axes in layout["axes"]
        if overlaps(legend, axes)
    ]


def test_report_renders_and_every_link_opens(report: Path, tmp_path: Path) -> None:
    index = report / "index.html"
    seen = walk(index, tmp_path)
    assert seen["title"] == "fmxcoders evaluation"
    assert seen["rows"] >= 1 + len(CODERS)  # header, one row per variant
    # The verdict first, above every table and within the first screen.
    (src, _, _, top), *_ = seen["images"]
    assert src == "plots/verdict.png" and top < SCREEN[1] / 3, seen["images"][0]
    assert all(top < table for table in seen["tables"]), (top, seen["tables"])
    index_plots = {"verdict", "fvu_per_layer", "probing_f1", "l0_fvu", "neff_hist"}
    assert {Path(src).stem for src, *_ in seen["images"]} == index_plots
    details = [p for p in seen["pages"] if p["href"].endswith("/details.html")]
    assert len(details) == 1 and details[0]["back"] == index.resolve().as_uri()
    assert details[0]["rows"] >= 1 + len(CODERS)  # header, one row per run
    detail_plots = {"spread", "trajectories", "training"}
    assert {Path(src).stem for src, *_ in details[0]["images"]} == detail_plots
    for src, width, height, _ in seen["images"] + details[0]["images"]:
        assert width > 300 and height > 200, f"{src} did not load"
        assert not legend_overlaps(report / src), legend_overlaps(report / src)
    latents = [p for p in seen["pages"] if "/latents/" in p["href"]]
    written = list((report / "latents").rglob("*.html"))
    assert len(latents) == len(written) >= 2 * len(CODERS)  # random + top picks
    chosen = {page["chosen"] for page in latents}
    assert "random sample of alive latents" in chosen, chosen
    assert any(c.startswith("top by coherence") for c in chosen), chosen
    for page in latents:
        assert page["h1"] and "latent" in page["h1"], page
        assert page["contexts"] > 0 and page["marks"] > 0 and page["charts"] == 3, page
        assert page["bands"] >= 1 and not page["broken"], page
        assert all(n >= 4 for n in page["axes"]), "a chart lacks its title or axis labels"
        assert page["back"] == index.resolve().as_uri(), page
    assert seen["backTitle"] == "fmxcoders evaluation"


def test_screenshots_are_not_blank(report: Path, tmp_path: Path) -> None:
    page = next((report / "latents").rglob("*.html"))
    for name, url in (("index", report / "index.html"), ("latent", page)):
        shot = tmp_path / f"{name}.png"
        _chromium("--window-size=1280,1600", f"--screenshot={shot}", url.resolve().as_uri())
        assert shot.stat().st_size > 10_000, name
        image = matplotlib.image.imread(shot)[..., :3]
        assert image.shape[:2] == (1600, 1280)
        # Text, tables and plots: many distinct colours, a good share of non-white pixels.
        assert (image.min(-1) < 0.9).mean() > 0.02, name
        assert len(np.unique((image * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50, name


def test_a_legend_on_the_data_is_caught(tmp_path: Path) -> None:
    """The overlap check fails on a legend inside its axes and passes it outside."""
    for place, expected in (("inside", True), ("outside", False)):
        fig, axes = report_plots._figure(1, 1, 5.0, 3.0)
        axes[0, 0].plot([0, 1], [0, 1], label="a line")
        if place == "inside":
            axes[0, 0].legend(loc="center")
        else:
            report_plots._outside_legend(fig)
        png = report_plots._save(fig, tmp_path / f"{place}.png")
        assert bool(legend_overlaps(png)) is expected, place


SEEDS, VARIANTS = 3, 8


def test_index_of_three_seeds_by_eight_variants_fits_in_four_screens(tmp_path: Path) -> None:
    """A synthetic protocol-sized report (8 variants x 3 seeds, each with its untrained
    control, and baselines), redrawn from its saved tables: the index stays within
    ``MAX_SCREENS`` screens, the verdict comes first and no legend covers data."""
    paths = synthetic_report(tmp_path / "report", VARIANTS, SEEDS)
    html_report.rerender(paths)
    seen = walk(paths.index, tmp_path, follow=r"/details\.html$")  # no latent pages here
    assert seen["images"][0][0] == "plots/verdict.png"
    assert seen["height"] <= MAX_SCREENS * SCREEN[1], seen["height"]
    trained = [p for p in seen["pages"] if p["href"].endswith("/details.html")]
    assert trained and trained[0]["rows"] >= 1 + 2 * SEEDS * VARIANTS  # every run there
    for png in sorted(paths.plots.glob("*.png")):
        assert not legend_overlaps(png), legend_overlaps(png)
