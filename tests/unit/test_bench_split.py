"""``confide bench split``'s goals, judged on a run's rows (no run needed)."""

from __future__ import annotations


def test_the_split_goals_are_judged_on_the_rows_or_not_measured():
    from confide.bench.split import split_goals

    def row(method, accuracy, mb):
        return {"method": method, "accuracy": accuracy, "bytes_per_device_per_round": mb * 1e6,
                "bytes_vs_full": mb / 150}

    compute = [{"base": "smollm2", "task": "sequence-classification",
                "device_train_flop_share": 0.033, "device_vs_full_finetuning": 0.0226},
               {"base": "smollm2", "task": "causal-lm", "device_train_flop_share": 0.229,
                "device_vs_full_finetuning": 0.15}]
    rows = [row("fedavg-full", 0.93, 150), row("sfprompt tail_layers=0", 0.92, 100),
            row("sfprompt tail_layers=0,prune_gamma=0.5", 0.86, 50),
            row("sfprompt tail_layers=0,prune_gamma=0.5,prune_warmup_steps=10", 0.90, 50),
            row("sfprompt tail_layers=0,prune_gamma=0.5,prune_method=random", 0.88, 50),
            row("sfprompt tail_layers=0,prune_gamma=0.5,prune_warmup_steps=10,round_steps=6,"
                "local_loss_steps=3", 0.905, 30)]
    comm, share, el2n = split_goals(rows, compute)
    # 100 MB is 67% of fedavg-full's: too much; the best row at <= 47% is the 0.905 one
    assert comm["met"] is False and abs(comm["measured"] - 0.025) < 1e-9
    assert share["met"] is True and share["measured"] == 0.033
    assert "causal LM 22.9%" in share["text"]
    # the warmed-up EL2N row against the random control, not the untrained one
    assert el2n["met"] is True and abs(el2n["measured"] - 0.02) < 1e-9
    comm, share, el2n = split_goals(rows[:2], [])
    assert comm["met"] is None and share["met"] is None and el2n["met"] is None
