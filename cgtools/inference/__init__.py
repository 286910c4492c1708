"""Exact inference on the Random Hierarchy Model: belief propagation, the perfect denoiser and
the forward-backward experiment."""

from cgtools.inference.bp import BeliefPropagation, Beliefs
from cgtools.inference.denoiser import BPDenoiser

__all__ = ["BPDenoiser", "BeliefPropagation", "Beliefs"]
