"""The HTML report opened as a user would: headless Debian Chromium driven by PyPI's playwright (never
`playwright install`), from file:// (so any reference to a sibling file or the network would fail)."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine
from torch import nn

import nnsim
from nnsim import report
from nnsim.cli.analysis import run_analysis
from nnsim.report import write_report

torch.set_num_threads(1)
CHROMIUM = "/usr/bin/chromium"
SECTIONS = ["summary", "density", "isolated", "crowded", "neighbors", "denoising", "mislabelled"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `apt-get install chromium` (make test does it)"
    home = tmp_path_factory.mktemp("chromium-home")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--disable-gpu", "--disable-dev-shm-usage"],
                              env={**os.environ, "XDG_CONFIG_HOME": str(home), "XDG_CACHE_HOME": str(home)})
        yield b
        b.close()


def open_page(browser, path: Path):
    """A fresh page on file://path, with console errors, page exceptions and network requests recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, problems, requests


def test_demo_report_in_chromium(browser, demo_dir, tmp_path):
    page, problems, requests = open_page(browser, demo_dir / "report.html")
    for sid in SECTIONS:
        assert page.locator(f"section#{sid} h2").is_visible(), sid
    # Every image (figures and samples) is embedded and decodes.
    sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.src.slice(0, 5)])")
    assert len(sizes) > 100 and all(c and w > 0 and s == "data:" for c, w, s in sizes), sizes[:5]
    assert all(u.startswith(("file://", "data:")) for u in requests), requests[:5]
    assert page.locator("#isolated .sample").count() == 16 and page.locator("#mislabelled .sample").count() == 32
    # Clicking a sample shows its neighbours, as written in neighbors.csv.
    with open(demo_dir / "neighbors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    first = page.locator("#mislabelled .sample").first
    i = int(first.get_attribute("data-index"))
    assert page.locator("#neighbor-panel").is_hidden()
    first.click()
    panel = page.locator("#neighbor-panel")
    assert panel.is_visible()
    assert f"Sample #{i}" in page.locator("#neighbor-title").inner_text()
    tiles = panel.locator(".sample")
    expected = [(int(r["neighbor"]), float(r["similarity"])) for r in rows if int(r["index"]) == i]
    assert tiles.count() == 1 + len(expected) == 11
    shown = [int(tiles.nth(t).get_attribute("data-index")) for t in range(tiles.count())]
    assert shown == [i] + [j for j, _ in expected]
    for t, (_, s) in enumerate(expected, start=1):
        assert f"sim {s:.3f}" in tiles.nth(t).inner_text()
    assert panel.locator("img").count() == 11
    # A neighbour is clickable in turn.
    tiles.nth(1).click()
    assert f"Sample #{expected[0][0]}" in page.locator("#neighbor-title").inner_text()
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000
    assert problems == []
    page.close()


def test_tabular_report_shows_values(browser, tmp_path, monkeypatch):
    """Tabular data (wine, 13 features): values instead of images, and the neighbour panel still works, also
    when the data set is too large to embed every sample (then: the samples shown and their neighbours)."""
    monkeypatch.setattr(report, "MAX_EMBEDDED", 50)
    wine = load_wine()
    x = torch.tensor((wine.data - wine.data.mean(0)) / wine.data.std(0), dtype=torch.float32)
    y = torch.tensor(wine.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    result = run_analysis(nnsim.Similarity(model, progress=False), model, x, y, k=5, exact_denoising=True,
                          log=lambda s: None)
    path = write_report(tmp_path / "r.html", x=x.numpy(), columns=result.columns,
                        neighbor_index=result.neighbor_index, neighbor_similarity=result.neighbor_similarity,
                        summary=result.summary, class_names=list(wine.target_names))
    page, problems, _ = open_page(browser, path)
    assert page.locator("#isolated .sample img").count() == 0
    values = page.locator("#isolated .sample .values").first.inner_text().split()
    i = int(page.locator("#isolated .sample").first.get_attribute("data-index"))
    np.testing.assert_allclose([float(v) for v in values], x[i, :12].numpy(), atol=0.006)
    for gallery in ("isolated", "crowded", "mislabelled"):
        page.locator(f"#{gallery} .sample").last.click()
        assert page.locator("#neighbor-panel .sample .values").count() == 6
    embedded = page.evaluate("Object.keys(JSON.parse(document.getElementById('nnsim-data').textContent).samples)")
    assert 50 < len(embedded) < len(x)
    page.locator("#isolated .sample").first.click()
    assert wine.target_names[int(y[i])] in page.locator("#neighbor-title").inner_text()
    assert problems == []
    page.close()


def test_report_explore_baselines_and_class_matrix(browser, tmp_path):
    """The interactive parts, clicked as a user would: sort the score table both ways, filter by class (table
    and galleries), jump to a sample by index, Escape closes the panel; the baselines and the class matrix are
    checked against independent computations (sklearn's AUROC and k-NN, the softmax written out)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors

    wine = load_wine()
    x = torch.tensor((wine.data - wine.data.mean(0)) / wine.data.std(0), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    flip = torch.randperm(len(x), generator=g)[:15]
    y = torch.tensor(wine.target)
    y[flip] = (y[flip] + torch.randint(1, 3, (15,), generator=g)) % 3
    flipped = np.zeros(len(x), bool)
    flipped[flip.numpy()] = True
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    k = 5
    result = run_analysis(nnsim.Similarity(model, progress=False), model, x, y, k=k, log=lambda s: None)
    cols = result.columns
    # Baselines against their definitions.
    with torch.no_grad():
        p_label = model(x).softmax(1)[torch.arange(len(x)), y].double().numpy()
    np.testing.assert_allclose(cols["self_confidence"], p_label, rtol=1e-5)
    nbrs = NearestNeighbors(n_neighbors=k + 1).fit(x.numpy()).kneighbors(x.numpy(), return_distance=False)[:, 1:]
    np.testing.assert_allclose(cols["input_knn_disagreement"], (y.numpy()[nbrs] != y.numpy()[:, None]).mean(1))
    cols["known_mislabelled"] = flipped
    names = [str(n) for n in wine.target_names]
    path = write_report(tmp_path / "r.html", x=x.numpy(), columns=cols, neighbor_index=result.neighbor_index,
                        neighbor_similarity=result.neighbor_similarity, summary=result.summary, class_names=names)
    page, problems, _ = open_page(browser, path)

    # Baseline table: AUROC of each score against the known flips, as sklearn computes it.
    for key, sign in (("loss", 1), ("input_knn_disagreement", 1), ("self_confidence", -1), ("mislabel_score", 1)):
        cell = page.locator(f'#baseline-table tr[data-score="{key}"] td.num').first.inner_text()
        assert abs(float(cell) - roc_auc_score(flipped, sign * cols[key])) < 1e-4, key

    # Sort by loss: descending on the first click, ascending on the second.
    def first_rows(n=3):
        return [int(page.locator("#scores tbody tr").nth(r).get_attribute("data-index")) for r in range(n)]

    order = np.argsort(-cols["loss"], kind="stable")
    page.locator('#scores th[data-column="loss"]').click()
    assert first_rows() == order[:3].tolist()
    page.locator('#scores th[data-column="loss"]').click()
    assert first_rows() == np.argsort(cols["loss"], kind="stable")[:3].tolist()
    assert page.locator("#scores tbody tr").count() == len(x)

    # Filter by class 1: only its rows in the table, only its tiles in the galleries.
    page.select_option("#class-filter", "1")
    rows = page.locator("#scores tbody tr")
    assert rows.count() == int((y == 1).sum())
    labels = page.eval_on_selector_all("#scores tbody tr", "rs => rs.map(r => r.children[1].textContent)")
    assert set(labels) == {names[1]}
    tiles = page.locator("#isolated .sample")
    shown = [int(tiles.nth(t).get_attribute("data-index")) for t in range(tiles.count()) if tiles.nth(t).is_visible()]
    hidden = [int(tiles.nth(t).get_attribute("data-index")) for t in range(tiles.count())
              if not tiles.nth(t).is_visible()]
    assert shown and hidden and all(int(y[i]) == 1 for i in shown) and all(int(y[i]) != 1 for i in hidden)
    page.select_option("#class-filter", "")
    assert page.locator("#scores tbody tr").count() == len(x) and all(
        tiles.nth(t).is_visible() for t in range(tiles.count()))

    # Jump to a sample by index (Enter), Escape closes the panel; a row click opens it too.
    panel = page.locator("#neighbor-panel")
    page.fill("#jump-index", "7")
    page.press("#jump-index", "Enter")
    assert panel.is_visible() and "Sample #7" in page.locator("#neighbor-title").inner_text()
    got = [int(panel.locator(".sample").nth(t).get_attribute("data-index")) for t in range(k + 1)]
    assert got == [7] + result.neighbor_index[7].tolist()
    page.keyboard.press("Escape")
    assert panel.is_hidden()
    page.fill("#jump-index", "9999")
    page.click("#jump-go")
    assert panel.is_hidden() and "not in the report" in page.locator("#jump-message").inner_text()
    page.locator("#scores tbody tr").nth(2).click()
    assert f"Sample #{first_rows()[2]}" in page.locator("#neighbor-title").inner_text()

    # Class x class matrix: the share of each class's network neighbours in each class, counted here.
    share = np.zeros((3, 3))
    for i in range(len(x)):
        for j in result.neighbor_index[i]:
            share[int(y[i]), int(y[j])] += 1
    share /= share.sum(1, keepdims=True)
    cells = page.eval_on_selector_all("#class-matrix tr", "rs => rs.slice(1).map(r => [...r.querySelectorAll('td')]"
                                      ".map(c => Number(c.textContent)))")
    np.testing.assert_allclose(cells, share, atol=0.006)
    assert problems == []
    page.close()
