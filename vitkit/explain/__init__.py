"""vitkit.explain (work in progress)."""
