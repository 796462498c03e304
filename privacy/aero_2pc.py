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
from confide.privacy.op_ledger import FIXED, NoLedger, OpLedger

HEADROOM = 2.0
"""The max-free softmax's exponentials may reach e^HEADROOM (see :class:`MaxFreeSoftmax`)."""

MAX_SOFTMAX_BOUND = 40.0
"""The largest public score bound the max-free softmax accepts: exp(-2 * bound) must stay
representable next to fixed point's 2^-16 for a row's sum to mean anything (module docs)."""

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
    bound = config.get("softmax_bound")
    if bound is not None and not (isinstance(bound, int | float) and not isinstance(bound, bool)
                                  and 0 < bound <= MAX_SOFTMAX_BOUND):
        raise MpcError(f"softmax_bound must be a number in (0, {MAX_SOFTMAX_BOUND:g}], "
                       f"got {bound!r}")
    arch["softmax_bound"] = None if bound is None else float(bound)
    ffn_layers = config.get("ffn_layers", arch["n_layers"])
    if isinstance(ffn_layers, bool) or not isinstance(ffn_layers, int) \
            or not 0 <= ffn_layers <= arch["n_layers"]:
        raise MpcError(f"ffn_layers must be an integer in [0, n_layers], got {ffn_layers!r}")
    arch["ffn_layers"] = ffn_layers if arch["ffn"] else 0
    return arch


def _has_ffn(a: Mapping[str, Any], layer: int) -> bool:
    """Whether block ``layer`` has its FFN (AERO removes it from the deeper blocks)."""
    return bool(a["ffn"]) and layer < a["ffn_layers"]


