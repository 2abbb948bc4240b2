"""Writes a tiny random-weight llama model in GGUF, for end-to-end tests against a llama.cpp server.

2 layers, 64 wide, a byte-level vocabulary (every byte a token, plus ChatML's control tokens)
and a ChatML chat template: about 0.5 MB, loads in milliseconds, generates noise quickly. It
exercises the real wire format (streaming, usage, finish reasons, max_tokens) without any
download. Needs the `gguf` and `numpy` packages; tests should `pytest.importorskip("gguf")`.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
UNK, BOS, EOS, IM_START, IM_END = range(len(SPECIAL_TOKENS))

N_LAYERS = 2
N_EMBD = 64
N_HEADS = 4
N_FF = 128
CONTEXT_LENGTH = 512


def write_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    """Write the model to `path` and return it. The same seed gives the same file."""
    writer = gguf.GGUFWriter(path, arch="llama")
    _add_hyperparameters(writer)
    _add_vocabulary(writer)
    for name, tensor in _random_tensors(np.random.default_rng(seed), vocab_size=len(_tokens())):
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hyperparameters(writer: gguf.GGUFWriter) -> None:
    writer.add_name("spindle-tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_HEADS)
    writer.add_rope_dimension_count(N_EMBD // N_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(_tokens()))


def _tokens() -> list[str]:
    # SentencePiece-style byte fallback: text with no matching piece becomes <0xNN> tokens.
    return [*SPECIAL_TOKENS, *(f"<0x{byte:02X}>" for byte in range(256))]


def _add_vocabulary(writer: gguf.GGUFWriter) -> None:
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * (len(SPECIAL_TOKENS) - 1)
    types += [gguf.TokenType.BYTE] * 256
    writer.add_tokenizer_model("llama")
    writer.add_token_list(_tokens())
    writer.add_token_scores([0.0] * len(types))
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(IM_END)  # ChatML models end a turn with <|im_end|>
    writer.add_eot_token_id(IM_END)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def _random_tensors(rng: np.random.Generator, vocab_size: int) -> list[tuple[str, np.ndarray]]:
    """Tensors in llama.cpp's names; numpy shapes are (out, in), GGUF stores them reversed."""

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def norm() -> np.ndarray:
        return np.ones(N_EMBD, dtype=np.float32)

    tensors = [("token_embd.weight", weight(vocab_size, N_EMBD))]
    for layer in range(N_LAYERS):
        block = f"blk.{layer}"
        tensors += [
            (f"{block}.attn_norm.weight", norm()),
            (f"{block}.attn_q.weight", weight(N_EMBD, N_EMBD)),
            (f"{block}.attn_k.weight", weight(N_EMBD, N_EMBD)),
            (f"{block}.attn_v.weight", weight(N_EMBD, N_EMBD)),
            (f"{block}.attn_output.weight", weight(N_EMBD, N_EMBD)),
            (f"{block}.ffn_norm.weight", norm()),
            (f"{block}.ffn_gate.weight", weight(N_FF, N_EMBD)),
            (f"{block}.ffn_up.weight", weight(N_FF, N_EMBD)),
            (f"{block}.ffn_down.weight", weight(N_EMBD, N_FF)),
        ]
    tensors += [("output_norm.weight", norm()), ("output.weight", weight(vocab_size, N_EMBD))]
    return tensors
