"""The run report (``fedseg report``) and the time left on the console's round line."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedseg.cli import EXIT_BAD_INPUT, main
from fedseg.report import write_report
from server.history import MetricsHistory, RoundRecord, SiteRound
from server.report import LineReporter, format_duration
from shared.run_files import RunFiles

PNG_PREFIX = "data:image/png;base64,"
# matplotlib's first two cycle colours: the plots' site lines, used nowhere else in the page.
SITE_COLOURS = ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E))


def site(name: str, node: int, **values: object) -> SiteRound:
    return SiteRound(site=name, node_id=node, **values)  # type: ignore[arg-type]


def build_history() -> MetricsHistory:
    """Two sites, three rounds: one failure, one refusal, one refused server step, DP on."""
    config = {"num_server_rounds": 3, "strategy": "fedprox",
              "model": {"model-network": "unet", "model-norm": "instance",
                        "model-patch-size": "64,64", "model-adaptation": "none"}}
    a, b = "hospital-a", "hospital-b"
    rounds = [
        RoundRecord(round=1, aggregated=True, train_seconds=10.0, evaluate_seconds=2.0, sites=[
            site(a, 1, num_train_cases=40, train_loss=0.9, train_steps=20, num_val_cases=10,
                 val_dice=0.41, epsilon=1.25, delta=1e-5),
            site(b, 2, num_train_cases=30, train_loss=1.1, train_steps=15, num_val_cases=6,
                 val_dice=0.35, epsilon=0.9, delta=1e-5)]),
        RoundRecord(round=2, aggregated=False, train_seconds=14.0, evaluate_seconds=2.0,
                    step_refused="the model's norm grew 12.0 times (bound 10.0)", sites=[
            site(a, 1, num_train_cases=40, train_loss=0.7, train_steps=20, num_val_cases=10,
                 val_dice=0.55, epsilon=2.0, delta=1e-5),
            site(b, 2, error="timed out after 3600 s")]),
        RoundRecord(round=3, aggregated=True, train_seconds=11.0, evaluate_seconds=2.5, sites=[
            site(a, 1, num_train_cases=40, train_loss=0.6, train_steps=20, num_val_cases=10,
                 val_dice=0.62, val_dice_per_class=[0.7, 0.54], epsilon=2.75, delta=1e-5),
            site(b, 2, num_val_cases=6, val_dice=0.5,
                 refused="privacy budget spent: epsilon 3.00 of 3.00")]),
    ]
    for record in rounds:
        record.finalise()
    return MetricsHistory(run_config=config, rounds=rounds)


def build_run(root: Path, plan: bool = True) -> RunFiles:
    files = RunFiles(root / "run-20250101-120000")
    files.path.mkdir(parents=True)
    build_history().write(files)
    if plan:
        files.plan_json.write_text(json.dumps({
            "run-config": {"num-server-rounds": 3, "patch-size": "64,64"},
            "reasons": ["patch 64x64: the median image is 96x96"]}))
    return files


class Page(HTMLParser):
    """The parts of a report a test looks at: tables as cell text, images, links."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.sources: list[str] = []
        self.tags: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        for key in ("src", "href"):
            if values.get(key):
                self.sources.append(str(values[key]))
        if tag == "img":
            self.images.append(str(values.get("src")))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def rows(self) -> list[list[str]]:
        return [row for table in self.tables for row in table]


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def decode_png(src: str) -> Image.Image:
    assert src.startswith(PNG_PREFIX)
    return Image.open(io.BytesIO(base64.b64decode(src[len(PNG_PREFIX):], validate=True)))


