"""The data owner's privacy budget ledger: what each dataset may still spend, kept on disk.

The node, not the coordinator, enforces its budget: before it trains on a dataset with DP it
asks this ledger whether the job fits, charges it, and only then trains. Pure building block
(files and numbers only; nothing from ``node``/``coordinator``/``protos``).

Per dataset the ledger keeps

* the budget ``(epsilon, delta)`` the owner granted (or none: spending is tracked, not capped),
* whether the dataset is *private*: then every task on it must be differentially private
  (:meth:`PrivacyLedger.refusal` says why a non-private one is refused),
* every DP run charged to it, as :class:`privacy.dp.SampledGaussian` events ``(sigma, q, steps)``
  with the job that spent it.

Spending is never a sum of epsilons: :meth:`PrivacyLedger.spent` composes all the dataset's
events in one RDP accountant (:meth:`privacy.dp.RdpAccountant.composed_epsilon`) at the
budget's delta, which is exact RDP composition across jobs (and tighter than adding).

Durability: every change is written to a JSON file (temp file in the same folder, fsync,
``os.replace``, fsync of the folder; mode 0600) while an exclusive ``flock`` on a side lock
file is held, and :meth:`PrivacyLedger.charge` re-reads the file under that lock before it
decides, so two processes sharing a node folder cannot both spend the last of a budget. A
restart loads the file; a missing file starts empty (a new node), but a file that exists and
does not parse or validate raises :class:`LedgerError`: resetting a corrupt ledger to zero
would hand out the budget again. Charges are never refunded (a job that stops early may
already have released noised updates), so the ledger is conservative.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confide.privacy.dp import RdpAccountant, SampledGaussian

__all__ = [
    "FORMAT",
    "BudgetExceeded",
    "Charge",
    "DatasetBudget",
    "LedgerError",
    "PrivacyLedger",
]

FORMAT = "confide-privacy-ledger"
VERSION = 1
FILE_MODE = 0o600


class LedgerError(Exception):
    """The ledger file exists but cannot be trusted (unreadable, not JSON, wrong shape or
    values). The node must stop and let its operator look, never start from zero."""


class BudgetExceeded(Exception):
    """A charge would take a dataset past its budget, or a non-private task was asked of a
    private dataset. ``str(exc)`` is the reason to send to the coordinator and the user."""


@dataclass(frozen=True)
class Charge:
    """One DP run charged to a dataset: the accounting event plus who spent it and when."""

    event: SampledGaussian
    job: str = ""
    at: float = 0.0
    """Unix time of the charge (informational)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.event.noise_multiplier,
            "sampling_rate": self.event.sampling_rate,
            "steps": self.event.steps,
            "job": self.job,
            "at": self.at,
        }


@dataclass
class DatasetBudget:
    """A dataset's budget, privacy flag and charges. ``epsilon`` None means uncapped."""

    epsilon: float | None = None
    delta: float = 1e-5
    private: bool = False
    charges: list[Charge] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "private": self.private,
            "charges": [c.to_json() for c in self.charges],
        }


