"""Two local party processes running private forwards with per-operation accounting.

For measurements, not for serving: ``confide bench private`` uses it to cost model shapes no
node serves (random weights of a GPT-2-small shape: cost does not depend on the values) and to
check a trained model's accuracy over many windows in one session. Both parties are fresh
processes (``multiprocessing`` "spawn", one torch thread each: CrypTen must not fork a process
that ran multithreaded torch work) meeting over gloo on 127.0.0.1; rank 0 is the data owner,
as in the product (``node.private_inference``).

A job (JSON-ready dict) names the public config, the sequence length, where the model owner's
weights come from (``{"random": seed}``: weight_spec's shapes filled from a seeded generator,
or ``{"file": path}``: a ``node.aero`` safetensors file), the data owner's token windows, and
optionally a public embedding table (``{"random": seed}`` or ``{"file": path}``). Every window
is one forward; the data owner writes its logits to ``<workdir>/<job>.<k>.safetensors``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

DATA_OWNER, MODEL_OWNER = 0, 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load() -> float | None:
    """The machine's 1-minute load average: seconds measured here move with it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def random_weights(config: dict[str, Any], seq_len: int, seed: int, public: bool,
                   std: float = 0.02) -> dict[str, Any]:
    """weight_spec's tensors filled with N(0, std^2) (biases zero), reproducibly."""
    import torch

    from confide.privacy.aero_2pc import weight_spec

    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=gen) * std if len(shape) > 1
                   else torch.zeros(shape))
            for name, shape in weight_spec(config, seq_len, public_embedding=public)}


def _public_table(spec: dict[str, Any] | None, config: dict[str, Any]):
    import torch

    if spec is None:
        return None
    if "file" in spec:
        from safetensors import safe_open

        with safe_open(spec["file"], framework="pt") as handle:
            return handle.get_tensor("tok_emb.weight").float()
    gen = torch.Generator().manual_seed(int(spec["random"]) + 7919)
    return torch.randn((config["vocab_size"], config["d_model"]), generator=gen) * 0.02


def _run_job(rank: int, job: dict[str, Any], workdir: Path, party) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from confide.privacy import aero_2pc, mpc
    from confide.privacy.op_ledger import OpLedger

    config, t = job["config"], job["seq_len"]
    table = _public_table(job.get("public_embedding"), config)
    state = folded = None
    if rank == MODEL_OWNER:
        if "file" in job["weights"]:  # a node.aero file; fold_weights checks it fits config
            from safetensors.torch import load_file

            state = load_file(job["weights"]["file"])
        else:
            folded = random_weights(config, t, int(job["weights"]["random"]), table is not None)
    out: dict[str, Any] = {"forwards": []}
    for k, window in enumerate(job["windows"]):
        ids = torch.tensor(window) if rank == DATA_OWNER else None
        ledger = OpLedger(mpc.comm_stats)
        party.reset_stats()
        load_before = _load()
        start = time.perf_counter()
        logits = aero_2pc.private_forward(config, t, state_dict=state, folded=folded,
                                          token_ids=ids, model_owner=MODEL_OWNER,
                                          data_owner=DATA_OWNER, public_embedding=table,
                                          ledger=ledger)
        seconds = time.perf_counter() - start
        if logits is not None:
            save_file({"logits": logits.contiguous()}, str(workdir / f"{job['name']}.{k}"
                                                           ".safetensors"))
        out["forwards"].append({"seconds": seconds, "stats": party.stats().to_dict(),
                                "ledger": ledger.to_dict(),
                                "load_average_1min": {"before": load_before,
                                                      "after": _load()}})
    return out


def _party(rank: int, jobs_path: str, workdir: str, rendezvous: str, timeout_s: float) -> None:
    import torch

    torch.set_num_threads(1)
    from confide.privacy import mpc

    folder = Path(workdir)
    jobs = json.loads(Path(jobs_path).read_text())
    results: dict[str, Any] = {}
    try:
        with mpc.mpc_session(rank, 2, rendezvous, timeout_s=timeout_s) as party:
            for job in jobs:
                print(f"party {rank}: {job['name']} ({len(job['windows'])} forward(s))",
                      flush=True)
                results[job["name"]] = _run_job(rank, job, folder, party)
                (folder / f"party{rank}.json").write_text(json.dumps(results))
    except BaseException as exc:
        results["error"] = f"{type(exc).__name__}: {exc}"
    (folder / f"party{rank}.json").write_text(json.dumps(results))


def run_local(jobs: list[dict[str, Any]], workdir: Path | str, timeout_s: float = 600.0,
              limit_s: float = 7200.0) -> list[dict[str, Any]]:
    """Run the jobs between two fresh local processes; returns both parties' results
    (``[data owner, model owner]``, each job name -> forwards). Raises RuntimeError with the
    party's error when a party fails or the run exceeds ``limit_s``."""
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    jobs_path = folder / "jobs.json"
    jobs_path.write_text(json.dumps(jobs))
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_party, args=(r, str(jobs_path), str(folder), rendezvous,
                                              timeout_s)) for r in (DATA_OWNER, MODEL_OWNER)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + limit_s
    try:
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
    finally:
        hung = [proc for proc in procs if proc.is_alive()]
        for proc in hung:
            proc.kill()
            proc.join()
    results = []
    for r in (DATA_OWNER, MODEL_OWNER):
        path = folder / f"party{r}.json"
        result = json.loads(path.read_text()) if path.exists() else {"error": "no result"}
        if "error" in result:
            raise RuntimeError(f"party {r}: {result['error']}" + (" (killed at the time limit)"
                                                                   if hung else ""))
        results.append(result)
    return results
