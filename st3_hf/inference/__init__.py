"""CPU inference that turns a pruned model's zeros into speed: :func:`sparse_inference` (torch and the core only)."""
from st3_hf.inference.planner import (LayerPlan, SparseInferenceModel, Timer, default_timer, plan_in_place,
                                      sparse_capable, sparse_inference)
from st3_hf.inference.storage import SparseWeight, held_tensors, tensor_bytes

__all__ = ["sparse_inference", "plan_in_place", "sparse_capable", "SparseInferenceModel", "SparseWeight", "LayerPlan",
           "Timer", "default_timer", "held_tensors", "tensor_bytes"]
