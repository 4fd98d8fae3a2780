"""megatron_dvpo: a Megatron-core backend for Decoupled Value Policy Optimization."""

import warnings

from megatron_dvpo._startup import defer_compile_during_megatron_import

# megatron-core announces each fallback it takes without apex/TE; on CPU those are expected.
warnings.filterwarnings("ignore", message=r".*(Apex|apex) (is|are) not installed.*")
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")

defer_compile_during_megatron_import()

__version__ = "0.1.0"
