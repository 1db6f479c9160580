"""vitkit.data (work in progress)."""
