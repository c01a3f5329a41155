"""The model catalogues: encoders, architectures, layer groups and freeze recommendations (data + pure functions)."""
