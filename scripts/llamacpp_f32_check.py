"""llama.cpp on an F32 copy of the default model's GGUF (F32 KV cache) against the reference
and the naive high-level API, on the same rendered sequences (flr-mixed, 3 pairs).

    python scripts/llamacpp_f32_check.py    # needs pip install -e ".[llamacpp]"
"""
import tempfile

from flr_engine import FLRScorer
from flr_engine.llamacpp import LlamaCppBackend, LlamaCppNaiveBackend, dequantize_gguf
from flr_engine.models import default_gguf
from flr_engine.scorer import sequence_scores

s = FLRScorer.from_pretrained("default", templates="flr-mixed", engine="reference", device="cpu")
pairs = [("How do I boil an egg?", "Put it in boiling water for 8 minutes."),
         ("How do I boil an egg?", "I don't know."),
         ("Tell me about Rome.", "Rome is the capital of Italy, founded, legend says, in 753 BC.")]
seqs = [q for c, r in pairs for q in s.prepare([{"role": "user", "content": c}], r).sequences]
f32 = dequantize_gguf(default_gguf(), tempfile.mkdtemp() + "/f32.gguf")
ref = sequence_scores(s.backend, seqs)
bat = sequence_scores(LlamaCppBackend(f32, s.tokenizer, kv_f32=True), seqs)
nai = sequence_scores(LlamaCppNaiveBackend(f32, s.tokenizer, kv_f32=True), seqs)


def d(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


print(f"{len(seqs)} sequences: |batched - reference| max {d(bat, ref):.1e}; |batched - naive| max {d(bat, nai):.1e}")
