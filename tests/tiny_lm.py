"""A tiny random-weight Llama for generate-level tests, and random prompt ids for it."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama() -> LlamaForCausalLM:
    """3 layers, 4 query / 2 KV heads, vocab 1000 (pad 0, bos 1, eos 2), float32, eval mode."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                         pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


def ids(n: int, seed: int = 0) -> torch.Tensor:
    """int64 [1, n] ids in [3, 900): no special token."""
    return torch.randint(3, 900, (1, n), generator=torch.Generator().manual_seed(seed))