def weight_spec(config: Mapping[str, Any], seq_len: int, *, public_embedding: bool = False
                ) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the folded weights, in the order both parties share them.

    Computable from the public config alone, so the data owner knows what to expect. Linear
    weights are stored ``(in, out)`` (``x @ W``). LayerNorm affine parameters, the attention
    scaling, learnable scalars and weight normalization are folded into the linear layers
    (:func:`fold_weights`), and a linear FFN (``activation="none"``) is merged into one matrix.
    With ``public_embedding`` the token table is not shared (both parties hold it in plaintext).
    """
    a = _arch(config)
    if not 1 <= seq_len <= a["max_len"]:
        raise MpcError(f"seq_len must be in [1, {a['max_len']}] (max_len), got {seq_len}")
    d, v, ff = a["d_model"], a["vocab_size"], a["d_ff"]
    spec: list[tuple[str, tuple[int, ...]]] = [] if public_embedding else [("tok_emb", (v, d))]
    spec += [("pos_emb", (seq_len, d))]
    for i in range(a["n_layers"]):
        p = f"blocks.{i}."
        spec += [(p + "qkv.weight", (d, 3 * d)), (p + "qkv.bias", (3 * d,)),
                 (p + "out.weight", (d, d)), (p + "out.bias", (d,))]
        if _has_ffn(a, i):
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
    if a["ffn"] and a["ffn_layers"] != a["n_layers"]:
        raise MpcError("ffn_layers < n_layers describes pre-folded weights (cost configurations);"
                       " node.aero models have an FFN in every block")
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


# --------------------------------------------------------------------------------------------
# The max-free softmax: a public score bound instead of the row max


def _same(t):
    return t


def fixed_point_round(t: torch.Tensor, bits: int = 16) -> torch.Tensor:
    """Round to the fixed-point grid (2^-bits): what CrypTen's truncation does to a product;
    the plaintext emulation of the approximations below applies it after every multiply."""
    return torch.round(t * 2.0**bits) / 2.0**bits


def approx_exp(x, iters: int, q=_same):
    """exp(x) = (e^(x/2^n))^(2^n), e^z ~ 1 + z + z^2/2; works on torch and CrypTen tensors.

    Valid for x >= -1.8 * 2^n (the base stays positive). ``q`` rounds after each multiply (the
    plaintext emulation of fixed point); CrypTen rounds by itself.
    """
    z = q(x.div(2**iters))
    base = q(q(z.square()).div(2)) + z + 1
    for _ in range(iters):
        base = q(base.square())
    return base


def approx_reciprocal(x, iters: int, init: float, q=_same):
    """1/x by Newton-Raphson from the constant guess ``init``: y <- y (2 - x y).

    Converges for 0 < x * init < 2; the error 1 - x y squares every step.
    """
    y = init
    for _ in range(iters):
        y = q((2 - q(x * y)) * y)
    return y


@dataclass(frozen=True)
class MaxFreeSoftmax:
    """softmax(s) = exp(s - B) / sum exp(s - B) with a public bound B >= |s| instead of the row
    max: no comparison at all. B is a property of the trained model (``node.aero_bound``:
    measured on held-out text, checked at export, stored with the weights), so both parties
    derive the same parameters from (B, T), which are public.

    The shift is c = B - h (``headroom`` h = min(2, B)): with |s| <= B every exp(s - c) lies
    in [e^(h-2B), e^h] (at most e^2 ~ 7.4: no overflow, and a truncation failure stays about
    as unlikely as for values near 1), and a row's sum S in [e^(h-2B), T e^h]; the headroom
    buys e^h more fixed-point resolution for rows whose scores are all low. ``exp_iters`` is
    tuned for [h - 2B, h] (the fewest squarings whose emulated fixed-point error is smallest),
    ``nr_iters`` for Newton-Raphson from 1/(2 T e^h) to converge over that range of S (sums up
    to 2 T e^h, i.e. scores up to ~ln 2 past B, still converge). Scores beyond B on unseen
    text cost accuracy, not correctness, up to the reciprocal's range. Measured largest error
    of the probabilities (12 x 128 x 128 uniform scores in [-B, B], fixed point emulated):
    4e-4 at B = 2, 1.4e-3 at B = 4, 4.2e-3 at B = 5.2, 1.2e-2 at B = 6, 4e-2 at B = 6.5, and
    useless from B ~ 7 (e^(h-2B) falls below 2^-16): the stated range is B <= 5.2 for 5e-3.
    """

    bound: float
    seq_len: int
    exp_iters: int
    nr_iters: int
    nr_init: float
    shift: float

    @classmethod
    def tune(cls, bound: float, seq_len: int, precision_bits: int = 16) -> MaxFreeSoftmax:
        if not 0 < bound <= MAX_SOFTMAX_BOUND:
            raise MpcError(f"softmax bound must be in (0, {MAX_SOFTMAX_BOUND:g}], got {bound!r}")
        headroom = min(HEADROOM, bound)
        lo, hi = headroom - 2.0 * bound, headroom
        grid = torch.linspace(lo, hi, 2001, dtype=torch.float64)

        def q(t):
            return fixed_point_round(t, precision_bits)

        n_min = max(1, math.ceil(math.log2(-lo / 1.8))) if lo < -1.8 else 1
        errors = {n: (approx_exp(q(grid), n, q) - grid.exp()).abs().max().item()
                  for n in range(n_min, n_min + 5)}
        best = min(errors.values())
        exp_iters = min(n for n, e in errors.items() if e <= best * 1.05)  # fewest near-best
        init = 1.0 / (2 * seq_len * math.exp(hi))
        shrink = 1.0 - math.exp(lo) * init  # the worst starting error 1 - x * init
        target = precision_bits * math.log(2.0)
        nr_iters = max(1, math.ceil(math.log2(target / -math.log(shrink))))
        return cls(float(bound), int(seq_len), exp_iters, nr_iters, init, bound - headroom)

    def softmax(self, scores, mask, q=_same, ledger=None, layer: int = FIXED):
        """The masked max-free softmax on torch (``q`` emulating fixed point) or CrypTen."""
        ledger = ledger or NoLedger
        with ledger.scope("softmax_exp", layer):
            # an integer 0/1 mask multiplies shares without truncation; masked entries sit at
            # x = 0 (exp 1) and are zeroed after the exponential
            imask = mask.long() if not torch.is_tensor(scores) else mask
            x = (scores - self.shift) * imask
            e = approx_exp(x, self.exp_iters, q) * imask
        with ledger.scope("softmax_reciprocal", layer):
            inv = approx_reciprocal(e.sum(dim=-1, keepdim=True), self.nr_iters, self.nr_init, q)
            return q(e * inv)


# --------------------------------------------------------------------------------------------
# The nonlinear steps: plaintext and CrypTen


class _PlainOps:
    """The private forward's nonlinear steps in plaintext torch (exact functions)."""

    ledger = NoLedger

    @staticmethod
    def masked_softmax(scores, mask, layer=FIXED):
        s = scores * mask + (mask - 1.0) * -MASKED_LOGIT
        m = s.max(dim=s.dim() - 1, keepdim=True)[0]
        e = (s - m).exp() * mask
        return e / e.sum(dim=-1, keepdim=True)

    @staticmethod
    def normalize(x, eps, layer=FIXED):
        c = x - x.mean(dim=-1, keepdim=True)
        return c * torch.rsqrt((c * c).mean(dim=-1, keepdim=True) + eps)

    @staticmethod
    def gelu(x, layer=FIXED):
        return x * torch.sigmoid(GELU_SIGMOID_COEF * x)

    @staticmethod
    def relu(x, layer=FIXED):
        return torch.relu(x)