def test_report_shows_tables_and_plots(tmp_path: Path) -> None:
    files = build_run(tmp_path)
    written = write_report(files.path)
    assert written == files.report_html
    page = parse(written)
    rows = page.rows()

    # Per-site table: first, best (round), final Dice, cases, steps, final epsilon, counts.
    assert ["hospital-a", "0.410", "0.620 (round 3)", "0.620 (by class 0.700 / 0.540)", "10",
            "40", "60",
            "2.75 (δ 1e-05)", "0", "0"] in rows
    assert ["hospital-b", "0.350", "0.500 (round 3)", "0.500", "6", "30", "15",
            "0.90 (δ 1e-05)", "1", "1"] in rows
    # Failures and refusals, with the server's refused step.
    assert ["2", "hospital-b", "failed", "timed out after 3600 s"] in rows
    assert ["3", "hospital-b", "refused to train",
            "privacy budget spent: epsilon 3.00 of 3.00"] in rows
    assert ["2", "(server)", "aggregated model refused",
            "the model's norm grew 12.0 times (bound 10.0); the previous global model was "
            "kept"] in rows
    # Epsilon per site per round, "–" where a site reported none.
    assert ["2", "2.00", "–"] in rows
    # Phase times per round.
    assert ["2", "1 of 2", "0.550", "0.700", "14.0", "2.0", "16.0", "refused"] in rows
    # The header and the plan.
    assert ["strategy", "fedprox"] in rows
    assert ["patch-size", "64,64"] in rows
    text = written.read_text()
    assert "patch 64x64: the median image is 96x96" in text
    assert "no cross-site.json" in text and "No overlays" in text

    # Dice, loss and epsilon plots, embedded as real PNGs.
    plots = [decode_png(src) for src in page.images]
    assert len(plots) == 3
    for plot in plots:
        assert plot.format == "PNG" and plot.width > 400 and plot.height > 200
        colours = np.unique(np.asarray(plot.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 50  # drawn, not blank


def test_report_is_self_contained(tmp_path: Path) -> None:
    files = build_run(tmp_path)
    page = parse(write_report(files.path))
    assert "script" not in page.tags
    assert page.sources and all(s.startswith(("data:", "#")) for s in page.sources)
    text = files.report_html.read_text()
    assert "http://" not in text and "https://" not in text


def test_cross_site_and_overlays_are_shown_when_present(tmp_path: Path) -> None:
    files = build_run(tmp_path, plan=False)
    files.cross_site_json.write_text(json.dumps({
        "sites": ["hospital-a", "hospital-b"], "models": ["global", "hospital-a only"],
        "dice": [[0.62, 0.7], [0.5, None]]}))
    files.overlays.mkdir()
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = (255, 0, 0)
    Image.fromarray(image).save(files.overlays / "hospital-a-case7.png")
    (files.overlays / "notes.png").write_text("not an image")
    page = parse(write_report(files.path))
    rows = page.rows()
    assert ["site (validation cases) \\ model", "global", "hospital-a only"] in rows
    assert ["hospital-b", "0.500", "–"] in rows
    overlays = [decode_png(src) for src in page.images if decode_png(src).size == (32, 32)]
    assert len(overlays) == 1
    text = files.report_html.read_text()
    assert "hospital-a-case7.png" in text
    assert "Not PNG images, left out: notes.png" in text
    assert "No plan" in text


def test_cli_writes_report_where_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = build_run(tmp_path)
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(files.path), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report {out}"
    assert out.is_file() and not files.report_html.exists()
    assert main(["report", str(files.path)]) == 0
    assert files.report_html.is_file()


@pytest.mark.parametrize(("case", "must_name"), [
    ("no-folder", "is not a folder"),
    ("no-metrics", "has no metrics.json"),
    ("bad-metrics", "metrics.json: is not a fedseg metrics history"),
    ("bad-cross-site", "cross-site.json: the row of site 'hospital-b' needs 2 values"),
    ("bad-output", "does not exist"),
])
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               case: str, must_name: str) -> None:
    files = build_run(tmp_path)
    args = ["report", str(files.path)]
    if case == "no-folder":
        args = ["report", str(tmp_path / "nowhere")]
    elif case == "no-metrics":
        files.metrics_json.unlink()
    elif case == "bad-metrics":
        files.metrics_json.write_text('{"rounds": [{"round": 1, "sites": [{"x": 1}]}]}')
    elif case == "bad-cross-site":
        files.cross_site_json.write_text(json.dumps(
            {"sites": ["hospital-a", "hospital-b"], "models": ["global", "local"],
             "dice": [[0.5, 0.6], [0.4]]}))
    elif case == "bad-output":
        args += ["--output", str(tmp_path / "missing" / "report.html")]
    assert main(args) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fedseg: error: ") and must_name in lines[0], lines[0]
    assert "Traceback" not in captured.err and not captured.out
    assert not files.report_html.exists()


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary on PATH (apt-get install chromium): the report was not "
                "opened in a browser")


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
         "--hide-scrollbars", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180, check=False)


