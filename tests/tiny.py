"""Tiny offline tokenizers (several chat-template families) and random-init models.

Nothing here touches a hub: tokenizers are trained in memory with `tokenizers` on a small
corpus, models are built from configs with random weights.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from flr_engine.templates import load_templates

CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    ),
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
        "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    ),
    "mistral": (
        "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    ),
    "gemma": (
        "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
        "\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    ),
}
SPECIALS = {
    "chatml": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["<s>", "</s>", "[INST]", "[/INST]"],
    "gemma": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
}
BOS = {"chatml": None, "llama3": "<|begin_of_text|>", "mistral": "<s>", "gemma": "<bos>"}
EOS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>"}

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "How do I bake bread? Mix flour, water, yeast and salt, knead, let it rise, then bake.",
    "Can you help me write a poem about the sea?",
    "I like turtles. Turtles are reptiles with shells.",
    "Thanks, that's exactly what I needed. That's not what I asked.",
] + load_templates("flr-helpfulness").unique_texts + load_templates("flr-mixed").unique_texts


@functools.cache
def make_tokenizer(family: str = "chatml", vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer in the style of ``family`` (byte-level for chatml/llama3,
    sentencepiece-like Metaspace for mistral/gemma), with that family's chat template."""
    specials = SPECIALS[family]
    tok = Tokenizer(models.BPE(unk_token=None if family in ("chatml", "llama3") else "<unk>"))
    if family in ("chatml", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        specials_all = specials
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        # the markers' characters too: an injected marker is text, not <unk>
        alphabet = sorted(set("".join(CORPUS)) | set("\n’'") | set("".join(specials)))
        specials_all = specials + ["<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials_all, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS[family],
        eos_token=EOS[family],
        unk_token="<unk>" if family not in ("chatml", "llama3") else None,
    )
    if BOS[family]:
        # like Llama/Gemma: the tokenizer alone adds BOS (the chat template writes it itself)
        from tokenizers import processors

        bos_id = fast.convert_tokens_to_ids(BOS[family])
        fast._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS[family]} $A", special_tokens=[(BOS[family], bos_id)]
        )
    fast.chat_template = CHAT_TEMPLATES[family]
    return fast


ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "mistral": dict(model_type="mistral"),
    "gemma2": dict(model_type="gemma2", final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16),
    "gemma3": dict(model_type="gemma3_text", sliding_window=8, query_pre_attn_scalar=16),
}


def make_model(arch: str = "llama", vocab_size: int = 600, seed: int = 0, dtype=torch.float32):
    """A 2-layer random-init causal LM of architecture ``arch`` (GQA: 4 heads, 2 kv heads)."""
    from transformers import AutoConfig

    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=arch in ("gemma2", "gemma3"),
        **spec,
    )
    if arch == "gemma3":
        cfg.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # larger random weights: sharper, more informative distributions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()
