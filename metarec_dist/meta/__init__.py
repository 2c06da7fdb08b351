"""Meta-learning: inner loop, meta-gradients, similarity-rescaled task weights, baselines."""
