"""Confide: privacy-preserving, decentralized collaboration between language-model agents.

The public API is this page::

    from confide import Client, job_spec

    with Client("127.0.0.1:50051") as client:
        job = client.submit_job(job_spec("fedavg-lora", rounds=3, min_nodes=2))

Everything else lives in subpackages, one per part (``docs/ARCHITECTURE.md``):
``confide.v1`` (generated protobuf code of the ``confide.v1`` wire package), ``confide.protos``
(codec, chunking, identity, TLS), ``confide.node``, ``confide.coordinator``, ``confide.privacy``,
``confide.agents``, ``confide.sdk``, ``confide.cluster``, ``confide.cli``, ``confide.bench``.
In the repository each subpackage is a top-level folder (``node/`` is ``confide.node``): the
build maps them with setuptools' ``package-dir`` (``setup.py``), so a wheel installs one
top-level package, ``confide``.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from confide.sdk.client import AsyncClient, Client, ConfideError, job_spec

try:
    __version__ = metadata.version("confide")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["AsyncClient", "Client", "ConfideError", "__version__", "job_spec"]


def __getattr__(name: str) -> Any:
    """The SDK's names before 0.2 (``SyncConfideClient``, ``ConfideClient``) still work for one
    release: ``confide.sdk.client`` answers them with a DeprecationWarning."""
    from confide.sdk import client

    if name in client.DEPRECATED_NAMES:
        return getattr(client, name)
    raise AttributeError(f"module 'confide' has no attribute {name!r}")
