"""CPU inference that turns a pruned model's zeros into speed: :func:`sparse_inference` (torch and the core only)."""
from st3_hf.inference.planner import LayerPlan, SparseInferenceModel, Timer, default_timer, sparse_inference

__all__ = ["sparse_inference", "SparseInferenceModel", "LayerPlan", "Timer", "default_timer"]
