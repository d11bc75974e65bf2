"""The model from first principles: attention, layers, the Transformer trunk."""
