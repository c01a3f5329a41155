"""The engine: device handling, training and inference over numpy/torch/smp/onnxruntime (workers only)."""
