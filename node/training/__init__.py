"""Node-side training: the trainers, the batching and state handling they share, and the
table that picks a job's trainer from what its method trains."""
