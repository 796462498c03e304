"""Benchmark arguments: `--methods` is checked before any work starts."""

from __future__ import annotations

import pytest

from confide.bench.federated import DEFAULT_METHODS, parse_methods
from confide.bench.split import DEFAULT_METHODS as SPLIT_METHODS
from confide.cli.main import main as confide_main


def test_methods_split_on_semicolons_or_on_commas_without_json():
    expected = [("fedavg-lora", {}), ("ferret", {})]
    assert parse_methods("fedavg-lora;ferret") == expected
    assert parse_methods("fedavg-lora, ferret") == expected
    assert parse_methods('cellm:{"density": 0.1, "scope": "tensor"};ferret') == [
        ("cellm", {"density": 0.1, "scope": "tensor"}), ("ferret", {})]
    # every default row parses (JSON parameters with commas inside included)
    assert len(parse_methods(DEFAULT_METHODS)) == DEFAULT_METHODS.count(";") + 1 == 16
    # a row's spec keys go to the job spec, the rest to the method
    from confide.bench.federated import spec_overrides

    assert spec_overrides({"k": 8, "optimizer": "sgd", "lora_r": 4}) == (
        {"k": 8}, {"optimizer": "sgd", "lora_r": 4})
    assert len(parse_methods(SPLIT_METHODS)) == 9


@pytest.mark.parametrize("text,message", [
    ("fedavg-lora;nope", "unknown method 'nope'"),
    ('cellm:{"densty": 1}', "no parameter"),
    ('cellm:{"density": 2}', "density must be"),
    ("cellm:{bad", "not JSON"),
    ("cellm:[1]", "must be a JSON object"),
    (" ; ", "no method given"),
])
def test_bad_methods_are_refused_with_a_clear_message(text, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(text)


def test_the_cli_refuses_bad_methods_before_starting_anything(tmp_path, capsys):
    code = confide_main(["bench", "federated", "--methods", "fedavg-lora;nope",
                         "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_the_methods_goals_are_judged_against_their_references_or_not_measured():
    from confide.bench.federated import method_goals

    def row(method, accuracy, up):
        return {"method": method, "accuracy": accuracy, "uplink_bytes_per_node_per_round": up}

    goals = method_goals([row("fedavg-full", 0.90, 91e6), row("ferret k=24", 0.86, 24e3),
                          row("fedavg-lora", 0.95, 900e3), row("cellm density=0.1", 0.92, 80e3)])
    ferret, point, cellm = goals
    assert ferret["met"] is True and abs(ferret["measured"] - 0.04) < 1e-9
    assert point["measured"] is None and point["text"] == "not run"  # 24 KB > 18 KB
    assert cellm["met"] is False and abs(cellm["measured"] - 0.03) < 1e-9
    assert all(g["met"] is None for g in method_goals([row("fedavg-lora", 0.9, 1e6)]))


def test_merged_runs_keep_old_rows_replace_same_names_and_refuse_another_workload(tmp_path):
    import json

    from confide.bench.federated import dp_goals, merged_report

    workload = {"nodes": 3, "rounds": 3, "base": "minilm", "alpha": 0.5, "max_per_node": 240,
                "max_length": 128, "lr": 2e-3, "test_size": 300, "seed": 0,
                "methods": 'fedavg-lora;dp-lora:{"target_epsilon": 8, "rounds": 3}'}
    old_rows = [{"method": "fedavg-lora", "accuracy": 0.95},
                {"method": "dp-lora target_epsilon=8,rounds=3", "accuracy": 0.80}]
    path = tmp_path / "federated.json"
    path.write_text(json.dumps({"workload": workload, "results": old_rows, "time": "t0",
                                "accuracy_before": 0.2}))
    new = {"workload": {**workload, "methods": "x"}, "accuracy_before": 0.3, "runs": [{"c": 1}],
           "results": [{"method": "dp-lora target_epsilon=8,rounds=3", "accuracy": 0.90,
                        "params": {"target_epsilon": 8, "rounds": 3}}]}
    merged = merged_report(path, new)
    assert [r["method"] for r in merged["results"]] == ["fedavg-lora",
                                                  "dp-lora target_epsilon=8,rounds=3"]
    assert merged["results"][1]["accuracy"] == 0.90  # the same name: replaced
    assert merged["results"][0]["params"] == {}  # recovered from the old run's methods
    assert len(merged["runs"]) == 2 and merged["accuracy_before"] == 0.2
    assert dp_goals(merged["results"])[0]["measured"] == 0.90
    with pytest.raises(SystemExit, match="max_length: 128 vs 64"):
        merged_report(path, {**new, "workload": {**workload, "max_length": 64}})


def test_dimat_goals_take_the_worst_round_against_gossip_or_say_not_measured():
    from confide.bench.dimat import dimat_goals

    def row(topology, merge, accs, state="COMPLETED"):
        return {"topology": topology, "merge": merge, "state": state,
                "rounds": [{"accuracy_mean": a} for a in accs]}

    mlp = [row("ring", "dimat", [0.5, 0.7, 0.8]), row("ring", "gossip", [0.4, 0.72, 0.7]),
           row("full", "dimat", [0.6, 0.8]), row("full", "gossip", [0.6, 0.7])]
    daemons = [row("ring", "dimat", [0.9]), row("ring", "gossip", [0.8], state="FAILED")]
    ring_mlp, full_mlp, ring_daemons, full_daemons = dimat_goals(daemons, mlp)
    assert ring_mlp["met"] is False and abs(ring_mlp["measured"] + 0.02) < 1e-9
    assert full_mlp["met"] is True and full_mlp["measured"] == 0.0  # a tie counts as at
    assert ring_daemons["met"] is None and full_daemons["met"] is None  # gossip failed / absent