class _EmulatedOps(_PlainOps):
    """Plaintext, except the max-free softmax, emulated in fixed point (rounded after every
    multiply): what the bound costs in accuracy, measurable over a whole corpus cheaply."""

    def __init__(self, max_free: MaxFreeSoftmax, precision_bits: int = 16):
        self.max_free = max_free
        self.bits = precision_bits

    def masked_softmax(self, scores, mask, layer=FIXED):
        return self.max_free.softmax(scores.double(), mask.double(),
                                     q=lambda t: fixed_point_round(t, self.bits)).float()


class _CrypTenOps:
    """The same steps on CrypTen tensors, with CrypTen's approximations (module docstring)."""

    def __init__(self, approx: Approximation, ledger: OpLedger | None = None,
                 max_free: MaxFreeSoftmax | None = None):
        self.cfg = mpc.import_crypten().cfg
        self.approx = approx
        self.ledger = ledger or NoLedger
        self.max_free = max_free

    def _exp(self, x):
        # exp(x) = (e^(x/2^n))^(2^n) with e^z ~ 1 + z + z^2/2 (CrypTen: 1 + z, which needs ~2
        # more squarings, i.e. precision bits, for the same accuracy). For x in [-2^n, 0] the
        # base lies in [0.5, 1]; down to x = -1.8 * 2^n the result is still ~0 (< 1e-3).
        return approx_exp(x, self.approx.exp_iters)

    def masked_softmax(self, scores, mask, layer=FIXED):
        if self.max_free is not None:
            return self.max_free.softmax(scores, mask, ledger=self.ledger, layer=layer)
        with self.ledger.scope("softmax_max", layer):
            # an integer mask multiplies shares without a truncation step
            s = scores * mask.long() + (mask - 1.0) * 2.0**self.approx.exp_iters
            m = s.max(dim=s.dim() - 1, keepdim=True)[0]
        with self.ledger.scope("softmax_exp", layer):
            e = self._exp(s - m) * mask
        with self.ledger.scope("softmax_reciprocal", layer), \
                self.cfg.temp_override({"functions.reciprocal_all_pos": True}):
            inv = e.sum(dim=-1, keepdim=True).reciprocal()
            return e * inv

    def normalize(self, x, eps, layer=FIXED):
        # 1/sqrt(var): initial guess exp(-ln(var)/2) from CrypTen's log (accurate on [1e-4, 250],
        # shifted by LN_LOG_SHIFT to cover larger variances), then Newton steps. CrypTen's own
        # inv_sqrt starts from a guess that suits variances near 1 and diverges above ~500.
        with self.ledger.scope("layernorm", layer):
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

    def gelu(self, x, layer=FIXED):
        with self.ledger.scope("gelu", layer):
            return x * self.sigmoid(x * GELU_SIGMOID_COEF)

    def relu(self, x, layer=FIXED):
        with self.ledger.scope("gelu", layer):  # the FFN's activation, whichever it is
            return x.relu()


