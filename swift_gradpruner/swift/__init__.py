"""The ms-swift adapter: the ``--gradprune`` flags, gradient capture in swift's trainer, the two-phase run."""
