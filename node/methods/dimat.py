"""DIMAT: decentralized iterative merging-and-training.

Saadati et al., "DIMAT: Decentralized Iterative Merging-And-Training for Deep Learning Models"
(CVPR 2024), as this module runs it:

    Job parameters: topology, degree, edges, merge, seed, match_examples, identity_margin,
    unreachable.
    Trainable state w_i of node i: every floating parameter of the model (``trainable = "full"``).
    No coordinator in the data path: models travel between neighbours only.

    Topology and mixing (``node.methods.topology``, computed by the coordinator): a fixed graph
    over the job's sorted node ids ("ring", "full", seeded k-regular "random", or explicit
    "edges"; connected, or the job is refused), and the Metropolis-Hastings mixing matrix
        w_ij = 1 / (1 + max(d_i, d_j)) for each edge ij,   w_ii = 1 - sum_j w_ij.

    Node i, every round (``node.merging.merge.merge_round`` runs steps 2-4):
        1. train locally from w_i for the round's period (the job's local epochs or steps)
        2. fetch w_j from every neighbour j; an unreachable neighbour is skipped for this merge
           and the row is re-weighted (``renormalized_weights``)
        3. merge == "dimat": run ``match_examples`` of i's own examples through its model with
           w_i and with w_j, recording the hidden units of every permutable group g (below);
              C_g = corr(units of w_i, units of w_j)                 (standardized, over tokens)
              P_g = argmax_P <C_g, P> over permutation matrices       (linear_sum_assignment)
              P_g = I unless (<C_g, P_g> - tr C_g) / units > identity_margin (models aligned
                    by earlier rounds have nearly tied units: re-matching them on a few non-IID
                    examples only reshuffles them, which is how DIMAT fell behind gossip)
           and permute w_j's units by P_g, in the layer that makes them (rows) and the layer that
           reads them (columns): a function-preserving change of w_j that lines its units up
           with w_i's.          merge == "gossip": no alignment.     merge == "none": keep w_i.
        4. w_i <- w_ii w_i + sum_j w_ij P(w_j)         (in float64, cast back to w_i's dtype)

Where the node's parts live: ``node.merging.fetch`` (step 2, peer to peer),
``node.merging.permutation`` (the groups below), ``node.merging.activations`` and
``node.merging.alignment`` (step 3), ``node.merging.merge`` (step 4).

What is permuted (the hidden units only: the residual stream, of width ``hidden_size``, is never
permuted, so every permutation stays inside one block and the groups are independent):

    BERT family (``*.intermediate.dense`` / ``*.output.dense``, ``attention.self.query|key|value``
    / ``attention.output.dense``):
        FFN units       rows of intermediate.dense (weight, bias), columns of output.dense
        attention heads as whole blocks of head_dim: rows of query, key and value (weights and
                        biases) and columns of attention.output.dense, all by the same head
                        permutation (Q and K of a head must move together; so must V and O)
    Llama family (Mistral, Qwen2, SmolLM2: ``mlp.gate_proj|up_proj|down_proj``,
    ``self_attn.q_proj|k_proj|v_proj|o_proj``):
        MLP units       rows of gate_proj and up_proj, columns of down_proj
        attention       key/value groups as blocks: kv head g together with the
                        num_heads/num_kv_heads query heads that read it (rows of q_proj in
                        blocks of (heads/kv) x head_dim, rows of k_proj and v_proj in blocks of
                        head_dim, columns of o_proj like q_proj). Without GQA a group is one head.
    Plain MLP (a ``torch.nn.Sequential`` of Linear layers and elementwise activations):
        the outputs of every Linear but the last: its rows (weight, bias) and the next Linear's
        columns.

    Matched on: the input of the layer that reads the units (after the activation; for heads,
    the attention output before the output projection; padding tokens dropped when the batch
    carries an ``attention_mask``). Heads are matched as blocks: the cost of head a against
    head b is the sum of the correlations of their dims d = 0..head_dim-1 pairwise.

Averaged plainly (no permutation is needed or possible for them here): embeddings (token,
position, token type), every LayerNorm / RMSNorm, the residual stream (all of hidden_size: the
inputs of query/key/value, intermediate.dense, gate/up_proj and the outputs of
attention.output.dense, output.dense, o_proj, down_proj), the BERT pooler, the classification or
LM head, rotary embeddings (no weights; RoPE frequency pairs inside a head are never separated),
biases of output projections, and everything in a model the spec does not recognise. Not
permuted either, though they could be: dims inside a head (V/O jointly, and Q/K jointly where
there is no RoPE) and the query heads inside one GQA group.

LoRA. Alignment permutes the weights that produce and read the units, so it needs them in the
state: it is meant for full-parameter training. A state holding a PEFT model's base weights *and*
its adapters (``model.state_dict()`` of a PeftModel) is supported: permuting the rows of W
(out x in) permutes the rows of lora_B, permuting its columns the columns of lora_A, which keeps
W + s B A consistent. An adapter-only state (frozen base, not exchanged) cannot be aligned: the
nodes share the frozen base, so their units are aligned already and "gossip" is the right merge;
``dimat_merge`` says so instead of guessing.

Unreachable neighbours. With ``unreachable = "renormalize"`` (the default) the reachable weights
and w_ii are scaled to sum to 1 again: the row stays stochastic, so the merge is still a convex
combination, but that round's mixing matrix is in general no longer doubly stochastic (nor
symmetric), so the network average of the models drifts a little. With ``"self"`` the missing
weight goes to w_ii: when a failure is symmetric (neither end reaches the other) the round's
matrix stays symmetric and doubly stochastic, which preserves the network average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from confide.node.methods.base import DecentralizedMethod, MethodConfig
from confide.node.methods.topology import TOPOLOGIES, UNREACHABLE_POLICIES, parse_edges

__all__ = ["DIMAT", "MERGE_MODES", "DIMATConfig"]

MERGE_MODES = ("dimat", "gossip", "none")


@dataclass(frozen=True)
class DIMATConfig(MethodConfig):
    """DIMAT's job parameters (validated on construction).

    ``topology``: "ring", "full", "random" (k-regular) or "edges". ``degree``: k of the random
    topology. ``edges``: the explicit graph, "0-1,1-2" (positions in the sorted node ids; a list
    of "i-j" strings or [i, j] pairs is accepted too and stored as the canonical string).
    ``merge``: "dimat" (align, then average), "gossip" (plain average) or "none" (local only,
    the no-merging baseline). ``seed``: draws the random topology. ``match_examples``: how many
    of its own examples a node runs through both models to match units. ``identity_margin``:
    a layer keeps the identity permutation unless matching gains more than this mean
    correlation per unit (0: always the best matching). ``unreachable``: what happens to an
    unreachable neighbour's weight ("renormalize" or "self", module docstring).
    """

    topology: str = "ring"
    degree: int = 2
    edges: str = ""
    merge: str = "dimat"
    seed: int = 0
    match_examples: int = 256
    identity_margin: float = 0.02
    unreachable: str = "renormalize"

    def __post_init__(self) -> None:
        if not isinstance(self.edges, str):
            edges = ",".join(f"{a}-{b}" for a, b in parse_edges(self.edges))
            object.__setattr__(self, "edges", edges)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, naming the parameter, for values that make no sense."""
        if self.topology not in TOPOLOGIES:
            raise ValueError(
                f"dimat: topology must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}"
            )
        if not _is_int(self.degree) or self.degree < 1:
            raise ValueError(f"dimat: degree must be an integer >= 1, got {self.degree!r}")
        if self.topology == "edges":
            if not parse_edges(self.edges):
                raise ValueError('dimat: topology "edges" needs edges, e.g. edges="0-1,1-2,2-0"')
        elif self.edges:
            raise ValueError(
                f"dimat: edges are only read with topology 'edges' (topology is "
                f"{self.topology!r}); drop them or set topology='edges'"
            )
        if self.merge not in MERGE_MODES:
            raise ValueError(
                f"dimat: merge must be one of {', '.join(MERGE_MODES)}, got {self.merge!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 1 << 63:
            raise ValueError(f"dimat: seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not _is_int(self.match_examples) or self.match_examples < 1:
            raise ValueError(
                f"dimat: match_examples must be an integer >= 1, got {self.match_examples!r}"
            )
        margin = self.identity_margin
        if (isinstance(margin, bool) or not isinstance(margin, int | float)
                or not (math.isfinite(margin) and 0 <= margin <= 2)):
            raise ValueError(f"dimat: identity_margin must be a number in [0, 2] (a "
                             f"correlation gain per unit), got {margin!r}")
        if self.unreachable not in UNREACHABLE_POLICIES:
            raise ValueError(
                f"dimat: unreachable must be one of {', '.join(UNREACHABLE_POLICIES)}, "
                f"got {self.unreachable!r}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class DIMAT(DecentralizedMethod):
    """DIMAT's config for the job machinery (``parse_config`` validates job parameters).

    There is no coordinator-side aggregation: neighbours exchange full states peer to peer and
    each node merges with ``node.merging.merge.dimat_merge``; the coordinator only schedules
    train and merge phases and tells each node its neighbours and mixing weights
    (``node.methods.topology``).
    """

    name = "dimat"
    config_class = DIMATConfig
    trainable = "full"

    def validate_config(self, config: MethodConfig) -> None:
        if not isinstance(config, DIMATConfig):
            raise ValueError(f"dimat: expected a DIMATConfig, got {type(config).__name__}")
        config.validate()
