"""Model: per-domain item tables and adapters, the VQ codebook, the shared causal encoder."""
