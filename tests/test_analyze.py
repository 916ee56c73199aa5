"""`lrft analyze`: the numeric core against dense numpy, known updates, and the written report.

The numbers come from low-rank factors (no dense ΔW); every check here builds the dense ΔW with numpy
and computes the same quantity independently. Runs are tiny BERTs trained for two steps once per
module; runs with known updates are copies of one whose adapter tensors are overwritten.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import lrft.analysis
from lrft.analysis import numeric as an
from lrft.analysis.extract import ModuleUpdate
from lrft.analysis.figures import Grid
from tests.helpers import recipe_dict, write_recipe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def factors(rng, out_f: int, in_f: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((r, in_f)), rng.standard_normal((out_f, r))


# ======================================================================= numeric core vs dense numpy


def test_low_rank_svd_matches_dense():
    rng = np.random.default_rng(0)
    A, B = factors(rng, 20, 15, 3)
    svd = an.low_rank_svd(A, B)
    dense = B @ A
    np.testing.assert_allclose(svd.s, np.linalg.svd(dense, compute_uv=False)[:3], rtol=1e-10)
    np.testing.assert_allclose(svd.U @ np.diag(svd.s) @ svd.V.T, dense, atol=1e-12 * np.abs(dense).max())
    np.testing.assert_allclose(svd.U.T @ svd.U, np.eye(3), atol=1e-12)
    assert an.numerical_rank(svd.s, dense.shape) == 3


def test_effective_rank():
    assert an.effective_rank(np.array([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert an.effective_rank(np.array([5.0, 0.0])) == pytest.approx(1.0)
    assert an.effective_rank(np.zeros(4)) == 0.0
    s = np.array([3.0, 1.0])
    p = s / s.sum()
    assert an.effective_rank(s) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_inner_cosine_and_distance_match_dense():
    rng = np.random.default_rng(1)
    A1, B1 = factors(rng, 12, 9, 3)
    A2, B2 = factors(rng, 12, 9, 5)  # different ranks
    d1, d2 = B1 @ A1, B2 @ A2
    assert an.update_inner(A1, B1, A2, B2) == pytest.approx(np.sum(d1 * d2))
    assert an.cosine_similarity(A1, B1, A2, B2) == pytest.approx(
        np.sum(d1 * d2) / (np.linalg.norm(d1) * np.linalg.norm(d2))
    )
    assert an.relative_frobenius(A1, B1, A2, B2) == pytest.approx(np.linalg.norm(d1 - d2) / np.linalg.norm(d2))


def test_equal_up_to_scale_gives_cosine_one_and_phi_one():
    rng = np.random.default_rng(2)
    A, B = factors(rng, 16, 10, 4)
    for scale in (3.0, 0.01):
        assert an.cosine_similarity(A, B, A, scale * B) == pytest.approx(1.0)
        phi = an.subspace_similarity(an.low_rank_svd(A, B), an.low_rank_svd(A * scale, B), (16, 10))
        assert phi["left"] == pytest.approx(1.0) and phi["right"] == pytest.approx(1.0) and phi["rank"] == 4
    assert an.cosine_similarity(A, B, A, -B) == pytest.approx(-1.0)
    # the same update written with other factors (B·M, M⁻¹·A) is the same update
    M = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    assert an.cosine_similarity(A, B, np.linalg.solve(M, A), B @ M) == pytest.approx(1.0)


def test_orthogonal_updates_give_zero():
    rng = np.random.default_rng(3)
    Q_out = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    Q_in = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    # column spaces and row spaces disjoint: ΔW₁ lives on the first 3 directions, ΔW₂ on the next 3
    B1, A1 = Q_out[:, :3] * [3, 2, 1], Q_in[:, :3].T
    B2, A2 = Q_out[:, 3:6] * [1, 5, 2], Q_in[:, 3:6].T
    assert an.cosine_similarity(A1, B1, A2, B2) == pytest.approx(0.0, abs=1e-12)
    phi = an.subspace_similarity(an.low_rank_svd(A1, B1), an.low_rank_svd(A2, B2), (16, 10))
    assert phi["left"] == pytest.approx(0.0, abs=1e-12) and phi["right"] == pytest.approx(0.0, abs=1e-12)
    assert an.relative_frobenius(A1, B1, A2, B2) == pytest.approx(np.sqrt(14 + 30) / np.sqrt(30))


def test_subspace_similarity_uses_the_smaller_rank():
    rng = np.random.default_rng(4)
    A, B = factors(rng, 16, 12, 6)
    # ΔW₂ keeps the top-2 singular directions of ΔW₁: its top-2 subspace lies inside ΔW₁'s
    svd = an.low_rank_svd(A, B)
    sub = an.LowRankSVD(svd.U[:, :2], svd.s[:2], svd.V[:, :2])
    A2, B2 = sub.V.T, sub.U * sub.s
    phi = an.subspace_similarity(svd, an.low_rank_svd(A2, B2), (16, 12))
    assert phi["rank"] == 2 and phi["left"] == pytest.approx(1.0) and phi["right"] == pytest.approx(1.0)


def test_zero_update_is_undefined_not_a_number():
    rng = np.random.default_rng(5)
    A, B = factors(rng, 8, 8, 2)
    zero = np.zeros_like(B)
    assert an.cosine_similarity(A, zero, A, B) is None
    assert an.relative_frobenius(A, B, A, zero) is None
    assert an.subspace_similarity(an.low_rank_svd(A, zero), an.low_rank_svd(A, B), (8, 8)) is None
    assert an.mean_of([None, 0.5, 1.0]) == pytest.approx(0.75)


def test_eigenvalues_from_the_small_core():
    rng = np.random.default_rng(6)
    A, B = factors(rng, 14, 14, 3)
    ev = an.nonzero_eigenvalues(A, B)
    dense = np.linalg.eigvals(B @ A)
    top = dense[np.argsort(-np.abs(dense))][:3]
    np.testing.assert_allclose(np.sort_complex(ev), np.sort_complex(top), atol=1e-10 * np.abs(top).max())


def test_entries_and_difference_stats_in_row_blocks(monkeypatch):
    rng = np.random.default_rng(7)
    A1, B1 = factors(rng, 23, 11, 2)
    A2, B2 = factors(rng, 23, 11, 3)
    monkeypatch.setattr(an, "ROW_BLOCK", 5)  # several blocks and a short last one
    diff = np.abs(B1 @ A1 - B2 @ A2)
    stats = an.difference_stats(A1, B1, A2, B2)
    assert stats["max_abs"] == pytest.approx(diff.max()) and stats["mean_abs"] == pytest.approx(diff.mean())
    rows, cols = an.strided_indices(23, 6), an.strided_indices(11, 100)
    assert len(rows) == 6 and rows[0] == 0 and rows[-1] == 22 and len(cols) == 11
    np.testing.assert_allclose(an.update_entries(A1, B1, rows, cols), (B1 @ A1)[rows][:, cols])


def test_grid_rows_and_labels():
    def mod(name, kind):
        return ModuleUpdate(name, kind, None, (2, 2), np.zeros((1, 2)), np.zeros((2, 1)), {}, {})

    names = [
        ("bert.encoder.layer.0.attention.self.query", "query"),
        ("bert.encoder.layer.0.attention.self.value", "value"),
        ("bert.encoder.layer.11.attention.self.query", "query"),
    ]
    grid = Grid({n: mod(n, k) for n, k in names})
    assert grid.rows == ["bert.encoder.layer.0", "bert.encoder.layer.11"] and grid.cols == ["query", "value"]
    assert grid.label(names[2][0]) == "L11 query"
    m = grid.matrix({names[1][0]: 0.5, names[2][0]: None})
    assert m[0, 1] == 0.5 and np.isnan(m[1, 0]) and np.isnan(m[0, 0])
    t5 = Grid(
        {
            "encoder.block.0.layer.0.SelfAttention.q": mod("a", "q"),
            "decoder.block.0.layer.0.SelfAttention.q": mod("b", "q"),
        }
    )
    assert len(t5.rows) == 2  # encoder and decoder block 0 are different rows


# ================================================================================ runs on a tiny BERT


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """Trained tiny runs: lora and tlora on query, value; lora on query, key (2 steps each)."""
    from typer.testing import CliRunner

    from lrft.cli import app

    root = tmp_path_factory.mktemp("analyze")

    def train(method: str, name: str, *overrides: str) -> Path:
        path = write_recipe(
            root / f"{name}.yaml", recipe_dict(tiny_model_dir, tiny_data_dir, root / "runs", method, name)
        )
        result = CliRunner().invoke(app, ["train", str(path), "train.max_steps=2", *overrides])
        assert result.exit_code == 0, result.stderr
        return root / "runs" / name

    lora = train("lora", "lora")
    return {
        "lora": lora,
        "tlora": train("tlora", "tlora"),
        "lora_qk": retarget(lora, root / "lora_qk", "value", "key"),
        "root": root,
    }


def retarget(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of a run whose adapter sits on `new` instead of `old` (same shapes), without training."""
    from lrft.checkpoint import load_adapter, save_adapter

    copy_run(src, dst)
    state, config = load_adapter(dst / "adapter")
    config["target_modules"] = [new if t == old else t for t in config["target_modules"]]
    config["targets"] = [re.sub(rf"\.{old}$", f".{new}", t) for t in config["targets"]]
    config["base_model"].pop("fingerprint")  # it checksums the trained run's targets, which this copy no longer has
    state = {re.sub(rf"\.{old}\.adapter\.", f".{new}.adapter.", k): v for k, v in state.items()}
    save_adapter(dst / "adapter", state, config)
    stats = (dst / "adapter_stats.jsonl").read_text().replace(f'.{old}"', f'.{new}"')
    (dst / "adapter_stats.jsonl").write_text(stats)
    return dst


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "analysis"))
    return dst


