"""Split learning on a node (SFPrompt): the model cut in three, the server's body behind a
``Body`` seam, the device's trainer and EL2N pruning, and the stream between device and
split-server."""
