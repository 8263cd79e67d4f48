"""The HTML report in a real browser (headless Chromium): it renders, its plots load,
every link opens a page that renders, and a screenshot is not blank.

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

from pipeline.training.manifest import CoderManifest
from stages import evaluate, train

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
# Opens the report in an iframe, checks its images, then follows every link (and each
# latent page's link back) and records what rendered; the result lands in <pre id=out>.
HARNESS = """<!DOCTYPE html><html><body><pre id="out">pending</pre><script>
function open(frame, src) { return new Promise(r => { frame.onload = r; frame.src = src; }); }
async function main() {
  const frame = document.createElement('iframe');
  document.body.appendChild(frame);
  await open(frame, INDEX);
  const doc = frame.contentDocument;
  const images = [...doc.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight]);
  const hrefs = [...doc.querySelectorAll('a[href]')].map(a => a.href);
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
                broken: page.body.textContent.includes('\ufffd')});
  }
  let backTitle = null;
  if (pages.length) { await open(frame, pages[0].back); backTitle = frame.contentDocument.title; }
  const rows = doc.querySelectorAll('table')[0].querySelectorAll('tr').length;
  document.getElementById('out').textContent =
    JSON.stringify({title: doc.title, rows, images, pages, backTitle});
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


def test_report_renders_and_every_link_opens(report: Path, tmp_path: Path) -> None:
    harness = tmp_path / "harness.html"
    index = (report / "index.html").resolve().as_uri()
    harness.write_text(HARNESS.replace("INDEX", json.dumps(index)), encoding="utf-8")
    dom = _chromium(
        "--allow-file-access-from-files",
        "--virtual-time-budget=30000",
        "--dump-dom",
        harness.as_uri(),
    )
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found and not found.group(1).startswith(("pending", "ERROR")), dom[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["title"] == "fmxcoders evaluation"
    assert seen["rows"] >= 1 + len(CODERS)  # header, variants (and baselines)
    # 4 comparison plots, training curves, L0 vs FVU, trajectory statistics
    assert len(seen["images"]) == 7
    assert any(src == "plots/trajectories.png" for src, *_ in seen["images"])
    for src, width, height in seen["images"]:
        assert width > 300 and height > 200, f"{src} did not load"
    written = list((report / "latents").rglob("*.html"))
    assert len(seen["pages"]) == len(written) >= 2 * len(CODERS)  # random + top picks
    chosen = {page["chosen"] for page in seen["pages"]}
    assert "random sample of alive latents" in chosen, chosen
    assert any(c.startswith("top by coherence") for c in chosen), chosen
    for page in seen["pages"]:
        assert page["h1"] and "latent" in page["h1"], page
        assert page["contexts"] > 0 and page["marks"] > 0 and page["charts"] == 3, page
        assert page["bands"] >= 1 and not page["broken"], page
        assert all(n >= 4 for n in page["axes"]), "a chart lacks its title or axis labels"
        assert page["back"] == index, page
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