def _event(noise_multiplier: float, sampling_rate: float, steps: int) -> SampledGaussian:
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number, got {noise_multiplier!r}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not (isinstance(sampling_rate, int | float) and 0 <= sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return SampledGaussian(float(noise_multiplier), float(sampling_rate), int(steps))


def _check_budget(epsilon: float | None, delta: float) -> None:
    if epsilon is not None and not (
        isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0
    ):
        raise ValueError(f"epsilon must be a finite number > 0 (or None), got {epsilon!r}")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _parse(text: str, path: Path) -> dict[str, DatasetBudget]:
    """The ledger file's datasets; LedgerError for anything that is not exactly our format."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if doc.get("version") != VERSION:
            raise ValueError(f"unsupported version {doc.get('version')!r}")
        raw = doc["datasets"]
        if not isinstance(raw, dict):
            raise ValueError("'datasets' is not an object")
        datasets = {}
        for name, entry in raw.items():
            epsilon, delta, private = entry["epsilon"], entry["delta"], entry["private"]
            _check_budget(epsilon, delta)
            if not isinstance(private, bool):
                raise ValueError(f"'private' of {name!r} is not a boolean")
            charges = []
            for c in entry["charges"]:
                event = _event(c["noise_multiplier"], c["sampling_rate"], c["steps"])
                if not isinstance(c["job"], str) or not isinstance(c["at"], int | float):
                    raise ValueError(f"a charge of {name!r} has a bad job or time")
                charges.append(Charge(event, c["job"], float(c["at"])))
            datasets[name] = DatasetBudget(
                None if epsilon is None else float(epsilon), float(delta), private, charges
            )
        return datasets
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerError(
            f"privacy ledger {path} is corrupt ({exc}); refusing to start from an empty "
            "budget. Restore it from a backup or inspect it by hand."
        ) from exc


class PrivacyLedger:
    """The budget ledger of one node, persisted in ``path`` (a JSON file in the node's folder).

    Open it with :meth:`open` at node start; call :meth:`set_budget` with the owner's
    configuration; before a task on a dataset call :meth:`refusal` (None means go) and then
    :meth:`charge` with the job's planned event (it re-checks under the file lock and raises
    :class:`BudgetExceeded`, so a check-then-charge race cannot overspend). :meth:`report` is
    what ``confide status`` and events show.
    """

    def __init__(
        self,
        path: Path,
        datasets: dict[str, DatasetBudget],
        accountant: RdpAccountant | None = None,
    ) -> None:
        self.path = Path(path)
        self.datasets = datasets
        self.accountant = accountant or RdpAccountant()

    # ------------------------------------------------------------------ persistence

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], accountant: RdpAccountant | None = None
    ) -> PrivacyLedger:
        """Load the ledger at ``path``; a missing file is an empty ledger (written on the first
        change), a corrupt one raises :class:`LedgerError`."""
        ledger = cls(Path(path), {}, accountant)
        with ledger._locked():
            ledger.datasets = ledger._read()
        return ledger

    def _read(self) -> dict[str, DatasetBudget]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"privacy ledger {self.path} cannot be read: {exc}") from exc
        return _parse(text, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive flock on ``<path>.lock`` (created 0600) for a read-modify-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self) -> None:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "datasets": {name: d.to_json() for name, d in sorted(self.datasets.items())},
        }
        data = json.dumps(doc, indent=1, allow_nan=False).encode()
        folder = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, DatasetBudget]]:
        """Under the lock: re-read the file (another process may have charged), let the body
        change it, write it back; on an exception nothing is written."""
        with self._locked():
            datasets = self._read()
            yield datasets
            self.datasets = datasets
            self._write()

    # ------------------------------------------------------------------ owner's settings

    def set_budget(
        self,
        dataset: str,
        epsilon: float | None,
        delta: float = 1e-5,
        *,
        private: bool | None = None,
    ) -> None:
        """Set a dataset's budget (epsilon None: uncapped) and, if given, its private flag.
        Past charges are kept: lowering the budget below what was spent refuses every further
        DP task on it; it never erases spending."""
        _check_budget(epsilon, delta)
        with self._transaction() as datasets:
            entry = datasets.setdefault(dataset, DatasetBudget())
            entry.epsilon = None if epsilon is None else float(epsilon)
            entry.delta = float(delta)
            if private is not None:
                entry.private = bool(private)

    def set_private(self, dataset: str, private: bool = True) -> None:
        """Mark a dataset private (every task on it must be DP) or not."""
        with self._transaction() as datasets:
            datasets.setdefault(dataset, DatasetBudget()).private = bool(private)

    # ------------------------------------------------------------------ spending

    def _entry(self, dataset: str) -> DatasetBudget:
        return self.datasets.get(dataset) or DatasetBudget()

    def _epsilon(self, entry: DatasetBudget, extra: SampledGaussian | None = None) -> float:
        events = [c.event for c in entry.charges] + ([extra] if extra else [])
        return self.accountant.composed_epsilon(events, entry.delta)

    def spent(self, dataset: str) -> float:
        """epsilon spent on ``dataset`` at its budget's delta: all its charges composed in one
        RDP accountant (0 for a dataset never charged)."""
        return self._epsilon(self._entry(dataset))

    def epsilon_after(
        self, dataset: str, noise_multiplier: float, sampling_rate: float, steps: int
    ) -> float:
        """What :meth:`spent` would be after charging this run."""
        event = _event(noise_multiplier, sampling_rate, steps)
        return self._epsilon(self._entry(dataset), event)

    def would_exceed(
        self, dataset: str, noise_multiplier: float, sampling_rate: float, steps: int
    ) -> bool:
        """True if charging this run would take the dataset past its epsilon budget."""
        entry = self._entry(dataset)
        if entry.epsilon is None:
            return False
        event = _event(noise_multiplier, sampling_rate, steps)
        return self._epsilon(entry, event) > entry.epsilon

    def refusal(
        self,
        dataset: str,
        event: SampledGaussian | None,
    ) -> str | None:
        """Why this node must refuse a task on ``dataset``, or None if it may run it.

        ``event`` is the task's planned DP spending (:func:`privacy.dpsgd.planned_event`), or
        None for a non-private task (refused on a private dataset)."""
        entry = self._entry(dataset)
        if event is None:
            if entry.private:
                return f"dataset {dataset!r} is private: this node runs only DP tasks on it"
            return None
        if entry.epsilon is None:
            return None
        event = _event(*event)
        after = self._epsilon(entry, event)
        if after > entry.epsilon:
            spent = self._epsilon(entry)
            return (
                f"privacy budget of dataset {dataset!r} exceeded: spent epsilon {spent:.4g} of "
                f"{entry.epsilon:g} (delta {entry.delta:g}); this task (sigma "
                f"{event.noise_multiplier:.4g}, q {event.sampling_rate:.4g}, {event.steps} "
                f"steps) would bring it to {after:.4g}"
            )
        return None

    def charge(
        self,
        dataset: str,
        noise_multiplier: float,
        sampling_rate: float,
        steps: int,
        *,
        job: str = "",
    ) -> float:
        """Record a DP run on ``dataset`` before it starts, and return the new :meth:`spent`.

        Re-reads the file under the lock, refuses with :class:`BudgetExceeded` if the run would
        cross the budget (nothing is written then), otherwise appends the charge and persists
        it atomically. Charge *before* training: a crash mid-job must not leave the spending
        unrecorded.

        Idempotent per job: with a non-empty ``job`` already charged on this dataset with the
        same event, nothing is added (a node that restarts mid-job and gets the job's next task
        charges it once); the same job with a different event is a ValueError."""
        event = _event(noise_multiplier, sampling_rate, steps)
        with self._transaction() as datasets:
            self.datasets = datasets
            previous = [c for c in self._entry(dataset).charges if job and c.job == str(job)]
            if previous:
                if any(c.event != event for c in previous):
                    raise ValueError(
                        f"job {job!r} was charged on {dataset!r} with {previous[0].event}, "
                        f"not {event}"
                    )
                return self.spent(dataset)
            reason = self.refusal(dataset, event)
            if reason is not None:
                raise BudgetExceeded(reason)
            entry = datasets.setdefault(dataset, DatasetBudget())
            entry.charges.append(Charge(event, str(job), time.time()))
        return self.spent(dataset)

    def report(self) -> dict[str, dict[str, Any]]:
        """Per dataset: budget, delta, spent, remaining, private flag and number of charges
        (JSON-ready, for ``confide status``, the SDK and events). ``epsilon_remaining`` is
        budget minus spent, for display only: under RDP composition a job's cost depends on
        what was spent before, so ask :meth:`would_exceed` / :meth:`refusal` to decide."""
        out = {}
        for name, entry in sorted(self.datasets.items()):
            spent = self._epsilon(entry)
            out[name] = {
                "epsilon_budget": entry.epsilon,
                "delta": entry.delta,
                "epsilon_spent": spent,
                "epsilon_remaining": None
                if entry.epsilon is None
                else max(0.0, entry.epsilon - spent),
                "private": entry.private,
                "charges": len(entry.charges),
            }
        return out