def write_lora_factors(run_dir: Path, set_factors) -> None:
    """Overwrite a lora run's A and B per module with set_factors(name, A, B) → (A, B)."""
    from lrft.checkpoint import save_adapter
    from lrft.inject import adapted, saved_state
    from lrft.open_runs import load_run

    opened = load_run(run_dir)
    a, config = opened.adapted, opened.config
    with torch.no_grad():
        for name, wrapper in adapted(a.model).items():
            A, B = set_factors(name, wrapper.adapter.A.numpy().copy(), wrapper.adapter.B.numpy().copy())
            wrapper.adapter.A.copy_(torch.as_tensor(A, dtype=torch.float32))
            wrapper.adapter.B.copy_(torch.as_tensor(B, dtype=torch.float32))
    save_adapter(run_dir / "adapter", saved_state(a.model, include_head=config["head_trained"]), config)


def dense_updates(run_dir: Path) -> dict[str, np.ndarray]:
    from lrft.inject import adapted
    from lrft.open_runs import load_run

    a = load_run(run_dir).adapted
    with torch.no_grad():
        return {n: w.adapter.delta_weight().double().numpy() for n, w in adapted(a.model).items()}


@pytest.fixture
def numbers_only(monkeypatch):
    """Skip the figures (about 0.4 s each) in tests that check numbers and errors only; keep the module choice."""
    monkeypatch.setattr(
        lrft.analysis, "write_figures", lambda out_dir, runs, numbers, result, chosen: ([], {"module": chosen})
    )


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.captions = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.captions += tag == "figcaption"


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    """`lrft analyze tlora --against lora --json` once: (stdout JSON, out dir)."""
    from typer.testing import CliRunner

    from lrft.cli import app

    out = tmp_path_factory.mktemp("report") / "analysis"
    result = CliRunner().invoke(
        app, ["analyze", str(runs["tlora"]), "--against", str(runs["lora"]), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), out


def test_analysis_json_agrees_with_numpy_on_dense_updates(runs, compared):
    data, out = compared
    assert json.loads((out / "analysis.json").read_text()) == data  # --json prints analysis.json
    mine, theirs = dense_updates(runs["tlora"]), dense_updates(runs["lora"])
    assert set(data["run"]["modules"]) == set(mine) and data["run"]["method"] == "tlora"
    for name, dw in mine.items():
        entry = data["run"]["modules"][name]
        s = np.linalg.svd(dw, compute_uv=False)
        # noise scales with the spectrum's top, not with each value: fp32 factors vs a dense fp64 decomposition
        np.testing.assert_allclose(entry["singular_values"], s[:4], rtol=1e-4, atol=1e-5 * s[0])
        assert entry["fro_norm"] == pytest.approx(np.linalg.norm(dw), rel=1e-5)
        ev = np.linalg.eigvals(dw)
        top = ev[np.argsort(-np.abs(ev))][:4]
        got = np.array(entry["eigenvalues"]["real"]) + 1j * np.array(entry["eigenvalues"]["imag"])
        np.testing.assert_allclose(np.sort(np.abs(got)), np.sort(np.abs(top)), rtol=1e-3, atol=1e-4 * np.abs(top[0]))
        other = theirs[name]
        cos = np.sum(dw * other) / (np.linalg.norm(dw) * np.linalg.norm(other))
        assert data["cosine"]["per_module"][name] == pytest.approx(cos, rel=1e-4, abs=1e-6)
        rel = np.linalg.norm(dw - other) / np.linalg.norm(other)
        assert data["rel_frobenius"]["per_module"][name] == pytest.approx(rel, rel=1e-5)
        U1, _, V1t = np.linalg.svd(dw)
        U2, _, V2t = np.linalg.svd(other)
        r = data["subspace"]["rank"][name]
        eps = np.finfo(np.float32).eps  # the documented rule: σ > σ₁·max(m, n)·ε_fp32, the smaller of the two ranks
        assert r == min(np.linalg.matrix_rank(m, tol=np.linalg.norm(m, 2) * max(m.shape) * eps) for m in (dw, other))
        assert 1 <= r <= 4
        assert data["subspace"]["left"]["per_module"][name] == pytest.approx(
            np.sum((U1[:, :r].T @ U2[:, :r]) ** 2) / r, abs=1e-4
        )
        assert data["subspace"]["right"]["per_module"][name] == pytest.approx(
            np.sum((V1t[:r] @ V2t[:r].T) ** 2) / r, abs=1e-4
        )
    assert data["cosine"]["mean"] == pytest.approx(np.mean(list(data["cosine"]["per_module"].values())))
    assert data["unmatched"] == []


def test_report_renders_with_every_figure(compared):
    data, out = compared
    files = [f["file"] for f in data["figures"]]
    expected = {
        "loss.png",
        "singular_values.png",
        "eigenvalues.png",
        "effective_rank.png",
        "histograms.png",
        "factor_norms.png",
        "adapter_stats.png",
        "against_histograms.png",
        "against_factor_norms.png",
        "against_adapter_stats.png",
        "cosine.png",
        "subspace.png",
        "rel_frobenius.png",
        "update_heatmap.png",
    }
    assert expected <= set(files)
    for f in files:
        assert (out / f).read_bytes()[:8] == PNG_SIGNATURE, f
    assert all(f["caption"] for f in data["figures"])
    parser = Images()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    parser.close()
    assert len(parser.images) == len(files) and parser.captions == len(files)
    for src in parser.images:  # self-contained: every figure embedded as a PNG data URI
        assert src.startswith("data:image/png;base64,")
        import base64

        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_SIGNATURE
    md = (out / "report.md").read_text(encoding="utf-8")
    assert all(f"]({f})" in md for f in files)
    assert data["element_difference"]["module"] == next(iter(data["cosine"]["per_module"]))
    assert not list(out.parent.glob(".analysis.tmp-*"))  # written through a temporary dir


def test_block_means_of_an_update_match_dense_numpy():
    rng = np.random.default_rng(5)
    A, B = factors(rng, 10, 7, 2)
    dense = np.abs(B @ A)
    means = an.block_mean_abs(lambda r, c: an.update_entries(A, B, r, c), 10, 7, 3)
    rows, cols = np.array_split(np.arange(10), 3), np.array_split(np.arange(7), 3)
    np.testing.assert_allclose(means, [[dense[np.ix_(r, c)].mean() for c in cols] for r in rows], rtol=1e-12)
    assert an.block_mean_abs(lambda r, c: an.update_entries(A, B, r, c), 10, 7, 48).shape == (10, 7)


def test_figures_say_what_they_show(runs, monkeypatch, tmp_path):
    """What a reader of the figures needs: the layers of the spectra on a colour bar and the runs in a
    legend, a colour of its own per module, the run named on every per-run figure (the against_ ones
    too) and both on the comparisons, ΔW ordered by its singular vectors and as block means."""
    from lrft.analysis import figures

    drawn = {}
    save = figures.save

    def keep(fig, out_dir, file, caption, plots):
        drawn[file] = fig
        save(fig, out_dir, file, caption, plots)

    monkeypatch.setattr(figures, "save", keep)
    lrft.analysis.analyze(runs["tlora"], runs["lora"], tmp_path / "a")
    spectra = drawn["singular_values.png"]
    bar = [ax for ax in spectra.axes if ax.get_ylabel() == "layer"]
    assert len(bar) == 1 and [t.get_text() for t in bar[0].get_yticklabels()] == ["0", "1"]
    assert [t.get_text() for t in spectra.axes[0].get_legend().get_texts()] == ["tlora", "lora"]
    for file in ("adapter_stats.png", "against_adapter_stats.png"):
        lines = drawn[file].axes[0].get_lines()
        assert len(lines) == 4 and len({tuple(line.get_color()) for line in lines}) == 4, file
        assert lines[0].get_xdata().tolist() == [0, 1, 2]  # a point per logged step (train.log_every is 1)
    for file, run in (
        ("histograms.png", "tlora"),
        ("factor_norms.png", "tlora"),
        ("adapter_stats.png", "tlora"),
        ("against_histograms.png", "lora"),
        ("against_factor_norms.png", "lora"),
        ("against_adapter_stats.png", "lora"),
    ):
        assert drawn[file].get_suptitle().startswith(f"{run} ({run}): "), file
    for file in ("cosine.png", "subspace.png", "rel_frobenius.png"):
        assert drawn[file].get_suptitle() == "tlora (tlora) vs lora (lora)", file
    heat = drawn["update_heatmap.png"]
    titles = [ax.get_title() for ax in heat.axes if ax.get_images()]
    assert len(titles) == 6 and sum("ordered by u₁ and v₁ of ΔW tlora" in t for t in titles) == 2
    assert sum("ordered by u₁ and v₁ of ΔW lora" in t for t in titles) == 1
    assert sum(t.startswith("mean |ΔW") for t in titles) == 3


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
REPORT_WIDTH = 1280  # a laptop browser window: the report must fit it without a horizontal scroll bar
# Runs once the page has loaded: what the browser made of every image, and whether the page is wider than
# the window; written into the DOM, which --dump-dom prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, natural: i.naturalWidth,
                                                 shown: i.getBoundingClientRect().width}));
  const probe = document.createElement("pre");
  probe.id = "lrft-probe";
  probe.textContent = JSON.stringify({images, scrollWidth: document.documentElement.scrollWidth,
                                      viewport: window.innerWidth, height: document.documentElement.scrollHeight});
  document.body.appendChild(probe);
});
</script>"""


def chromium(*args, profile: Path, width: int, height: int) -> subprocess.CompletedProcess:
    """Headless Chromium, isolated: a fresh profile, no network services, no GPU, no sandbox (root in CI)."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ]
    return subprocess.run([CHROMIUM, *flags, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine (Debian: apt-get install chromium); the "
    "report is rendered in a real browser where there is one",
)
def test_the_report_in_a_real_browser(compared, tmp_path):
    """report.html as a person opens it: in headless Chromium at 1280 px, every figure loads (no broken
    image) and fits, the page has no horizontal scroll bar, and a full-page screenshot is drawn."""
    import html as html_lib

    data, out = compared
    probed = tmp_path / "probed.html"  # the report is self-contained: a copy elsewhere renders the same
    probed.write_text(
        (out / "report.html").read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8"
    )
    run = chromium(
        "--virtual-time-budget=10000",
        "--dump-dom",
        probed.as_uri(),
        profile=tmp_path / "profile-1",
        width=REPORT_WIDTH,
        height=900,
    )
    found = re.search(r'<pre id="lrft-probe">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stderr[-2000:]
    page = json.loads(html_lib.unescape(found.group(1)))
    assert len(page["images"]) == len(data["figures"])
    broken = [i["alt"] for i in page["images"] if not (i["complete"] and i["natural"] > 0)]
    assert broken == [], f"figures that did not load: {broken}"
    assert all(0 < i["shown"] <= page["viewport"] for i in page["images"])
    assert page["viewport"] == REPORT_WIDTH and page["scrollWidth"] <= page["viewport"], page["scrollWidth"]

    shot = tmp_path / "report.png"
    run = chromium(
        f"--screenshot={shot}",
        (out / "report.html").as_uri(),
        profile=tmp_path / "profile-2",
        width=REPORT_WIDTH,
        height=min(page["height"], 16000),
    )
    assert shot.is_file(), run.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[1] == REPORT_WIDTH and pixels.shape[0] == min(page["height"], 16000)
    assert float(pixels[..., :3].std()) > 0.05  # figures and text drawn, not a blank page


def test_known_updates_through_the_cli(runs, cli, numbers_only):
    """A copy with B·3 (same A) → cosine 1, φ 1; one on orthogonal complements → 0."""
    root = runs["root"]
    base = copy_run(runs["lora"], root / "known_base")
    scaled = copy_run(runs["lora"], root / "known_scaled")
    ortho = copy_run(runs["lora"], root / "known_ortho")
    rng = np.random.default_rng(0)
    chosen = {}

    def set_base(name, A, B):
        chosen[name] = factors(rng, B.shape[0], A.shape[1], A.shape[0])
        return chosen[name]

    def complement(M: np.ndarray) -> np.ndarray:
        """Orthonormal columns orthogonal to the columns of M."""
        Q = np.linalg.qr(np.concatenate([M, rng.standard_normal((M.shape[0], M.shape[0]))], axis=1))[0]
        return Q[:, M.shape[1] : 2 * M.shape[1]]

    write_lora_factors(base, set_base)
    write_lora_factors(scaled, lambda name, A, B: (chosen[name][0], 3 * chosen[name][1]))
    write_lora_factors(ortho, lambda name, A, B: (complement(chosen[name][0].T).T, complement(chosen[name][1])))

    code, stdout, stderr = cli("analyze", scaled, "--against", base, "--json")
    assert code == 0, stderr
    data = json.loads(stdout)
    for name in chosen:
        assert data["cosine"]["per_module"][name] == pytest.approx(1.0, abs=1e-5)
        assert data["subspace"]["left"]["per_module"][name] == pytest.approx(1.0, abs=1e-5)
        assert data["subspace"]["right"]["per_module"][name] == pytest.approx(1.0, abs=1e-5)
        assert data["rel_frobenius"]["per_module"][name] == pytest.approx(2.0, rel=1e-5)  # ‖3ΔW − ΔW‖/‖ΔW‖
    assert data["cosine"]["mean"] == pytest.approx(1.0, abs=1e-5)

    code, stdout, stderr = cli("analyze", ortho, "--against", base, "--json", "--out", root / "ortho_analysis")
    assert code == 0, stderr
    data = json.loads(stdout)
    for name in chosen:
        assert data["cosine"]["per_module"][name] == pytest.approx(0.0, abs=1e-5)
        assert data["subspace"]["left"]["per_module"][name] == pytest.approx(0.0, abs=1e-5)
        assert data["subspace"]["right"]["per_module"][name] == pytest.approx(0.0, abs=1e-5)
    assert (root / "ortho_analysis" / "report.html").is_file() and not (ortho / "analysis").exists()


def test_unmatched_targets_are_listed_not_fatal(runs, cli, numbers_only, tmp_path):
    code, stdout, stderr = cli("analyze", runs["lora"], "--against", runs["lora_qk"], "--out", tmp_path / "a", "--json")
    assert code == 0, stderr
    data = json.loads(stdout)
    values = [n for n in data["run"]["modules"] if n.endswith("value")]
    keys = [n for n in data["against"]["modules"] if n.endswith("key")]
    assert sorted(data["unmatched"]) == sorted(values + keys) and len(values) == len(keys) == 2
    assert data["unmatched_detail"] == {"only_in_run": values, "only_in_against": keys}
    assert all(n.endswith("query") for n in data["cosine"]["per_module"])
    assert "only one run" in stderr
    report = (tmp_path / "a" / "report.html").read_text(encoding="utf-8")
    assert all(n in report for n in values + keys)


def test_different_base_model_is_refused(runs, cli):
    other = copy_run(runs["lora"], runs["root"] / "other_base")
    config_path = other / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model"]["name"] = "roberta-large"
    config_path.write_text(json.dumps(config))
    code, _, stderr = cli("analyze", runs["tlora"], "--against", other)
    assert code == 2
    assert "another base model" in stderr and "roberta-large" in stderr
    assert not (runs["tlora"] / "analysis").exists()  # refused before anything is loaded or written


def test_single_run_filters_and_module_choice(runs, cli, numbers_only, tmp_path):
    code, stdout, stderr = cli(
        "analyze", runs["tlora"], "--modules", "layer.1", "--module", "value", "--out", tmp_path / "one", "--json"
    )
    assert code == 0, stderr
    data = json.loads(stdout)
    assert list(data["run"]["modules"]) == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    assert "cosine" not in data and data["update_heatmap"]["module"].endswith("layer.1.attention.self.value")
    assert "alpha" in data["run"]["modules"]["bert.encoder.layer.1.attention.self.query"]["scalars"]
    # plain output: the report path and a line per module on stdout
    code, stdout, _ = cli("analyze", runs["tlora"], "--modules", "layer.0", "--out", tmp_path / "two")
    assert code == 0 and "report.html" in stdout and "layer.0.attention.self.value" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--module", "nope"], "--module: 'nope' is not an analysed module"),
        (["--module", "attention"], "matches 4 modules"),
        (["--modules", "nope"], "--modules: nope matches none"),
    ],
)
def test_bad_module_arguments_are_user_errors(runs, cli, args, message):
    code, _, stderr = cli("analyze", runs["lora"], *args, "--out", runs["root"] / "never")
    assert code == 2 and message in stderr and "bert.encoder.layer.0.attention.self.query" in stderr
    assert not (runs["root"] / "never").exists()


def test_out_dir_that_is_not_an_analysis_is_refused(runs, cli):
    code, _, stderr = cli("analyze", runs["lora"], "--out", runs["tlora"])
    assert code == 2 and "is an lrft run dir" in stderr and "whatever the flags" in stderr
    assert (runs["tlora"] / "recipe.yaml").is_file()
    yours = runs["root"] / "not-an-analysis"
    yours.mkdir(exist_ok=True)
    (yours / "notes.txt").write_text("the user's own file")
    code, _, stderr = cli("analyze", runs["lora"], "--out", yours)
    assert code == 2 and "not an lrft analysis dir" in stderr and (yours / "notes.txt").is_file()
