"""flr-engine: Follow-up Likelihood as Reward (Zhang et al., AAAI 2025).

``import flr_engine`` never fails for want of an optional piece (Triton, CUDA, the C++
extension); the missing piece says what to install when it is used.
"""

from flr_engine._version import __version__

__all__ = ["__version__", "FLRScorer", "FLRReward", "RewardConfig", "ScoreResult", "load_templates"]


def __getattr__(name: str):  # lazy: keep `import flr_engine` cheap (no torch import)
    if name == "FLRScorer":
        from flr_engine.scorer import FLRScorer

        return FLRScorer
    if name == "FLRReward":
        from flr_engine.trl_reward import FLRReward

        return FLRReward
    if name in ("RewardConfig", "ScoreResult"):
        from flr_engine import reward

        return getattr(reward, name)
    if name == "load_templates":
        from flr_engine.templates import load_templates

        return load_templates
    raise AttributeError(f"module 'flr_engine' has no attribute {name!r}")
