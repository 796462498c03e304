"""Minions (Narayan et al. 2025, "Cost-efficient Collaboration Between On-device and Cloud
Language Models"): a remote model that never reads the documents works with local models that
do, so most of the tokens are read where the data lives.

The algorithm box (MinionS, the decomposition protocol), and where each step lives::

    nodes describe their documents:  metadata only (opaque ids D1.., sizes, chunk counts)
                                      -> worker.LocalWorker.describe, chunking in text.py
    for round r = 1 .. max_rounds:
        remote: plan jobs             question + metadata + scratchpad -> JSON (PLAN_SCHEMA):
                                      [{task, documents, chunks, advice}]   (data, never code)
                                      -> orchestrator.run_minions, schemas.parse_plan
        nodes:  run every job on every selected chunk of their own documents with the local
                model, in parallel across nodes; each (job, chunk) gives
                {answer, explanation, citation} or abstains; abstentions are dropped, the
                citation policy is applied on the node, the rest goes up
                                      -> worker.LocalWorker.run_jobs, policy.apply_policy
        remote: aggregate             question + findings -> {"decision": "final", "answer"}
                                      or {"decision": "more", "feedback"} (another round)
                                      -> orchestrator.run_minions, schemas.parse_decision
    answer

The modules, one concept each:

- ``config``: modes, limits and token budgets both roles share;
- ``text``: words, sentences, chunks, grounding and abstentions (the text operations);
- ``policy``: the citation policy a node applies to everything it sends;
- ``schemas``: the JSON that crosses between the roles (plans, decisions, a node's
  instructions), validated and repaired; data, never code;
- ``worker``: the node's side (``LocalWorker``), pure over the documents' text;
- ``orchestrator``: the remote side, the protocols (MinionS, Minion, local-only,
  remote-only) over an ``Executor`` that reaches the nodes.

Everything here is pure logic over ``agents.model.ChatModel``: the benchmark runs it in
process with ``LocalWorker`` objects, the coordinator runs it over the wire with MINION tasks
whose node side (``node/minion_worker.py``) runs the same ``LocalWorker``.
"""
