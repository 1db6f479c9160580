"""vitkit.training (work in progress)."""
