"""optuna-dashboard as a user sees it, rendered by Debian's headless chromium on a real
search of the demo models: the study's name and metric name, the stored figures, and a
trial page with its per-task and held-out scores. Screenshots go to the test's folder
and are copied to /tmp/evomerge-screens for a person to look at."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import free_port, system_tool
from tests.test_search_e2e import demo_config, evomerge, query, served_dashboard

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray

STUDY = "dash-browser"
SCREENS = Path("/tmp/evomerge-screens")


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A CMA-ES search of 9 trials (5 baselines, one generation), then held-out re-scores."""
    tmp = tmp_path_factory.mktemp("dash")
    cfg = demo_config(tmp / "s.yaml", max_trials=9, limit=8)
    evomerge("search", str(cfg), "--storage", f"sqlite:///{tmp / 's.db'}", "--workers", "1", "--study", STUDY,
             cwd=tmp)
    return tmp, tmp / "s.db"


class Browser:
    """Headless chromium with a home and profile of its own; the page is a React app, so it
    gets virtual time to fetch the API and draw."""

    def __init__(self, exe: str, home: Path) -> None:
        self.exe, self.home = exe, home
        home.mkdir(parents=True, exist_ok=True)

    def _run(self, url: str, *args: str) -> str:
        cmd = [self.exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={self.home / 'profile'}", "--virtual-time-budget=15000", *args, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={"HOME": str(self.home)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    def dom(self, url: str) -> str:
        return self._run(url, "--dump-dom")

    def screenshot(self, url: str, out: Path, height: int) -> Path:
        self._run(url, f"--screenshot={out}", f"--window-size=1400,{height}")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000, out
        SCREENS.mkdir(exist_ok=True)
        shutil.copy(out, SCREENS / out.name)
        return out


def _text(dom: str) -> str:
    """The page's visible text, tags dropped (what a reader of the page sees, in order)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_dashboard_renders_study_figures_and_trial_scores(searched: tuple[Path, Path], tmp_path: Path) -> None:
    tmp, db = searched
    browser = Browser(system_tool("chromium"), tmp_path / "chromium")
    heldout = query(db, "select trial_number, fitness, scores_json, heldout_json from evomerge_candidates "
                        "where heldout_json is not null and origin = 'cma' order by fitness desc")
    assert heldout, "no evolved trial was re-scored on the held-out split"
    number, fitness, scores, held = heldout[0]
    port = free_port()
    with served_dashboard(db, tmp, port) as get:
        summaries = json.loads(get("/api/studies"))["study_summaries"]
        assert [s["study_name"] for s in summaries] == [STUDY]  # no companion study any more
        base = f"/dashboard/studies/{summaries[0]['study_id']}"
        study_url, trial_url = f"http://127.0.0.1:{port}{base}", f"http://127.0.0.1:{port}{base}/trials?numbers={number}"

        page = _text(browser.dom(study_url))
        assert STUDY in page
        # The metric's name where optuna-dashboard names the objective (its history's
        # y-axis selector and axis title), never Optuna's placeholder.
        assert " fitness " in page and "Objective 0" not in page
        assert "Fitness over trials against the baselines" in page  # the stored figures, drawn
        assert "Best evolved recipe, trial" in page and "dare_ties genes" in page
        browser.screenshot(study_url, tmp_path / "study.png", 2400)

        page = _text(browser.dom(trial_url))
        assert f"Trial {number} " in page and "Scores (search split and held-out split)" in page
        for task, value in json.loads(scores).items():  # the note's row: task, search score, held-out score
            assert f"{task} {value:.4f} {json.loads(held)[task]:.4f}" in page
        assert f"fitness {fitness:.4f}" in page
        browser.screenshot(trial_url, tmp_path / "trial.png", 1400)


def test_dashboard_answers_while_another_request_is_unfinished(searched: tuple[Path, Path]) -> None:
    """One client that never finishes its request must not stall everyone else: bottle's
    development server (optuna_dashboard.run_server) handles one request at a time."""
    tmp, db = searched
    port = free_port()
    with served_dashboard(db, tmp, port) as get:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stuck:
            stuck.sendall(b"GET /api/studies HTTP/1.1\r\nHost: x\r\n")  # headers never end
            assert json.loads(get("/api/studies"))["study_summaries"][0]["study_name"] == STUDY
