"""Evaluation: ranking metrics as pure functions and full-catalog ranking with history masking."""
