"""The node's privacy budget ledger (privacy.budget): refusal of a charge that crosses the
budget, surviving a reload (a restart cannot reset it), corrupt files as errors, exact RDP
composition across jobs (against dp-accounting run once over all events), the private flag,
the file's mode and atomic replacement, and two ledgers on one file not overspending."""

from __future__ import annotations

import json
import math
import os
import stat

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from confide.privacy.budget import BudgetExceeded, LedgerError, PrivacyLedger
from confide.privacy.dp import RdpAccountant, SampledGaussian

DELTA = 1e-5
# a node's job: 240 examples, expected batch 64, 3 rounds x 12 local steps
Q, STEPS = 64 / 240, 36


def _reference(events, delta=DELTA):
    accountant = rdp_privacy_accountant.RdpAccountant()
    for sigma, q, steps in events:
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    return accountant.get_epsilon(delta)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "node" / "privacy-ledger.json"


def test_a_charge_that_would_cross_the_budget_is_refused_and_survives_a_restart(path):
    ledger = PrivacyLedger.open(path)
    ledger.set_budget("bbc", 6.0, DELTA)
    sigma = RdpAccountant().noise_multiplier_for(5.0, DELTA, Q, STEPS)  # one job: epsilon 5
    assert not ledger.would_exceed("bbc", sigma, Q, STEPS)
    spent = ledger.charge("bbc", sigma, Q, STEPS, job="job-1")
    assert spent == pytest.approx(_reference([(sigma, Q, STEPS)]))
    assert spent <= 5.0
    # a second identical job would compose to more than 6 (RDP: 7.16, not 5 + 5)
    assert 6.0 < _reference([(sigma, Q, STEPS)] * 2) < 10.0
    assert ledger.would_exceed("bbc", sigma, Q, STEPS)
    before = path.read_bytes()
    with pytest.raises(BudgetExceeded, match="budget of dataset 'bbc' exceeded"):
        ledger.charge("bbc", sigma, Q, STEPS, job="job-2")
    assert path.read_bytes() == before  # a refused charge writes nothing

    restarted = PrivacyLedger.open(path)
    assert restarted.spent("bbc") == pytest.approx(spent)
    assert restarted.would_exceed("bbc", sigma, Q, STEPS)
    reason = restarted.refusal("bbc", SampledGaussian(sigma, Q, STEPS))
    assert reason is not None and "epsilon" in reason
    with pytest.raises(BudgetExceeded):
        restarted.charge("bbc", sigma, Q, STEPS, job="job-2")
    # a smaller job still fits
    assert restarted.refusal("bbc", SampledGaussian(sigma * 4, Q, 5)) is None
    restarted.charge("bbc", sigma * 4, Q, 5, job="job-3")
    assert [c.job for c in PrivacyLedger.open(path).datasets["bbc"].charges] == ["job-1", "job-3"]


def test_composition_across_jobs_is_one_accountant_run_over_all_events(path):
    ledger = PrivacyLedger.open(path)
    ledger.set_budget("d", 100.0, DELTA)
    events = [(1.1, Q, STEPS), (0.8, 0.1, 50), (3.0, 1.0, 4)]
    for i, event in enumerate(events):
        ledger.charge("d", *event, job=f"j{i}")
    expected = _reference(events)
    assert ledger.spent("d") == pytest.approx(expected, rel=1e-12)
    assert PrivacyLedger.open(path).spent("d") == pytest.approx(expected, rel=1e-12)
    separately = sum(_reference([e]) for e in events)
    assert ledger.spent("d") < separately  # exact RDP composition, not a sum of epsilons
    after = ledger.epsilon_after("d", 2.0, 0.2, 10)
    assert after == pytest.approx(_reference([*events, (2.0, 0.2, 10)]), rel=1e-12)


def test_the_budget_is_computed_at_the_datasets_delta(path):
    ledger = PrivacyLedger.open(path)
    ledger.set_budget("d", 50.0, 1e-3)
    ledger.charge("d", 1.0, Q, STEPS)
    assert ledger.spent("d") == pytest.approx(_reference([(1.0, Q, STEPS)], 1e-3))
    assert ledger.spent("d") < _reference([(1.0, Q, STEPS)], 1e-7)


def test_uncapped_datasets_are_tracked_and_a_lower_budget_never_erases_spending(path):
    ledger = PrivacyLedger.open(path)
    assert ledger.spent("new") == 0.0
    assert not ledger.would_exceed("new", 0.5, 1.0, 1000)  # no budget set: not capped
    spent = ledger.charge("new", 0.5, 1.0, 10)
    assert spent > 0
    ledger.set_budget("new", spent / 2, DELTA)
    assert PrivacyLedger.open(path).spent("new") == pytest.approx(spent)
    with pytest.raises(BudgetExceeded):
        ledger.charge("new", 100.0, 0.01, 1)
    report = ledger.report()["new"]
    assert report["epsilon_spent"] == pytest.approx(spent)
    assert report["epsilon_remaining"] == 0.0 and report["charges"] == 1


