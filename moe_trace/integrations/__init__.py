"""Integrations with other trainers and servers (the application floor): transformers models,
Megatron-LM and SGLang load logs."""
