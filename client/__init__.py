"""What a data owner runs against a node, outside the coordinator: private inference
(``private_inference.private_infer``). A library layer, so the CLI, the benchmarks and the
container scenarios call it alike."""
