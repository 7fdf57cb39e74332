"""Benchmark: ``flr dpo``'s trainer (FLRDPOTrainer) against TRL's plain ``DPOTrainer``.

The same pairs, model and settings through both trainers: a random Llama (hidden 256,
4 layers, 4 heads, intermediate 688, vocab 32000, fp32), pairs of a random prompt and two
random replies (chosen and rejected share their pair's prompt), ``per_device_train_batch_size``
pairs per optimizer step, reference log-probs precomputed (not timed), AdamW.

* ``trl``: ``trl.DPOTrainer``: chosen and rejected rows right-padded in one (2B, L) batch
  through the model; TRL's fused LM head on the completion positions.
* ``flr``: ``FLRDPOTrainer``: the batch's token trie through the backbone (each prompt once,
  no padding, tree attention), then the same TRL fused LM head on the completion-predicting
  rows only, loss and optimizer.
* ``flr-trie``: ``FLRDPOTrainer`` with TRL's head left as it is (``add_packed_head`` off):
  the trie's gain alone. Off CUDA TRL's head scores every padded position, prompt and
  padding included (on CUDA it scores completion positions only, like ``flr``), so on the
  CPU ``trl / flr-trie`` is the gain of packing and ``flr-trie / flr`` that of the head.

Both get the pre-tokenised rows (``trl`` through a subclass that only skips TRL's
tokenisation; every computation is TRL's). Each variant runs in a fresh subprocess: one
warm-up step (gradients and AdamW state allocated), then ``--steps`` measured steps: wall and
CPU seconds per step (median), and peak memory over what was resident after the warm-up --
on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the peak RSS (Linux
``/proc/self/clear_refs`` + VmHWM; elsewhere the growth of ``ru_maxrss``, a lower bound).
The first logged loss of both (policy == reference: log 2) and the loss after the steps are
compared. Run::

    python benches/bench_dpo.py                       # the README table (CPU, 1 thread)
    python benches/bench_dpo.py --hidden 512 --layers 12 --prompt 512   # a deeper model
    python benches/bench_dpo.py --device cuda --pairs 8 --prompt 1024 --reply 256
    pytest benches/bench_dpo.py --benchmark-enable    # a small case, both variants
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HIDDEN, LAYERS, VOCAB = 256, 4, 32000

_CHILD = r"""
import json, resource, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from bench_dpo import child
print(json.dumps(child(json.loads(sys.argv[2]))))
"""


def make_model(device: str, hidden: int = HIDDEN, layers: int = LAYERS):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 688 // 256,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(device)


def make_rows(n: int, prompt: int, reply: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    rand = lambda k: torch.randint(2, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": rand(prompt), "chosen_ids": rand(reply), "rejected_ids": rand(reply)}
            for _ in range(n)]  # fmt: skip


def _tokenizer():
    """A stand-in tokenizer: the trainers only read its pad / eos ids and save it."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1} | {f"t{i}": i for i in range(2, 64)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    )
    tok.pad_token, tok.eos_token = "<pad>", "</s>"
    return tok


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))
    except OSError:
        return None


