"""``confide bench ringsig``'s anonymous round, run small: it goes through the coordinator's
inbox as the service does (a tensor-map update and its stream digest), so an API change there
breaks this test rather than the 1,000-node bench."""

from __future__ import annotations


def test_a_small_anonymous_round_files_every_update_and_is_judged_not_measured():
    from confide.bench.ringsig import _anonymous_round, _round_goal

    result = _anonymous_round(12, 4)
    assert result["filed"] == result["nodes"] == 12
    assert result["anonymity_set"] == 4 and 4 <= result["set_min"] <= result["set_max"] < 8
    assert result["verify_cpu_s"] > 0 and result["whole_ring_samples"] == 3
    goal = _round_goal(result)  # 12 nodes is not the goal's 1,000: recorded as not measured
    assert goal["met"] is None and "not measured" in goal["text"]
