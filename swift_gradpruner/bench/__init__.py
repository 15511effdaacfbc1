"""`gradprune bench` and the per-run dense-vs-pruned timing: training steps, inference, parameters and FLOPs."""
