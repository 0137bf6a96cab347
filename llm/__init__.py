"""HH data, frozen text features, VRPO on TRL (``from llm import VRPOTrainer, VRPOConfig``, loaded lazily), LM experiments."""

__all__ = ["VRPOTrainer", "VRPOConfig"]


def __getattr__(name):  # import llm.data etc. without loading TRL
    if name in __all__:
        from . import vrpo_trainer

        return getattr(vrpo_trainer, name)
    raise AttributeError(f"module 'llm' has no attribute {name!r}")
