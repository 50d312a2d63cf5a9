"""moe-trace: train small GPT-MoE models and record, analyse, predict and place their expert load."""

__version__ = "0.1.0"
