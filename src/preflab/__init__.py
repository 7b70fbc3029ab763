"""preflab: the whole RLHF loop in one toolkit (pretrain, SFT, collect, reward, optimise, evaluate)."""

__version__ = "0.1.0"
