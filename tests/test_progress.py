"""The progress display: phases with their time, an ETA only from the first results (never
from before the workers are up), rate and elapsed time, timestamped lines and a final line
when the output is not a terminal, and a live display on one."""

from __future__ import annotations

import io
import re

from evomerge.search.app.progress import Progress, phase

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


class Clock:
    """Time that moves only when the test says so (the display's clock seam)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress(clock: Clock, out: io.StringIO, **kw: object) -> Progress:
    return Progress(20, done=4, stream=out, every_s=10.0, terminal=False, clock=clock, wall=lambda: 0.0, **kw)


def test_eta_starts_from_the_first_results_not_from_start_up() -> None:
    clock, out = Clock(), io.StringIO()
    progress = _progress(clock, out)
    progress.phase("start-up: Ray and workers")
    clock.now += 50  # a slow Ray start: no result, no ETA
    progress.update(4, None, 2, 2)
    assert progress.eta_s() is None and "ETA -" in progress.status()
    clock.now += 5
    progress.update(6, 0.5, 2, 2)  # the first results anchor the rate
    assert progress.eta_s() is None
    clock.now += 4
    progress.update(7, 0.6, 2, 2)  # one more result is not yet a pace
    assert progress.eta_s() is None
    clock.now += 6
    progress.update(8, 0.6, 2, 2)  # 2 trials in 10 s: 12 to go take 60 s
    assert progress.rate() == 0.2 and progress.eta_s() == 60.0
    assert "12.0/min" in progress.status() and "ETA 1m00s" in progress.status()
    assert "elapsed 1m05s" in progress.status()  # since the display started, start-up included


def test_redirected_output_has_timestamped_phases_throttled_lines_and_a_final_line() -> None:
    clock, out = Clock(), io.StringIO()
    progress = _progress(clock, out)
    progress.phase("start-up: Ray and workers")
    clock.now += 30
    progress.update(5, 0.4, 2, 2)  # phase search, and a line
    clock.now += 1
    progress.update(6, 0.5, 2, 2)  # within every_s: no line
    progress.phase("held-out re-scoring")
    clock.now += 3
    progress.close("6 evaluated")
    lines = out.getvalue().splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    texts = [STAMP.sub("", line) for line in lines]
    assert texts[0] == "start-up: Ray and workers ..."
    assert texts[1] == "search ..." and texts[2].startswith("5/20 trials")
    assert texts[3] == "held-out re-scoring ..."
    # The final line carries the last state (6, not the last printed 5) and the summary.
    assert texts[4].startswith("6/20 trials") and "6 evaluated (total 34s)" in texts[4]
    assert len(texts) == 5


def test_a_phase_outside_a_search_says_when_it_ends() -> None:
    out = io.StringIO()
    try:
        with phase("replay: writing", stream=out):
            raise OSError("disk full")
    except OSError:
        pass
    texts = [STAMP.sub("", line) for line in out.getvalue().splitlines()]
    assert texts[0] == "replay: writing ..." and texts[1].startswith("replay: writing: stopped (total ")


def test_terminal_display_shows_the_phases_live() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress(20, stream=out, terminal=True, clock=clock)
    progress.phase("start-up: Ray and workers")
    clock.now += 2
    progress.update(3, 0.25, 1, 2)
    progress.close("3 evaluated")
    text = out.getvalue()
    assert "start-up: Ray and workers" in text and "search" in text
    assert "3/20 trials" in text and "3 evaluated" in text and "\x1b[" in text  # drawn with ANSI codes
