"""Two real party processes (privacy.local_parties): the per-operation ledger adds up to what
CrypTen counted, the max-free softmax and the local embedding keep the logits, and they cost
fewer bytes than the row max and the one-hot input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from confide.node.aero import AeroConfig, AeroModel, save_aero
from confide.node.aero_bound import measure_score_bound
from confide.privacy.local_parties import run_local

TINY = {"max_len": 16, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("costs")
    model = AeroModel(AeroConfig.softmax_only(64, seed=1, **TINY)).eval()
    path = folder / "aero.safetensors"
    save_aero(model, path)
    gen = torch.Generator().manual_seed(2)
    text = [torch.randint(0, 64, (16,), generator=gen).tolist() for _ in range(4)]
    bound = measure_score_bound(model, text).bound
    config = model.config.to_dict()
    baseline = AeroConfig.baseline(64, **TINY).to_dict()
    jobs = [{"name": "exact", "config": config, "seq_len": 16, "weights": {"file": str(path)},
             "windows": text[:1]},
            {"name": "maxfree", "config": config | {"softmax_bound": bound}, "seq_len": 16,
             "weights": {"file": str(path)}, "windows": text[:1]},
            {"name": "local", "config": config | {"softmax_bound": bound}, "seq_len": 16,
             "weights": {"file": str(path)}, "windows": text[:1],
             "public_embedding": {"file": str(path)}},
            {"name": "baseline", "config": baseline, "seq_len": 16,
             "weights": {"random": 0}, "windows": text[:1]}]
    data_owner, model_owner = run_local(jobs, folder, timeout_s=60, limit_s=240)
    with torch.no_grad():
        plain = model(torch.tensor(text[0]))
    logits = {j["name"]: load_file(str(folder / f"{j['name']}.0.safetensors"))["logits"]
              for j in jobs}
    return data_owner, model_owner, logits, plain


def test_per_op_bytes_add_up_to_the_total(runs):
    data_owner, model_owner, _, _ = runs
    for party in (data_owner, model_owner):
        for name, result in party.items():
            f = result["forwards"][0]
            ledger = f["ledger"]
            assert ledger["unaccounted"] == {"bytes": 0, "rounds": 0}, name
            assert sum(v["bytes"] for v in ledger["by_op"].values()) == f["stats"]["bytes"]
            assert sum(v["rounds"] for v in ledger["by_op"].values()) == f["stats"]["rounds"]
            assert set(f["load_average_1min"]) == {"before", "after"}  # seconds move with it
    ops = data_owner["baseline"]["forwards"][0]["ledger"]["by_op"]
    assert {"softmax_max", "softmax_exp", "softmax_reciprocal", "layernorm", "gelu",
            "embedding", "head"} <= {op for op, v in ops.items() if v["bytes"] > 0}


def test_max_free_softmax_and_local_embedding_keep_the_logits_and_cost_less(runs):
    data_owner, _, logits, plain = runs
    for name in ("exact", "maxfree", "local"):
        assert (logits[name] - plain).abs().max().item() < 2e-2, name
        assert torch.equal(logits[name].argmax(-1), plain.argmax(-1)), name

    def by_op(name):
        return data_owner[name]["forwards"][0]["ledger"]["by_op"]

    def total(name):
        return data_owner[name]["forwards"][0]["stats"]["bytes"]

    assert "softmax_max" not in by_op("maxfree")
    assert by_op("exact")["softmax_max"]["bytes"] > 0
    assert total("maxfree") < total("exact")
    assert by_op("local")["embedding"]["bytes"] == 0 < by_op("maxfree")["embedding"]["bytes"]
    assert total("local") < total("maxfree")
