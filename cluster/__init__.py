"""Confide run as real local processes: ``local.LocalCluster`` (a coordinator and N node
daemons on 127.0.0.1) and ``experiment.run_experiment`` (one federated job on it, evaluated).

Below ``cli`` and ``bench`` on purpose: the demo, the benchmarks and the integration tests all
drive the same cluster, and none of them has to import the command line to do it."""
