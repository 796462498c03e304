"""The modes, limits and token budgets of Minions: what the node and the remote side agree
on, in one place so the schemas, the worker and the protocols cannot drift apart."""

from __future__ import annotations

MODES = ("minions", "minion", "local-only", "remote-only")
#: what the daemons serve: remote-only would send the documents to the coordinator
DAEMON_MODES = ("minions", "minion", "local-only")

DEFAULT_MAX_ROUNDS = 2
MAX_ROUNDS_LIMIT = 5
DEFAULT_CHUNK_CHARS = 1500
DEFAULT_CONTEXT_CHARS = 8000
MAX_JOBS = 4
#: local model calls one node makes in one round, at most (jobs x chunks)
MAX_LOCAL_CALLS = 48
#: findings the remote model reads per aggregation, at most (grounded ones first)
MAX_FINDINGS = 8
MAX_QUESTION_CHARS = 4000

#: what one finding or reply may hold, whatever the citation policy
MAX_ANSWER_CHARS = 300
MAX_EXPLANATION_CHARS = 400
MAX_REPLY_CHARS = 1500

#: generation budgets per call (a question may ask for less)
#: (the structured calls' budgets fit the longest answer their schemas allow, schemas.py:
#: a plan's budget is its schema's bound, at most REMOTE_PLAN_TOKENS; the others are fixed)
REMOTE_PLAN_TOKENS = 896
REMOTE_DECISION_TOKENS = 120
LOCAL_JOB_TOKENS = 112
LOCAL_CHAT_TOKENS = 64

NO_ANSWER = "I could not find the answer in the documents."


class AskCancelled(Exception):
    """The question was withdrawn (the client went away, the task was cancelled)."""
