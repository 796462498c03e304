"""Job specs: defaults for what a user left unset, and validation with actionable errors.

A proto3 field left unset reads as zero or empty, so "0" means "the default" for every field
whose zero makes no sense; the coordinator fills those in once, at submission, and stores the
complete spec so every node of every round sees the same values.
"""

from __future__ import annotations

import math
import re

from confide.node.methods import get_method, method_params
from confide.node.methods.secure_layout import secure_refusal
from confide.protos.anonymity_sets import (
    DEFAULT_ANONYMITY_SET,
    MAX_ANONYMITY_SET,
    MIN_ANONYMITY_SET,
    set_size,
)
from confide.protos.bases import base_problem
from confide.v1 import coordinator_pb2 as pb

TASKS = ("sequence-classification", "causal-lm")
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")
DATASET_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: local optimizers a job may ask for (node/training/lora.py)
OPTIMIZERS = ("adamw", "sgd")
#: the longest a round may wait for its results or its nodes (a week)
MAX_TIMEOUT_S = 7 * 24 * 3600.0

DEFAULTS = {
    "method": "fedavg-lora",
    "rounds": 3,
    "min_nodes": 1,
    "round_timeout_s": 600.0,
    "wait_for_nodes_s": 60.0,
    "task": "sequence-classification",
    "base": "tiny-bert",
    "num_labels": 2,
    "max_length": 128,
    "lora_r": 8,
    "local_epochs": 1,
    "batch_size": 16,
    "learning_rate": 5e-4,
    "dataset": "train",
}


