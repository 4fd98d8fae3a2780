"""megatron_dvpo: a Megatron-core backend for Decoupled Value Policy Optimization."""

__version__ = "0.1.0"
