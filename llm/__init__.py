"""LLM side of the suite: HH data, frozen text features, VRPO on TRL and the experiments on LMs.

``from llm import VRPOTrainer, VRPOConfig`` (imported lazily: ``import llm.data`` does not load TRL).
"""

__all__ = ["VRPOTrainer", "VRPOConfig"]


def __getattr__(name):
    if name in __all__:
        from . import vrpo_trainer

        return getattr(vrpo_trainer, name)
    raise AttributeError(f"module 'llm' has no attribute {name!r}")
