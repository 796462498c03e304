"""Which ``ModelSpec.base`` values the wire contract knows: the packaged models by name, or
an absolute local path (a folder that ``save_pretrained`` wrote, on the node's own disk).

Both daemons use this: the coordinator refuses a base that is neither before it accepts a
job, and each node's policy (``node/policy.py``) then decides which of them it loads. A path
is only ever a request: whether the folder may be read is the node owner's decision.
"""

from __future__ import annotations

from pathlib import PurePosixPath

#: the models every node can build offline (``node/models.py``)
PACKAGED_BASES = ("minilm", "smollm2", "tiny-bert", "tiny-llama")
MAX_BASE_CHARS = 1024


def base_problem(base: str) -> str:
    """Why ``base`` cannot name a model ("" when it can): a packaged name, or an absolute
    path with no ``..`` part and no control character."""
    if base in PACKAGED_BASES:
        return ""
    if not base:
        return "empty"
    if len(base) > MAX_BASE_CHARS:
        return f"longer than {MAX_BASE_CHARS} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in base):
        return "contains a control character"
    if not base.startswith("/"):
        return (f"{base[:80]!r} is neither a packaged model ({', '.join(PACKAGED_BASES)}) nor "
                "an absolute path to a model folder on the nodes")
    if ".." in PurePosixPath(base).parts:
        return f"{base[:80]!r}: a path with '..' is refused"
    return ""