def _forward(w: Mapping[str, Any], a: Mapping[str, Any], x0, ops, public_emb=None) -> Any:
    """The decoder on folded weights; works for torch and CrypTen.

    ``x0`` is the (T, V) one-hot input, or with ``public_emb`` (the public token table, held by
    both parties) the data owner's already embedded (T, d) tokens.
    """
    led = ops.ledger
    t = x0.size(0)
    d, h = a["d_model"], a["n_heads"]
    dh = d // h
    mask = torch.tril(torch.ones(t, t))
    with led.scope("embedding"):
        x = (x0 if public_emb is not None else x0.matmul(w["tok_emb"])) + w["pos_emb"]
    for i in range(a["n_layers"]):
        p = f"blocks.{i}."
        y = ops.normalize(x, a["ln_eps"], i) if a["layernorm"] else x
        with led.scope("qkv", i):
            qkv = y.matmul(w[p + "qkv.weight"]) + w[p + "qkv.bias"]
            q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(t, h, dh).transpose(0, 1)
                       for j in range(3))
        with led.scope("attn_scores", i):
            scores = q.matmul(k.transpose(1, 2))
        probs = ops.masked_softmax(scores, mask, i)
        with led.scope("attn_context", i):
            ctx = probs.matmul(v).transpose(0, 1).reshape(t, d)
            x = x + ctx.matmul(w[p + "out.weight"]) + w[p + "out.bias"]
        if _has_ffn(a, i):
            y = ops.normalize(x, a["ln_eps"], i) if a["layernorm"] else x
            if a["activation"] == "none":
                with led.scope("ffn", i):
                    x = x + y.matmul(w[p + "ffn.weight"]) + w[p + "ffn.bias"]
            else:
                with led.scope("ffn", i):
                    z = y.matmul(w[p + "fc1.weight"]) + w[p + "fc1.bias"]
                z = ops.gelu(z, i) if a["activation"] == "gelu" else ops.relu(z, i)
                with led.scope("ffn", i):
                    x = x + z.matmul(w[p + "fc2.weight"]) + w[p + "fc2.bias"]
    if a["layernorm"]:
        x = ops.normalize(x, a["ln_eps"], FIXED)
    with led.scope("head"):
        if a["layernorm"]:
            return x.matmul(w["head.weight"]) + w["head.bias"]
        if "head.weight" in w:
            return x.matmul(w["head.weight"])
        # tied: the token table, shared by the model owner or public (then a local product)
        table = w["tok_emb"] if public_emb is None else public_emb
        return x.matmul(table.t())


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
                      token_ids: torch.Tensor, *, emulate_max_free: bool = False,
                      precision_bits: int = 16) -> torch.Tensor:
    """The private forward's math in plaintext (float32): logits (T, V) for one sequence.

    ``emulate_max_free``: the softmax as the max-free approximation (the config's
    ``softmax_bound``), in emulated fixed point, everything else exact.
    """
    a = _arch(config)
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    ids = _check_ids(ids, a["vocab_size"], ids.numel())
    w = fold_weights(state_dict, config, ids.numel())
    onehot = F.one_hot(ids, a["vocab_size"]).float()
    ops: Any = _PlainOps
    if emulate_max_free:
        if a["softmax_bound"] is None:
            raise MpcError("the config carries no softmax_bound to emulate")
        ops = _EmulatedOps(MaxFreeSoftmax.tune(a["softmax_bound"], ids.numel(), precision_bits),
                           precision_bits)
    with torch.no_grad():
        return _forward(w, a, onehot, ops)


