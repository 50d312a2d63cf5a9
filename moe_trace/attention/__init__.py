"""INT8 FlashAttention (Triton) for the models' attention layer, with its references and training path."""

from moe_trace.attention.autograd import flash_attention_train
from moe_trace.attention.int8_attention import int8_flash_attention
from moe_trace.attention.modes import MODES, TRAINING_MODE

__all__ = ["MODES", "TRAINING_MODE", "flash_attention_train", "int8_flash_attention"]
