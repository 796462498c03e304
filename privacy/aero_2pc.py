"""AERO's decoder (``node.aero``) evaluated under secure two-party computation.

The model owner holds the weights, the data owner the token ids; the logits are revealed to the
data owner only. The private forward, step by step (``private_forward``)::

    model owner:  fold_weights: LayerNorm affines, attention scaling, learnable scalars and
                  weight normalization folded into the linear layers (plaintext, local)
    both:         secret-share the folded weights (owner: model) and the one-hot ids (owner:
                  data), in weight_spec's order, shapes public
    forward (_forward, the same code for plaintext and CrypTen tensors):
        x = onehot @ tok_emb + pos_emb
        per block:  [LayerNorm] -> x @ W_qkv -> masked softmax(q k^T) v -> @ W_out, residual
                    [LayerNorm] -> FFN (GELU | ReLU | linear), residual
        [LayerNorm] -> @ head
    reveal the logits to the data owner

The nonlinear steps are the only places where plaintext and 2PC differ (``_PlainOps`` vs
``_CrypTenOps``); :func:`fold_weights` and :func:`reference_forward` are the same math in
plaintext (the test that keeps ``node.aero`` and this module in sync compares the three).

Accuracy (see :class:`Approximation`): fixed point with 16 fractional bits; exp, reciprocal,
inverse square root and sigmoid are iterative approximations with stated input domains (softmax
logits spreading less than ~230, GELU inputs within ~+-135, LayerNorm inputs with a standard
deviation of ~0.1 to ~30: 5e-3 at 0.1, 1e-4 at 1, 2e-2 at 30, overflow above ~50; measured).
A tiny model's logits come out within ~3e-3 of plaintext (the tests assert 1e-2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from confide.privacy import mpc
from confide.privacy.mpc import MpcError

ARCH_KEYS = (
    "vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff", "layernorm",
    "activation", "ffn", "normalization", "tie_embeddings", "ln_eps",
)
"""The public architecture fields both parties must agree on (``AeroConfig.to_dict()`` has
them; other keys of the dict, such as the training-only entropy settings, are ignored)."""

GELU_SIGMOID_COEF = 1.702
"""GELU(x) is computed as x * sigmoid(1.702 x) (Hendrycks & Gimpel's sigmoid approximation),
in ``node.aero`` and here alike: CrypTen has sigmoid but no GELU, and its erf is a Taylor series
that diverges for |x| > ~2."""

MASKED_LOGIT = -1024.0
"""Causal masking under MPC: future positions are set to a constant (scores times the public
0/1 mask, plus the constant where the mask is 0), so the encrypted max is taken over the visible
positions, and after the exponential they are multiplied by the mask again. The private forward
uses -2^n (n = ``Approximation.exp_iters``): after subtracting the row max m, a masked entry sits
at x = -2^n - m, where our exp's base (1 + z + z^2/2, z = x/2^n) is ~0.5, so it comes out ~0
instead of overflowing. (An additive -inf or -1e9 would overflow the fixed-point ring, and huge
garbage values make CrypTen's two-party truncation fail more often.) The plaintext mirror uses
this constant; it is exact either way."""

# --------------------------------------------------------------------------------------------
# The AERO decoder: public architecture, folded weights, one forward for both engines


def _arch(config: Mapping[str, Any]) -> dict[str, Any]:
    missing = [key for key in ARCH_KEYS if key not in config]
    if missing:
        raise MpcError(f"model config lacks {missing}; pass AeroConfig.to_dict()")
    arch = {key: config[key] for key in ARCH_KEYS}
    if arch["d_model"] % arch["n_heads"]:
        raise MpcError(f"d_model {arch['d_model']} is not divisible by n_heads {arch['n_heads']}")
    if arch["activation"] not in ("gelu", "relu", "none"):
        raise MpcError(f"unknown activation {arch['activation']!r}")
    if arch["normalization"] not in ("none", "weight", "scaled"):
        raise MpcError(f"unknown normalization {arch['normalization']!r}")
    return arch


def weight_spec(config: Mapping[str, Any], seq_len: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the folded weights, in the order both parties share them.

    Computable from the public config alone, so the data owner knows what to expect. Linear
    weights are stored ``(in, out)`` (``x @ W``). LayerNorm affine parameters, the attention
    scaling, learnable scalars and weight normalization are folded into the linear layers
    (:func:`fold_weights`), and a linear FFN (``activation="none"``) is merged into one matrix.
    """
    a = _arch(config)
    if not 1 <= seq_len <= a["max_len"]:
        raise MpcError(f"seq_len must be in [1, {a['max_len']}] (max_len), got {seq_len}")
    d, v, ff = a["d_model"], a["vocab_size"], a["d_ff"]
    spec: list[tuple[str, tuple[int, ...]]] = [("tok_emb", (v, d)), ("pos_emb", (seq_len, d))]
    for i in range(a["n_layers"]):
        p = f"blocks.{i}."
        spec += [(p + "qkv.weight", (d, 3 * d)), (p + "qkv.bias", (3 * d,)),
                 (p + "out.weight", (d, d)), (p + "out.bias", (d,))]
        if a["ffn"]:
            if a["activation"] == "none":
                spec += [(p + "ffn.weight", (d, d)), (p + "ffn.bias", (d,))]
            else:
                spec += [(p + "fc1.weight", (d, ff)), (p + "fc1.bias", (ff,)),
                         (p + "fc2.weight", (ff, d)), (p + "fc2.bias", (d,))]
    if a["layernorm"] or not a["tie_embeddings"]:
        spec += [("head.weight", (d, v))]
        if a["layernorm"]:
            spec += [("head.bias", (v,))]
    return spec


def _linear(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W as (in, out), bias) of a linear layer, resolving weight normalization."""
    if prefix + "weight_v" in sd:
        v, g = sd[prefix + "weight_v"].double(), sd[prefix + "weight_g"].double()
        weight = g.reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)
    else:
        weight = sd[prefix + "weight"].double()
    out = weight.shape[0]
    bias = sd[prefix + "bias"].double() if prefix + "bias" in sd else torch.zeros(out).double()
    return weight.t().contiguous(), bias


def _fold_affine(gamma, beta, weight, bias):
    """LayerNorm affine (gamma, beta) followed by x @ W + b, as one linear layer on LN(x)."""
    return gamma.reshape(-1, 1) * weight, beta @ weight + bias


def fold_weights(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                 seq_len: int) -> dict[str, torch.Tensor]:
    """The model owner's plaintext preprocessing: ``node.aero`` weights -> :func:`weight_spec`.

    Runs locally on the owner's side before sharing (no communication, nothing revealed): the
    encrypted forward then needs no encrypted multiplications by scalars or LayerNorm gains.
    """
    a = _arch(config)
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    d, h = a["d_model"], a["n_heads"]
    dh = d // h
    scaled = a["normalization"] == "scaled"
    out: dict[str, torch.Tensor] = {
        "tok_emb": sd["tok_emb.weight"].double(),
        "pos_emb": sd["pos_emb.weight"][:seq_len].double(),
    }
    for i in range(a["n_layers"]):
        p = f"blocks.{i}."
        ws, bs = zip(*(_linear(sd, f"{p}attn.{n}.") for n in ("q", "k", "v")), strict=True)
        wq, bq = ws[0].clone(), bs[0].clone()
        # per-head score scale 1/sqrt(dh) (x a learnable per-head logit scale) into W_q, b_q
        head_scale = torch.full((h,), 1.0 / math.sqrt(dh), dtype=torch.float64)
        if scaled:
            head_scale = head_scale * sd[p + "attn.logit_scale"].double()
        col = head_scale.repeat_interleave(dh)
        wq, bq = wq * col, bq * col
        w_qkv = torch.cat([wq, ws[1], ws[2]], dim=1)
        b_qkv = torch.cat([bq, bs[1], bs[2]])
        if a["layernorm"]:
            w_qkv, b_qkv = _fold_affine(sd[p + "ln1.weight"].double(),
                                        sd[p + "ln1.bias"].double(), w_qkv, b_qkv)
        wo, bo = _linear(sd, p + "attn.o.")
        if scaled:
            alpha = sd[p + "attn_scale"].double()
            wo, bo = wo * alpha, bo * alpha
        out |= {p + "qkv.weight": w_qkv, p + "qkv.bias": b_qkv,
                p + "out.weight": wo, p + "out.bias": bo}
        if a["ffn"]:
            w1, b1 = _linear(sd, p + "ffn.fc1.")
            w2, b2 = _linear(sd, p + "ffn.fc2.")
            if a["layernorm"]:
                w1, b1 = _fold_affine(sd[p + "ln2.weight"].double(),
                                      sd[p + "ln2.bias"].double(), w1, b1)
            if scaled:
                beta = sd[p + "ffn_scale"].double()
                w2, b2 = w2 * beta, b2 * beta
            if a["activation"] == "none":
                out |= {p + "ffn.weight": w1 @ w2, p + "ffn.bias": b1 @ w2 + b2}
            else:
                out |= {p + "fc1.weight": w1, p + "fc1.bias": b1,
                        p + "fc2.weight": w2, p + "fc2.bias": b2}
    head = (sd["tok_emb.weight"] if a["tie_embeddings"] else sd["lm_head.weight"]).double().t()
    if a["layernorm"]:
        w, b = _fold_affine(sd["ln_f.weight"].double(), sd["ln_f.bias"].double(), head,
                            torch.zeros(head.shape[1], dtype=torch.float64))
        out |= {"head.weight": w, "head.bias": b}
    elif not a["tie_embeddings"]:
        out["head.weight"] = head.contiguous()
    spec = weight_spec(config, seq_len)
    if [name for name, _ in spec] != list(out):
        raise MpcError("internal error: folded weights do not follow weight_spec")
    for name, shape in spec:
        if tuple(out[name].shape) != shape:
            raise MpcError(f"weight {name} has shape {tuple(out[name].shape)}, the config "
                           f"implies {shape}: the state dict does not match the config")
    return {k: t.float() for k, t in out.items()}


@dataclass(frozen=True)
class Approximation:
    """Accuracy knobs of the private forward; public, and both parties must use the same.

    ``precision_bits``: fixed-point fractional bits (CrypTen's default, 16). More bits cost no
    bytes (the ring is 64-bit either way) but make CrypTen's two-party truncation fail more often:
    each truncated value v goes wrong (by ~2^(64 - precision_bits)) with probability about
    |v| * 2^(2 * precision_bits - 64). A T=128, d=128, 2-layer baseline forward truncates ~5e6
    values: ~7e-4 of its runs get a corrupted value at 16 bits, ~1% at 18, ~17% at 20 (the sum of
    those probabilities, measured by instrumenting CrypTen's truncation).
    ``exp_iters``: n in exp(x) = (1 + z + z^2/2)^(2^n), z = x / 2^n: one round per iteration;
    valid for x >= -1.8 * 2^n (softmax logits must spread less than that, GELU inputs must stay
    within +-1.8 * 2^n / 1.702); the relative error is ~2^n * 2^-precision_bits.
    ``ln_iters``: Newton steps refining LayerNorm's inverse square root after its log-based
    initial guess. With the defaults a tiny model's logits are within ~2e-3 of plaintext; CrypTen's
    own functions (first-order exp with 8 iterations, its inv_sqrt) give ~1.4e-2, and far worse
    for LayerNorm inputs with a small variance.
    """

    precision_bits: int = 16
    exp_iters: int = 7
    ln_iters: int = 3


LN_LOG_SHIFT = 16.0
"""The private LayerNorm takes the log of var / 16 (CrypTen's log is accurate on [1e-4, 250]),
which centres its domain on the variances of trained residual streams (see the module docs)."""


class _PlainOps:
    """The private forward's nonlinear steps in plaintext torch (exact functions)."""

    @staticmethod
    def masked_softmax(scores, mask):
        s = scores * mask + (mask - 1.0) * -MASKED_LOGIT
        m = s.max(dim=s.dim() - 1, keepdim=True)[0]
        e = (s - m).exp() * mask
        return e / e.sum(dim=-1, keepdim=True)

    @staticmethod
    def normalize(x, eps):
        c = x - x.mean(dim=-1, keepdim=True)
        return c * torch.rsqrt((c * c).mean(dim=-1, keepdim=True) + eps)

    @staticmethod
    def gelu(x):
        return x * torch.sigmoid(GELU_SIGMOID_COEF * x)

    @staticmethod
    def relu(x):
        return torch.relu(x)


class _CrypTenOps:
    """The same steps on CrypTen tensors, with CrypTen's approximations (module docstring)."""

    def __init__(self, approx: Approximation):
        self.cfg = mpc.import_crypten().cfg
        self.approx = approx

    def _exp(self, x):
        # exp(x) = (e^(x/2^n))^(2^n) with e^z ~ 1 + z + z^2/2 (CrypTen: 1 + z, which needs ~2
        # more squarings, i.e. precision bits, for the same accuracy). For x in [-2^n, 0] the
        # base lies in [0.5, 1]; down to x = -1.8 * 2^n the result is still ~0 (< 1e-3).
        n = self.approx.exp_iters
        z = x.div(2**n)
        base = z.square().div(2) + z + 1
        for _ in range(n):
            base = base.square()
        return base

    def masked_softmax(self, scores, mask):
        # an integer mask multiplies shares without a truncation step
        s = scores * mask.long() + (mask - 1.0) * 2.0**self.approx.exp_iters
        m = s.max(dim=s.dim() - 1, keepdim=True)[0]
        e = self._exp(s - m) * mask
        with self.cfg.temp_override({"functions.reciprocal_all_pos": True}):
            inv = e.sum(dim=-1, keepdim=True).reciprocal()
        return e * inv

    def normalize(self, x, eps):
        # 1/sqrt(var): initial guess exp(-ln(var)/2) from CrypTen's log (accurate on [1e-4, 250],
        # shifted by LN_LOG_SHIFT to cover larger variances), then Newton steps. CrypTen's own
        # inv_sqrt starts from a guess that suits variances near 1 and diverges above ~500.
        c = x - x.mean(dim=-1, keepdim=True)
        var = c.square().mean(dim=-1, keepdim=True) + eps
        y = self._exp((var * (1.0 / LN_LOG_SHIFT)).log() * -0.5) * (LN_LOG_SHIFT ** -0.5)
        for _ in range(self.approx.ln_iters):
            y = y * (3 - var * y.square()) * 0.5
        return c * y

    def sigmoid(self, z):
        # CrypTen's "reciprocal" sigmoid, with our exp accuracy: 1 / (1 + exp(-|z|)), mirrored
        ltz = z.lt(0)
        pos = z * (1 - 2 * ltz)
        den = self._exp(pos.neg()) + 1
        overrides = {"functions.reciprocal_nr_iters": 4, "functions.reciprocal_all_pos": True,
                     "functions.reciprocal_initial": 0.75}  # den in [1, 2]: 4 steps suffice
        with self.cfg.temp_override(overrides):
            r = den.reciprocal()
        return r.where(1 - ltz, 1 - r)

    def gelu(self, x):
        return x * self.sigmoid(x * GELU_SIGMOID_COEF)

    @staticmethod
    def relu(x):
        return x.relu()


def _forward(w: Mapping[str, Any], a: Mapping[str, Any], onehot, ops) -> Any:
    """The decoder on folded weights; ``onehot`` is (T, V); works for torch and CrypTen."""
    t = onehot.size(0)
    d, h = a["d_model"], a["n_heads"]
    dh = d // h
    mask = torch.tril(torch.ones(t, t))
    x = onehot.matmul(w["tok_emb"]) + w["pos_emb"]
    for i in range(a["n_layers"]):
        p = f"blocks.{i}."
        y = ops.normalize(x, a["ln_eps"]) if a["layernorm"] else x
        qkv = y.matmul(w[p + "qkv.weight"]) + w[p + "qkv.bias"]
        q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(t, h, dh).transpose(0, 1) for j in range(3))
        probs = ops.masked_softmax(q.matmul(k.transpose(1, 2)), mask)
        ctx = probs.matmul(v).transpose(0, 1).reshape(t, d)
        x = x + ctx.matmul(w[p + "out.weight"]) + w[p + "out.bias"]
        if a["ffn"]:
            y = ops.normalize(x, a["ln_eps"]) if a["layernorm"] else x
            if a["activation"] == "none":
                x = x + y.matmul(w[p + "ffn.weight"]) + w[p + "ffn.bias"]
            else:
                z = y.matmul(w[p + "fc1.weight"]) + w[p + "fc1.bias"]
                z = ops.gelu(z) if a["activation"] == "gelu" else ops.relu(z)
                x = x + z.matmul(w[p + "fc2.weight"]) + w[p + "fc2.bias"]
    if a["layernorm"]:
        return ops.normalize(x, a["ln_eps"]).matmul(w["head.weight"]) + w["head.bias"]
    head = w["head.weight"] if "head.weight" in w else w["tok_emb"].t()
    return x.matmul(head)


def _check_ids(token_ids: torch.Tensor, vocab: int, seq_len: int) -> torch.Tensor:
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    if ids.numel() != seq_len:
        raise MpcError(f"expected {seq_len} token ids (the agreed sequence length), got "
                       f"{ids.numel()}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise MpcError(f"token ids must lie in [0, {vocab}), got min {int(ids.min())} and max "
                       f"{int(ids.max())}")
    return ids


def reference_forward(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                      token_ids: torch.Tensor) -> torch.Tensor:
    """The private forward's math in plaintext (float32): logits (T, V) for one sequence."""
    a = _arch(config)
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    ids = _check_ids(ids, a["vocab_size"], ids.numel())
    w = fold_weights(state_dict, config, ids.numel())
    onehot = F.one_hot(ids, a["vocab_size"]).float()
    with torch.no_grad():
        return _forward(w, a, onehot, _PlainOps)


def private_forward(config: Mapping[str, Any], seq_len: int, *,
                    state_dict: Mapping[str, torch.Tensor] | None = None,
                    token_ids: torch.Tensor | None = None,
                    model_owner: int = 0, data_owner: int = 1,
                    approx: Approximation | None = None) -> torch.Tensor | None:
    """Evaluate the AERO decoder on one sequence under secure two-party computation.

    Call inside :func:`mpc_session` on both parties with the same public ``config``
    (``AeroConfig.to_dict()``) and ``seq_len``. The model owner passes ``state_dict`` (plaintext,
    folded locally by :func:`fold_weights`), the data owner its ``token_ids`` (``seq_len``
    ints); each party passes only its own. The data owner one-hot encodes its ids and shares the
    (T, V) matrix, so the embedding lookup is an encrypted matmul and the model owner never sees
    an id. Returns the logits (T, V) on the data owner, ``None`` on every other party.

    ``approx`` sets the approximations' accuracy (:class:`Approximation`; same on both sides).
    """
    party = mpc.require_session()
    if model_owner == data_owner:
        raise MpcError("model_owner and data_owner must be different parties")
    for name, r in (("model_owner", model_owner), ("data_owner", data_owner)):
        if not 0 <= r < party.world_size:
            raise MpcError(f"{name} {r} is not a party of this {party.world_size}-party session")
    a = _arch(config)
    spec = weight_spec(config, seq_len)
    folded: Mapping[str, torch.Tensor] = {}
    if party.rank == model_owner:
        if state_dict is None:
            raise MpcError("the model owner must pass its state_dict")
        folded = fold_weights(state_dict, config, seq_len)
    onehot = None
    if party.rank == data_owner:
        if token_ids is None:
            raise MpcError("the data owner must pass its token_ids")
        ids = _check_ids(token_ids, a["vocab_size"], seq_len)
        onehot = F.one_hot(ids, a["vocab_size"]).float()
    approx = approx or Approximation()
    cfg = mpc.import_crypten().cfg
    try:
        with cfg.temp_override({"encoder.precision_bits": approx.precision_bits}):
            weights = {name: mpc.encrypt(folded.get(name), model_owner, shape)
                       for name, shape in spec}
            x = mpc.encrypt(onehot, data_owner, (seq_len, a["vocab_size"]))
            logits = _forward(weights, a, x, _CrypTenOps(approx))
            return mpc.decrypt(logits, dst=data_owner)
    except Exception as exc:
        if mpc.looks_like_peer_failure(exc) and not isinstance(exc, MpcError):
            raise mpc.peer_error(party, exc, "the private forward") from exc
        raise
