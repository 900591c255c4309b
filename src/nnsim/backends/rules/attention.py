"""nn.MultiheadAttention (placeholder)."""
