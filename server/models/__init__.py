"""Compact model definitions (Llama family) whose linears add per-token deltas."""