def site_line_pixels(screenshot: Path) -> list[int]:
    """Count the screenshot's pixels in each site line's colour (only plots draw them)."""
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    return [int((np.abs(pixels - np.array(c)).sum(axis=-1) < 30).sum()) for c in SITE_COLOURS]


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    binary = chromium()
    files = build_run(tmp_path)
    report = write_report(files.path)
    url = report.resolve().as_uri()

    dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page()
    page.feed(dom.stdout)
    assert sum(src.startswith(PNG_PREFIX) for src in page.images) == 3
    assert ["hospital-a", "0.410", "0.620 (round 3)", "0.620 (by class 0.700 / 0.540)", "10",
            "40", "60",
            "2.75 (δ 1e-05)", "0", "0"] in page.rows()

    screenshot = tmp_path / "report.png"
    shot = run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={screenshot}",
                        "--window-size=1200,2000", url)
    assert screenshot.is_file(), shot.stderr[-2000:]
    image = Image.open(screenshot)
    assert image.size == (1200, 2000)
    # The Dice and loss plots sit in the first 2000 px: each site's line colour shows up
    # in hundreds of pixels only if the browser decoded and drew the embedded PNGs.
    blue, orange = site_line_pixels(screenshot)
    assert blue > 300 and orange > 300, (blue, orange)


def test_round_line_shows_time_left() -> None:
    lines: list[str] = []
    reporter = LineReporter(lines.append)
    history = build_history()
    for record in history.rounds:
        reporter.round_finished(record, 3)
    headers = [line for line in lines if line.startswith("round ")]
    # Round 1 took 12 s: 2 rounds left at 12 s; round 2 took 16 s: 1 round at 14 s.
    assert headers[0].endswith("(12 s, about 24 s left)")
    assert "(16 s, about 14 s left)" in headers[1]
    assert headers[2].endswith("(14 s)")  # the last round: nothing left to estimate
    assert [format_duration(s) for s in (40, 200, 3900)] == ["40 s", "3 min 20 s", "1 h 05 min"]


def test_simulate_ends_by_writing_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import simulations.simulate as simulate

    files = build_run(tmp_path)

    def finished_run(request: simulate.SimulationRequest) -> simulate.SimulationOutcome:
        # What a finished simulation leaves, without training: the report reads only files.
        return simulate.SimulationOutcome(files.path, files.metrics_json, files.metrics_csv,
                                          files.final_model, 12.0)

    monkeypatch.setattr(simulate, "run_simulation", finished_run)
    assert main(["simulate", "--output", str(tmp_path)]) == 0
    assert f"report      {files.report_html}" in capsys.readouterr().out.splitlines()
    assert sum(src.startswith(PNG_PREFIX) for src in parse(files.report_html).images) == 3


@pytest.mark.e2e
def test_a_finished_simulation_holds_cross_site_and_a_report_a_browser_renders(
        tmp_path: Path) -> None:
    code = main(["simulate", "--sites", "2", "--cases", "6", "--size", "32", "--rounds", "2",
                 "--output", str(tmp_path), "--run-config",
                 "channels='8,16' patch-size='32,32' local-steps=2"])
    assert code == 0
    (run,) = [d for d in tmp_path.iterdir() if d.name.startswith("sim-")]
    files = RunFiles(run)
    cross = json.loads(files.cross_site_json.read_text())
    assert cross["sites"] == ["site-a", "site-b"] and cross["models"] == ["global"]
    assert files.report_html.is_file()
    page = parse(files.report_html)
    assert any(row[:1] == ["site-a"] and len(row) == 2 for row in page.rows())  # the matrix
    binary = chromium()
    dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom",
                       files.report_html.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown = Page()
    shown.feed(dom.stdout)
    assert sum(src.startswith(PNG_PREFIX) for src in shown.images) >= 2
    screenshot = tmp_path / "report.png"
    run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={screenshot}",
                 "--window-size=1200,2000", files.report_html.resolve().as_uri())
    blue, orange = site_line_pixels(screenshot)
    assert blue > 300 and orange > 300, (blue, orange)
