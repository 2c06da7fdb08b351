"""The distributed runner: Ray Train workers, the domain plan, the collective. The only Ray-aware code."""