def test_charging_the_same_job_again_is_a_no_op(path):
    ledger = PrivacyLedger.open(path)
    ledger.set_budget("d", 6.0, DELTA)
    sigma = RdpAccountant().noise_multiplier_for(5.0, DELTA, Q, STEPS)
    spent = ledger.charge("d", sigma, Q, STEPS, job="job-1")
    # the node restarted and the job's next round asks again: charged once, not refused
    assert PrivacyLedger.open(path).charge("d", sigma, Q, STEPS, job="job-1") == spent
    assert len(PrivacyLedger.open(path).datasets["d"].charges) == 1
    with pytest.raises(ValueError, match="job-1"):
        ledger.charge("d", sigma * 2, Q, STEPS, job="job-1")
    with pytest.raises(BudgetExceeded):  # an anonymous charge is never deduplicated
        ledger.charge("d", sigma, Q, STEPS)


def test_sigma_zero_is_infinite_spending(path):
    ledger = PrivacyLedger.open(path)
    ledger.set_budget("d", 1000.0, DELTA)
    assert ledger.would_exceed("d", 0.0, Q, 1)
    with pytest.raises(BudgetExceeded):
        ledger.charge("d", 0.0, Q, 1)


def test_private_datasets_refuse_non_private_tasks_and_the_flag_persists(path):
    ledger = PrivacyLedger.open(path)
    ledger.set_budget("medical", 3.0, DELTA, private=True)
    ledger.set_budget("public", 3.0, DELTA)
    assert "private" in ledger.refusal("medical", None)
    assert ledger.refusal("public", None) is None
    assert ledger.refusal("medical", SampledGaussian(5.0, Q, 1)) is None
    restarted = PrivacyLedger.open(path)
    assert restarted.refusal("medical", None) is not None
    restarted.set_private("medical", False)
    assert PrivacyLedger.open(path).refusal("medical", None) is None
    # set_budget without a flag keeps the flag it had
    restarted.set_private("public")
    restarted.set_budget("public", 4.0, DELTA)
    assert PrivacyLedger.open(path).datasets["public"].private


def test_file_is_mode_0600_json_and_no_temp_file_is_left(path):
    ledger = PrivacyLedger.open(path)
    assert not path.exists()  # nothing is written before the first change
    ledger.set_budget("d", 50.0, DELTA)
    ledger.charge("d", 1.0, Q, STEPS, job="j")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["format"] == "confide-privacy-ledger" and doc["version"] == 1
    assert doc["datasets"]["d"]["charges"][0]["steps"] == STEPS
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"format": "something-else", "version": 1, "datasets": {}}',
        '{"format": "confide-privacy-ledger", "version": 2, "datasets": {}}',
        '{"format": "confide-privacy-ledger", "version": 1}',
        '{"format": "confide-privacy-ledger", "version": 1, "datasets": {"d": {"epsilon": -1,'
        ' "delta": 1e-5, "private": false, "charges": []}}}',
        '{"format": "confide-privacy-ledger", "version": 1, "datasets": {"d": {"epsilon": 8,'
        ' "delta": 1e-5, "private": false, "charges": [{"noise_multiplier": 1.0,'
        ' "sampling_rate": 0.3, "steps": -4, "job": "", "at": 0}]}}}',
        '{"format": "confide-privacy-ledger", "version": 1, "datasets": {"d": {"epsilon": 8,'
        ' "delta": 1e-5, "private": "yes", "charges": []}}}',
    ],
)
def test_a_corrupt_ledger_is_an_error_not_a_reset(path, text):
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(LedgerError, match="corrupt"):
        PrivacyLedger.open(path)


def test_a_truncated_real_ledger_is_an_error(path):
    ledger = PrivacyLedger.open(path)
    ledger.set_budget("d", 50.0, DELTA)
    ledger.charge("d", 1.0, Q, STEPS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LedgerError):
        PrivacyLedger.open(path)
    with pytest.raises(LedgerError):  # an open ledger re-reads before charging
        ledger.charge("d", 1.0, Q, 1)


def test_two_ledgers_on_one_file_cannot_overspend(path):
    """A second process (or a second coordinator's task through another handle) charging from
    a stale view: the charge re-reads the file under the lock and sees the first one."""
    first = PrivacyLedger.open(path)
    first.set_budget("d", 6.0, DELTA)
    second = PrivacyLedger.open(path)
    sigma = RdpAccountant().noise_multiplier_for(5.0, DELTA, Q, STEPS)
    first.charge("d", sigma, Q, STEPS, job="a")
    assert second.spent("d") == 0.0  # its view is stale ...
    with pytest.raises(BudgetExceeded):  # ... but its charge is decided on the file
        second.charge("d", sigma, Q, STEPS, job="b")
    assert second.spent("d") == pytest.approx(first.spent("d"))


def test_bad_arguments_are_refused(path):
    ledger = PrivacyLedger.open(path)
    with pytest.raises(ValueError):
        ledger.set_budget("d", 0.0, DELTA)
    with pytest.raises(ValueError):
        ledger.set_budget("d", 1.0, 1.5)
    with pytest.raises(ValueError):
        ledger.charge("d", math.nan, Q, 1)
    with pytest.raises(ValueError):
        ledger.charge("d", 1.0, 1.2, 1)
    with pytest.raises(ValueError):
        ledger.charge("d", 1.0, Q, 2.5)
    assert not path.exists()
