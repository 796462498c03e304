"""`confide bench soak` in small: simulated sessions speak the real protocol to a real
coordinator, a job runs over all of them, the report is written."""

from __future__ import annotations

import argparse
import json

from confide.bench import soak


def test_soak_holds_simulated_sessions_and_runs_rounds_over_them(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    args = parser.parse_args(["--sessions", "20", "--rounds", "2", "--hold", "0.5",
                              "--heartbeat", "0.5", "--duration", "120",
                              "--workdir", str(tmp_path / "work"),
                              "--out", str(tmp_path / "out")])
    assert soak.run_benchmark(args) == 0
    printed = capsys.readouterr().out
    assert "sessions requested / held" in printed and "20 / 20" in printed
    report = json.loads((tmp_path / "out" / "soak.json").read_text())["result"]
    assert report["sessions_held"] == 20 and report["rounds_completed"] == 2
    assert all(r["participants"] == 20 for r in report["rounds"])
    assert report["coordinator_rss_mb_peak"] > 0 and not report["errors"]
    assert (tmp_path / "out" / "soak.png").stat().st_size > 0