def private_forward(config: Mapping[str, Any], seq_len: int, *,
                    state_dict: Mapping[str, torch.Tensor] | None = None,
                    token_ids: torch.Tensor | None = None,
                    model_owner: int = 0, data_owner: int = 1,
                    approx: Approximation | None = None,
                    folded: Mapping[str, torch.Tensor] | None = None,
                    public_embedding: torch.Tensor | None = None,
                    ledger: OpLedger | None = None) -> torch.Tensor | None:
    """Evaluate the AERO decoder on one sequence under secure two-party computation.

    Call inside :func:`mpc_session` on both parties with the same public ``config``
    (``AeroConfig.to_dict()``) and ``seq_len``. The model owner passes ``state_dict`` (plaintext,
    folded locally by :func:`fold_weights`) or weights already in :func:`weight_spec`'s form
    (``folded``: the cost configurations' random weights), the data owner its ``token_ids``
    (``seq_len`` ints); each party passes only its own. The data owner one-hot encodes its ids
    and shares the (T, V) matrix, so the embedding lookup is an encrypted matmul and the model
    owner never sees an id. Returns the logits (T, V) on the data owner, ``None`` on every other
    party.

    ``public_embedding``: the token table (V, d), when the model owner has made it public; both
    parties pass the same one. The data owner then looks its tokens up locally and shares the
    (T, d) rows instead of the (T, V) one-hot matrix: its ids still never leave it, the table is
    no longer secret (a tied, LayerNorm-free head then multiplies by it locally, for free).

    A config carrying ``softmax_bound`` (``node.aero_bound``) gets the max-free softmax
    (:class:`MaxFreeSoftmax`). ``approx`` sets the approximations' accuracy
    (:class:`Approximation`; same on both sides). ``ledger`` (:class:`OpLedger`) receives this
    party's bytes, rounds and seconds per operation.
    """
    party = mpc.require_session()
    if model_owner == data_owner:
        raise MpcError("model_owner and data_owner must be different parties")
    for name, r in (("model_owner", model_owner), ("data_owner", data_owner)):
        if not 0 <= r < party.world_size:
            raise MpcError(f"{name} {r} is not a party of this {party.world_size}-party session")
    a = _arch(config)
    public = public_embedding is not None
    if public and tuple(public_embedding.shape) != (a["vocab_size"], a["d_model"]):
        raise MpcError(f"public_embedding must be (vocab_size, d_model) = "
                       f"({a['vocab_size']}, {a['d_model']}), got {tuple(public_embedding.shape)}")
    spec = weight_spec(config, seq_len, public_embedding=public)
    weights_in: Mapping[str, torch.Tensor] = {}
    if party.rank == model_owner:
        if (state_dict is None) == (folded is None):
            raise MpcError("the model owner must pass its state_dict or its folded weights")
        weights_in = folded if folded is not None else fold_weights(state_dict, config, seq_len)
    x0 = None
    if party.rank == data_owner:
        if token_ids is None:
            raise MpcError("the data owner must pass its token_ids")
        ids = _check_ids(token_ids, a["vocab_size"], seq_len)
        x0 = public_embedding.float()[ids] if public else \
            F.one_hot(ids, a["vocab_size"]).float()
    approx = approx or Approximation()
    max_free = None if a["softmax_bound"] is None else \
        MaxFreeSoftmax.tune(a["softmax_bound"], seq_len, approx.precision_bits)
    led = ledger or NoLedger
    cfg = mpc.import_crypten().cfg
    try:
        with cfg.temp_override({"encoder.precision_bits": approx.precision_bits}):
            if ledger is not None:
                ledger.begin()
            with led.scope("input"):
                weights = {name: mpc.encrypt(weights_in.get(name), model_owner, shape)
                           for name, shape in spec}
                x = mpc.encrypt(x0, data_owner,
                                (seq_len, a["d_model"] if public else a["vocab_size"]))
            ops = _CrypTenOps(approx, ledger, max_free)
            logits = _forward(weights, a, x, ops,
                              public_embedding.float() if public else None)
            with led.scope("output"):
                return mpc.decrypt(logits, dst=data_owner)
    except Exception as exc:
        if mpc.looks_like_peer_failure(exc) and not isinstance(exc, MpcError):
            raise mpc.peer_error(party, exc, "the private forward") from exc
        raise