def normalize_spec(spec: pb.JobSpec) -> pb.JobSpec:
    """Return a complete copy of ``spec``; ValueError names the first bad field."""
    s = pb.JobSpec()
    s.CopyFrom(spec)
    d = DEFAULTS
    s.method = s.method or d["method"]
    s.rounds = s.rounds or d["rounds"]
    s.min_nodes = s.min_nodes or d["min_nodes"]
    s.round_timeout_s = s.round_timeout_s or d["round_timeout_s"]
    s.wait_for_nodes_s = s.wait_for_nodes_s or d["wait_for_nodes_s"]
    m = s.model
    m.task = m.task or d["task"]
    m.base = m.base or d["base"]
    m.max_length = m.max_length or d["max_length"]
    if m.task == "sequence-classification":
        m.num_labels = m.num_labels or d["num_labels"]
    m.lora.r = m.lora.r or d["lora_r"]
    m.lora.alpha = m.lora.alpha or 2.0 * m.lora.r
    t = s.train
    t.local_epochs = t.local_epochs or d["local_epochs"]
    t.batch_size = t.batch_size or d["batch_size"]
    t.learning_rate = t.learning_rate or d["learning_rate"]
    t.optimizer = t.optimizer or "adamw"
    t.dataset = t.dataset or d["dataset"]

    if s.anonymous:
        s.anonymity_set = set_size(s.anonymity_set)
    checks = [
        (len(s.name) <= 128, "name: at most 128 characters"),
        (1 <= s.rounds <= 100_000, f"rounds: must be 1..100000, got {s.rounds}"),
        (s.min_nodes <= 10_000, f"min_nodes: at most 10000, got {s.min_nodes}"),
        (
            s.nodes_per_round == 0 or s.nodes_per_round >= s.min_nodes,
            f"nodes_per_round ({s.nodes_per_round}) must be 0 (all) or >= min_nodes "
            f"({s.min_nodes})",
        ),
        (
            not s.anonymous or s.nodes_per_round != 1,
            "nodes_per_round: an anonymous job signs each round's updates over the ring of the "
            "round's selected nodes, so it needs at least 2 per round (0: all)",
        ),
        (
            s.anonymous or s.anonymity_set == 0,
            "anonymity_set: only an anonymous job signs over anonymity sets (set anonymous)",
        ),
        (
            not s.anonymous or MIN_ANONYMITY_SET <= s.anonymity_set <= MAX_ANONYMITY_SET,
            f"anonymity_set: must be {MIN_ANONYMITY_SET}..{MAX_ANONYMITY_SET} (the fewest "
            f"nodes an update is signed over; 0: {DEFAULT_ANONYMITY_SET}), got "
            f"{s.anonymity_set}",
        ),
        (s.nodes_per_round <= 10_000, f"nodes_per_round: at most 10000, got {s.nodes_per_round}"),
        (0 < s.round_timeout_s <= MAX_TIMEOUT_S,
         f"round_timeout_s: must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {s.round_timeout_s}"),
        (0 < s.wait_for_nodes_s <= MAX_TIMEOUT_S,
         f"wait_for_nodes_s: must be in (0, {MAX_TIMEOUT_S:g}] seconds, got "
         f"{s.wait_for_nodes_s}"),
        (not base_problem(m.base), f"model.base: {base_problem(m.base)}"),
        (m.task in TASKS, f"model.task: must be one of {', '.join(TASKS)}, got {m.task!r}"),
        (
            m.task != "sequence-classification" or 2 <= m.num_labels <= 100_000,
            f"model.num_labels: must be >= 2 for classification, got {m.num_labels}",
        ),
        (1 <= m.max_length <= 65_536, f"model.max_length: must be 1..65536, got {m.max_length}"),
        (1 <= m.lora.r <= 4096, f"model.lora.r: must be 1..4096, got {m.lora.r}"),
        (0 < m.lora.alpha <= 1e6, f"model.lora.alpha: must be in (0, 1e6], got {m.lora.alpha}"),
        (len(m.lora.target_modules) <= 64
         and all(0 < len(name) <= 128 for name in m.lora.target_modules),
         "model.lora.target_modules: at most 64 names of 1..128 characters"),
        (0 <= m.lora.dropout < 1, f"model.lora.dropout: must be in [0, 1), got {m.lora.dropout}"),
        (1 <= t.batch_size <= 65_536, f"train.batch_size: must be 1..65536, got {t.batch_size}"),
        (0 < t.learning_rate < 10, f"train.learning_rate: must be in (0, 10), got "
                                   f"{t.learning_rate}"),
        (t.optimizer in OPTIMIZERS, f"train.optimizer: one of {', '.join(OPTIMIZERS)}, "
                                    f"got {t.optimizer[:40]!r}"),
        (0 <= t.head_learning_rate < 10, "train.head_learning_rate: must be in [0, 10) (0: "
                                         f"the learning rate), got {t.head_learning_rate}"),
        (t.local_epochs <= 10_000, f"train.local_epochs: at most 10000, got {t.local_epochs}"),
        (t.max_steps <= 1_000_000, f"train.max_steps: at most 1000000 (0: no cap), got "
                                   f"{t.max_steps}"),
        (math.isfinite(s.budget) and s.budget >= 0,
         f"budget: must be a finite number >= 0, got {s.budget}"),
        (bool(DATASET_PATTERN.match(t.dataset)),
         f"train.dataset: letters, digits, '_', '.', '-' only, got {t.dataset!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    method = get_method(s.method)  # ValueError lists the known methods
    try:
        config = method.parse_config(method_params(s))
    except (TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise ValueError(f"method_params: {type(exc).__name__}: {exc}") from None
    if (getattr(config, "mode", "") == "distributed" and getattr(config, "unit", "") == "node"
            and not s.secure_aggregation):
        raise ValueError("dp-lora mode 'distributed' splits the noise among the nodes inside "
                         "secure aggregation: set secure_aggregation (--secure-aggregation)")
    if s.secure_aggregation:
        refusal = secure_refusal(method, config, anonymous=s.anonymous)
        if refusal:
            raise ValueError(f"secure_aggregation: {refusal}")
        if spec.min_nodes == 0:  # the sum of one node is its update
            s.min_nodes = 2
        if s.min_nodes < 2 or s.nodes_per_round == 1:
            raise ValueError("secure_aggregation: a round needs at least 2 nodes (min_nodes "
                             ">= 2, nodes_per_round 0 or >= 2): the sum of one node is its "
                             "update")
    return s