def child(opts: dict) -> dict:
    """One variant, in this (fresh) process: see the module docstring."""
    import resource
    import statistics
    import tempfile
    import time

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from flr_engine.cli.dpo import _no_checkpointing
    from flr_engine.dpo import FLRDPOTrainer

    torch.set_num_threads(opts["threads"])
    dev = opts["device"]
    cuda = dev.startswith("cuda")

    class PlainDPOTrainer(DPOTrainer):  # TRL's, given the same pre-tokenised rows
        def _prepare_dataset(self, dataset, *a, **kw):
            return dataset

    class Meter(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu, self.base, self.peak = [], [], 0, 0

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            w, c = time.perf_counter() - self.t[0], time.process_time() - self.t[1]
            if state.global_step == 1:  # the warm-up: start measuring memory from here
                if cuda:
                    self.base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    try:
                        with open("/proc/self/clear_refs", "w") as f:
                            f.write("5")
                        self.base = _status_kib("VmRSS") * 1024
                    except OSError:
                        self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                return
            self.wall.append(w)
            self.cpu.append(c)

        def on_train_end(self, args, state, control, **kw):
            if cuda:
                self.peak = torch.cuda.max_memory_allocated()
            else:
                hwm = _status_kib("VmHWM")
                self.peak = (hwm if hwm is not None else resource.getrusage(
                    resource.RUSAGE_SELF).ru_maxrss) * 1024  # fmt: skip

    if opts["variant"] == "flr-trie":
        import flr_engine.dpo as dpo

        dpo.add_packed_head = lambda model: None
    cls = PlainDPOTrainer if opts["variant"] == "trl" else FLRDPOTrainer
    meter = Meter()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=opts["pairs"], max_steps=1 + opts["steps"],
            learning_rate=1e-6, bf16=False, precompute_ref_log_probs=True, report_to="none",
            logging_steps=1, save_strategy="no", use_cpu=not cuda, disable_tqdm=True,
            max_length=None, seed=0, **_no_checkpointing(DPOConfig),
        )  # fmt: skip
        rows = make_rows(opts["pairs"] * (1 + opts["steps"]), opts["prompt"], opts["reply"])
        model = make_model(dev, opts.get("hidden", HIDDEN), opts.get("layers", LAYERS))
        trainer = cls(model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=_tokenizer(), callbacks=[meter])  # fmt: skip
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "variant": opts["variant"],
        "step_s": statistics.median(meter.wall),
        "cpu_s": statistics.median(meter.cpu),
        "peak_mib": (meter.peak - meter.base) / 2**20,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def run(variant: str, **opts) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS=str(opts["threads"]), TQDM_DISABLE="1")
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, here, json.dumps(opts | {"variant": variant})],
        capture_output=True, text=True, timeout=3600, env=env,
    )  # fmt: skip
    if res.returncode:
        raise RuntimeError(f"{variant}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


VARIANTS = ("trl", "flr-trie", "flr")


def compare(variants=VARIANTS, **opts) -> dict[str, dict]:
    """Each variant's result on the same case, their losses checked against TRL's."""
    res = {v: run(v, **opts) for v in variants}
    trl = res["trl"]
    for v, r in res.items():
        assert abs(r["first_loss"] - trl["first_loss"]) < 1e-4, (v, r, trl)
        tol = 1e-3 * max(1.0, abs(trl["last_loss"]))
        assert abs(r["last_loss"] - trl["last_loss"]) < tol, (v, r, trl)
    return res


def table(cases: list[tuple[dict, dict]]) -> str:
    """Seconds per step (speed-up over TRL), peak MiB over the resident (TRL's / this)."""
    variants = list(cases[0][1])
    head = " | ".join(f"{v} s/step | {v} peak MiB" for v in variants)
    lines = [f"| case | {head} |", "|---|" + "---:|" * (2 * len(variants))]
    for opts, res in cases:
        case = (f"h={opts.get('hidden', HIDDEN)} L={opts.get('layers', LAYERS)}: {opts['pairs']} "
                f"pairs x ({opts['prompt']} + {opts['reply']}), {opts['device']}")  # fmt: skip
        trl, cells = res["trl"], []
        for v in variants:
            r = res[v]
            speed = "" if v == "trl" else f" ({trl['step_s'] / r['step_s']:.2f}x)"
            mem = "" if v == "trl" else f" ({trl['peak_mib'] / max(r['peak_mib'], 1.0):.2f}x)"
            cells += [f"{r['step_s']:.2f}{speed}", f"{r['peak_mib']:.0f}{mem}"]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_bench_dpo_trainer():
    """A small case: every variant runs, agrees with TRL on the losses, and reports time and
    memory."""
    opts = dict(device="cpu", threads=1, pairs=2, prompt=64, reply=32, steps=2)
    res = compare(**opts)
    print("\n" + table([(opts, res)]))
    assert all(r["step_s"] > 0 for r in res.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=2, help="pairs per optimizer step")
    p.add_argument(
        "--prompt", type=int, nargs="+", default=[128, 512], help="prompt tokens (one case each)"
    )
    p.add_argument("--reply", type=int, default=128, help="tokens per reply")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    p.add_argument("--hidden", type=int, default=HIDDEN, help="model width (MLP: 2.69x)")
    p.add_argument("--layers", type=int, default=LAYERS, help="decoder layers")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    a = p.parse_args(argv)
    cases = []
    for prompt in a.prompt:
        opts = dict(device=a.device, threads=a.threads, pairs=a.pairs, prompt=prompt,
                    reply=a.reply, steps=a.steps, hidden=a.hidden, layers=a.layers)  # fmt: skip
        res = compare(a.variants, **opts)
        cases.append((opts, res))
        print(json.dumps({"opts": opts, **res}), file=sys.stderr)
    print(f"random Llama, V={VOCAB}, fp32, {a.threads} thread(s); "
          f"median of {a.steps} steps after 1 warm-up")  # fmt: skip
    print(table(cases))


if __name__ == "__main__":
    main()
