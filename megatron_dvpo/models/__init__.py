"""Model builders: megatron-core GPTModels for policies, GlobalValueModels for values."""

from megatron_dvpo.config import RunConfig


def build_chunks(cfg: RunConfig, initialize: bool = True) -> list:
    """The model ``cfg.model`` describes: a GVM when it has a value head, else a policy."""
    from megatron_dvpo.models.gpt import build_model_chunks
    from megatron_dvpo.models.gvm import build_gvm_chunks

    if cfg.model.value_head:
        return build_gvm_chunks(cfg, initialize=initialize)
    return build_model_chunks(cfg, initialize=initialize)
