"""``flr dpo``: TRL's ``DPOTrainer`` whose log-probs come from the engine's packed forward.

:class:`FLRDPOTrainer` is a :class:`trl.DPOTrainer`: the loss (every ``loss_type``), the
optimizer, schedule, accumulation, clipping, mixed precision, DDP / FSDP / DeepSpeed,
logging (``report_to``), checkpoints and ``resume_from_checkpoint`` are TRL's and
transformers'. What changes is how a batch of chosen and rejected sequences is run.

TRL computes every sequence log-prob -- the policy's, and the reference's when
``precompute_ref_log_probs`` computes them once before training -- with one call of the
model's own forward, ``model(input_ids, attention_mask, labels=..., fused_lm_head=True)``:
TRL patches that forward (``trl.trainer.utils.add_fused_lm_head``) to run the backbone and
then the LM head in chunks (log-probs with a backward, never the (tokens, vocab) logits;
also the entropy, mean logit and top-1 hit its metrics log). The engine changes two things:

* :class:`PackedPreferenceCollator` gives TRL's padded batch (B chosen rows, then B rejected
  rows) plus the batch's token trie (:mod:`flr_engine.engine.packer`): the tokens chosen and
  rejected share -- the prompt, and any common start of the replies -- are one node each, and
  there is no padding;
* the backbone (:func:`add_packed_backbone`) runs that trie, (1, T) unique tokens, with tree
  attention at position = depth (:mod:`flr_engine.engine.attention`; exact: every token sees
  exactly its own sequence's earlier tokens), and the forward (:func:`add_packed_head`, a
  wrapper of TRL's) hands TRL's fused head only the M trie nodes that predict a completion
  token, then scatters its per-token outputs back to the padded layout TRL's loss reads
  (TRL's own head, off CUDA, scores every padded position, prompt and padding included).

TRL's head, loss, metrics and optimizer then run unchanged, so the result is plain
``DPOTrainer``'s up to float rounding (tested: log-probs and gradients, losses and metrics,
parameters after training steps, 1 vs 2 DDP ranks). The backbone runs inside the model's
forward call and the LM head inside TRL's patched forward, so DDP, FSDP and DeepSpeed see
every parameter as with plain TRL (the engine reads no weight past the wrapper). The gain:
each pair's prompt is computed once instead of twice, no padding is computed, and the head
scores completion tokens only (``benches/bench_dpo.py``).

Input rows: the formats of :mod:`flr_engine.evaluation.data` (TRL preference rows as written
by ``flr mine``, the project's pairwise files, TRL implicit-prompt rows, HH transcripts),
tokenised by :func:`encode_pairs` under the project's injection policy (reply text never
becomes a control token) and given to TRL pre-tokenised (``prompt_ids``, ``chosen_ids``,
``rejected_ids``). Rows with ``tie: true`` or chosen identical to rejected are skipped and
counted; a bad row raises ``file:line: field 'f': message``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
import types
from dataclasses import dataclass, field

import torch

from flr_engine.chat import InputError
from flr_engine.control import encode_chat
from flr_engine.errors import ConfigError, MissingFileError
from flr_engine.io import RowError, atomic_write_text, claim_output_folder, lock_exclusive

log = logging.getLogger(__name__)

# the keys the collator adds to TRL's batch; the patched backbone consumes them
PACK_KEYS = ("flr_pack_ids", "flr_pack_positions", "flr_pack_subtree_end", "flr_pack_node")


# --------------------------------------------------------------------------------------
# encoding pairs
# --------------------------------------------------------------------------------------


@dataclass
class EncodedPair:
    """Token ids of the chosen / rejected sequences (prompt + reply + end-of-turn) and where
    their completion starts: completion tokens are ``ids[start:]``."""

    line: int
    chosen: list[int]
    chosen_start: int
    rejected: list[int]
    rejected_start: int
    truncated: bool = False


def encode_reply(
    tokenizer, messages: list[dict], reply: str, eot_ids: list[int]
) -> tuple[list[int], int]:
    """Render ``messages + [assistant: reply]`` whole, tokenise it, and return (ids, start):
    ``ids[start:]`` are the tokens overlapping the reply's characters plus the end-of-turn
    token after them; anything the template writes after that is dropped."""
    text, ids, offs = encode_chat(  # the injection policy: content is never a control token
        tokenizer,
        messages + [{"role": "assistant", "content": reply}],
        lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False),
    )
    span = None
    for cand in (reply, reply.strip()):
        i = text.rfind(cand)
        if cand and i >= 0:
            span = (i, i + len(cand))
            break
    if span is None:
        raise InputError("the chat template changed the reply text: cannot locate it", "chosen")
    comp = [n for n, (a, b) in enumerate(offs) if b > span[0] and a < span[1] and b > a]
    if not comp or comp[0] == 0:
        raise InputError("the reply produced no tokens after a prompt", "chosen")
    start, end = comp[0], comp[-1] + 1
    for n in range(end, min(end + 3, len(ids))):
        if ids[n] in eot_ids:
            end = n + 1
            break
    return list(ids[:end]), start


def _truncate(ids: list[int], start: int, keep_prompt: int, max_length: int):
    keep = min(start, keep_prompt)
    ids = ids[start - keep :][:max_length]
    return ids, keep


def encode_pairs(
    tokenizer, items, max_length: int | None = None, path: str = "pairs"
) -> list[EncodedPair]:
    """:class:`~flr_engine.evaluation.data.PairItem` list -> :class:`EncodedPair` list.

    Truncation to ``max_length`` tokens per sequence: the prompt keeps its last
    ``max(max_length - longest reply, max_length // 2)`` tokens, then replies are cut at the end.
    """
    from flr_engine.chat import end_of_turn_ids, require_chat_template

    require_chat_template(tokenizer)
    eot = end_of_turn_ids(tokenizer)
    out = []
    for it in items:
        try:
            c, cs = encode_reply(tokenizer, it.context, it.chosen, eot)
            r, rs = encode_reply(tokenizer, it.context, it.rejected, eot)
        except InputError as exc:
            raise RowError(path, it.line, exc.field, exc.message) from None
        truncated = False
        if max_length is not None and max(len(c), len(r)) > max_length:
            longest = max(len(c) - cs, len(r) - rs)
            keep_prompt = max(max_length - longest, max_length // 2)
            c, cs = _truncate(c, cs, keep_prompt, max_length)
            r, rs = _truncate(r, rs, keep_prompt, max_length)
            truncated = True
        out.append(EncodedPair(it.line, c, cs, r, rs, truncated))
    return out


def load_pairs(path: str):
    """(items, ties, rows) from a preference file (see the module docstring)."""
    from flr_engine.evaluation.data import read_set

    es = read_set(path, on_error="fail")
    if es.kind != "pairwise":
        raise InputError(f"{path}: looks like a {es.schema!r} file, not preference pairs")
    if not es.items:
        raise InputError(f"{path}: no usable pairs ({es.ties} ties / identical pairs skipped)")
    return es.items, es.ties, es.rows


def pairs_rows(pairs: list[EncodedPair]) -> list[dict]:
    """TRL's pre-tokenised preference rows: ``prompt_ids`` is the longest start that both
    sequences share and that ends at or before both completions, ``chosen_ids`` /
    ``rejected_ids`` the rest (the tokens TRL scores)."""
    rows = []
    for p in pairs:
        n = 0
        limit = min(p.chosen_start, p.rejected_start)
        while n < limit and p.chosen[n] == p.rejected[n]:
            n += 1
        if n == 0:
            raise ValueError(f"pair at line {p.line}: chosen and rejected share no prompt token")
        rows.append({"prompt_ids": p.chosen[:n], "chosen_ids": p.chosen[n:],
                     "rejected_ids": p.rejected[n:]})  # fmt: skip
    return rows


def pairs_dataset(pairs: list[EncodedPair], folder: str):
    """The rows of :func:`pairs_rows` as a ``datasets.Dataset`` stored in ``folder`` (written
    by the main process, read by every rank): TRL caches the precomputed reference log-probs
    next to a dataset's files, which an in-memory dataset would put in each process's own
    temporary folder."""
    from accelerate import PartialState
    from datasets import Dataset, load_from_disk

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:  # anew: a kill may have left torn files (a torn cache)
            shutil.rmtree(folder, ignore_errors=True)
            Dataset.from_list(pairs_rows(pairs)).save_to_disk(folder)
    return load_from_disk(folder)


# --------------------------------------------------------------------------------------
# the packed batch and the packed backbone
# --------------------------------------------------------------------------------------


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The token trie of a right-padded batch (S, L): ``flr_pack_ids``, ``_positions``,
    ``_subtree_end`` (T,) and ``flr_pack_node`` (S, L): the trie node of each token (0 on
    padding, which TRL's labels mask out)."""
    from flr_engine.engine.packer import pack_sequences

    lengths = attention_mask.sum(1)
    if not torch.equal(
        attention_mask.bool(), torch.arange(attention_mask.shape[1]) < lengths[:, None]
    ):
        raise ValueError("the packed forward needs right-padded rows (attention_mask 1...1 0...0)")
    lengths = lengths.tolist()
    seqs = [row[:n].tolist() for row, n in zip(input_ids, lengths)]
    res = pack_sequences(seqs, token_budget=max(sum(lengths), 1))
    pack = res.packs[0]  # the budget holds every token: one pack
    node = torch.zeros_like(input_ids, dtype=torch.long)
    for i, n in enumerate(lengths):
        node[i, :n] = res.nodes_of(i)
    return {"flr_pack_ids": pack.input_ids, "flr_pack_positions": pack.position_ids,
            "flr_pack_subtree_end": pack.subtree_end, "flr_pack_node": node}  # fmt: skip


class PackedPreferenceCollator:
    """TRL's ``DataCollatorForPreference`` output plus :func:`pack_batch` of it."""

    def __init__(self, **kwargs):
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self.inner = DataCollatorForPreference(**kwargs)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        return {**batch, **pack_batch(batch["input_ids"], batch["attention_mask"])}


def backbone_of(model):
    """The transformer body the causal LM's forward calls (``model.base_model``), under a
    peft wrapper too."""
    from flr_engine.engine.forward import base_model

    base = base_model(model)
    return base.base_model


def add_packed_backbone(model, attn_impl: str = "auto") -> None:
    """Patch ``model``'s backbone so that a call carrying the :data:`PACK_KEYS` runs the
    packed trie and returns its hidden states in the padded layout (S, L, H) -- or, given
    ``flr_pack_rows`` (M,), only those trie nodes, (1, M, H); any other call is the original
    forward. Idempotent. Call it before TRL wraps the model (peft keeps the backbone object)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from flr_engine.engine.attention import TreeContext, packed_forward, route_tree_attention

    body = backbone_of(model)
    if getattr(body.forward, "_flr_packed", False):
        return
    original = body.forward

    def forward(self, *args, flr_pack_ids=None, flr_pack_positions=None,
                flr_pack_subtree_end=None, flr_pack_node=None, flr_pack_rows=None, **kwargs):  # fmt: skip
        if flr_pack_node is None:
            return original(*args, **kwargs)
        if args:
            raise TypeError("the packed forward takes keyword arguments only")
        for k in ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "cache_position"):
            kwargs.pop(k, None)
        kwargs["use_cache"] = False
        route_tree_attention(self)  # once per model; a no-op when routed
        ctx = TreeContext(flr_pack_subtree_end, flr_pack_positions, impl=attn_impl)
        with packed_forward():
            out = original(input_ids=flr_pack_ids[None], position_ids=flr_pack_positions[None],
                           flr_tree=ctx, **kwargs)  # fmt: skip
        hidden = out.last_hidden_state[0]  # (T, H)
        if flr_pack_rows is not None:
            return BaseModelOutputWithPast(last_hidden_state=hidden[flr_pack_rows][None])
        return BaseModelOutputWithPast(last_hidden_state=hidden[flr_pack_node])  # (S, L, H)

    forward._flr_packed = True
    body.forward = types.MethodType(forward, body)


def add_packed_head(model) -> None:
    """Wrap the forward TRL's ``add_fused_lm_head`` gave ``model`` so that a packed call
    (``fused_lm_head=True`` with the :data:`PACK_KEYS` and ``labels``) scores only the trie
    nodes that predict a completion token: TRL's fused head runs on those M rows (passed as
    ``shift_labels``, one row each), and its per-token outputs are scattered back to the
    padded (S, L - 1) layout TRL's loss reads. Without it TRL's head would score every padded
    position on devices where it does not compact (the CPU). A call it does not handle (no
    pack, MoE router logits) goes to TRL's forward unchanged. Idempotent."""
    from trl.trainer.utils import FusedCausalLMOutput

    from flr_engine.engine.forward import base_model

    base = base_model(model)
    prev = base.forward
    if getattr(prev, "_flr_packed_head", False):
        return

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        node = kwargs.get("flr_pack_node")
        if (not fused_lm_head or node is None or labels is None or args
                or kwargs.get("output_router_logits") or "shift_labels" in kwargs):  # fmt: skip
            return prev(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        shifted = labels[:, 1:]
        mask = shifted != -100  # (S, L - 1): the positions TRL scores
        rows = node[:, :-1][mask]  # (M,) the trie node that predicts each scored token
        out = prev(fused_lm_head=True, shift_labels=shifted[mask][None], flr_pack_rows=rows,
                   **kwargs)  # fmt: skip
        fields = {}
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
            x = getattr(out, name)
            fields[name] = None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x[0])
        return FusedCausalLMOutput(loss=out.loss, label_mask=mask, aux_loss=out.aux_loss, **fields)

    forward._flr_packed_head = True
    base.forward = types.MethodType(forward, base)


def add_packed_forward(model, attn_impl: str = "auto") -> None:
    """:func:`add_packed_backbone`, and :func:`add_packed_head` once TRL's fused head is on
    ``model``."""
    from flr_engine.engine.forward import base_model

    add_packed_backbone(model, attn_impl)
    fwd = getattr(base_model(model).forward, "__func__", None)
    if getattr(getattr(fwd, "__code__", None), "co_name", "") == "_fused_forward":  # TRL's
        add_packed_head(model)


# --------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------


@functools.cache
def _trainer_class():
    from trl import DPOTrainer

    class FLRDPOTrainer(DPOTrainer):
        """``trl.DPOTrainer`` with the engine's packed forward (see :mod:`flr_engine.dpo`).
        The same arguments; ``model`` must be a causal LM instance; ``train_dataset`` rows
        either TRL's (text or conversational, tokenised by TRL) or pre-tokenised
        (``prompt_ids``, ``chosen_ids``, ``rejected_ids``: :func:`pairs_dataset`).
        ``attn_impl``: the tree attention ("auto": the differentiable torch path when
        training, Triton for a no-grad forward on CUDA)."""

        def __init__(self, model, ref_model=None, args=None, data_collator=None,
                     train_dataset=None, eval_dataset=None, processing_class=None,
                     attn_impl: str = "auto", **kwargs):  # fmt: skip
            if isinstance(model, str):
                raise TypeError("FLRDPOTrainer needs a model instance (load it first)")
            if args is None or processing_class is None:
                raise ValueError("FLRDPOTrainer needs args (a trl.DPOConfig) and processing_class")
            add_packed_backbone(model, attn_impl)
            if ref_model is not None:
                add_packed_backbone(ref_model, attn_impl)
            self._flr_attn_impl = attn_impl
            if data_collator is None:
                tok = getattr(processing_class, "tokenizer", processing_class)
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                data_collator = PackedPreferenceCollator(
                    pad_token_id=tok.pad_token_id, max_length=args.max_length,
                    truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of,
                )  # fmt: skip
            super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, **kwargs)  # fmt: skip

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            first = next(iter(dataset))
            if "prompt_ids" in first and "prompt" not in first:  # pre-tokenised: TRL's columns
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _packed_models(self) -> None:
            # after TRL's fused head is on (it is added late in DPOTrainer.__init__, before the
            # reference precompute); a reference model TRL built itself is packed too
            for m in (self.model, self.ref_model):
                if m is not None:
                    add_packed_forward(self.accelerator.unwrap_model(m), self._flr_attn_impl)

        def compute_ref_log_probs(self, model, inputs):
            self._packed_models()
            return super().compute_ref_log_probs(model, inputs)

        def _compute_loss(self, model, inputs, return_outputs):
            self._packed_models()
            return super()._compute_loss(model, inputs, return_outputs)

    FLRDPOTrainer.__module__, FLRDPOTrainer.__qualname__ = __name__, "FLRDPOTrainer"
    return FLRDPOTrainer


def __getattr__(name: str):
    if name == "FLRDPOTrainer":  # built on first use: importing this module does not import TRL
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------
# a run: pairs in, a trained plain transformers folder out
# --------------------------------------------------------------------------------------


@dataclass
class DPORun:
    out_dir: str
    steps: int
    start_step: int
    pairs: int
    skipped_ties: int
    truncated: int
    seconds: float
    last: dict = field(default_factory=dict)


PAIRS_FOLDER = "flr_dpo_pairs"  # the pre-tokenised rows and TRL's cached reference log-probs


def last_checkpoint(out_dir: str) -> str | None:
    """The newest finished ``checkpoint-N`` of ``out_dir``: transformers writes its
    ``trainer_state.json`` last, so a checkpoint a kill interrupted has none (or a torn one)
    and is passed over."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        head, _, step = name.partition("-")
        state = os.path.join(out_dir, name, "trainer_state.json")
        if head == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isfile(state):
            try:
                with open(state, encoding="utf-8") as fh:
                    json.load(fh)
            except ValueError:
                continue
            found.append((int(step), os.path.join(out_dir, name)))
    return max(found)[1] if found else None


RUN_FILE = "flr_dpo_run.json"  # what the run computes: a resume must compute the same
# trl.DPOConfig fields that change the result (logging, saving, paths may change on a resume)
RESULT_FIELDS = (
    "beta", "loss_type", "loss_weights", "label_smoothing", "ld_alpha", "f_divergence_type",
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay",
    "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "seed", "data_seed", "max_length", "truncation_mode", "bf16", "fp16",
    "precompute_ref_log_probs", "world_size",
)  # fmt: skip


def run_identity(args, pairs: list[EncodedPair], settings: dict | None = None) -> dict:
    """The settings and data a resumed run must share with the first: the result fields of
    ``args``, the caller's ``settings`` (model, LoRA, ...) and a hash of the tokenised pairs."""
    rows = json.dumps(pairs_rows(pairs)).encode()
    training = {k: getattr(args, k, None) for k in RESULT_FIELDS}
    return json.loads(json.dumps({
        "pairs_sha256": hashlib.sha256(rows).hexdigest(), "settings": settings or {},
        "training": training,
    }, default=str))  # fmt: skip


def _check_out(out_dir: str, resume: str | None, overwrite: bool, identity: dict) -> str | None:
    """(main process) Refuse to train over an earlier run unless resumed with the same
    identity (:func:`run_identity`) or overwritten; return the checkpoint to resume from."""
    run_file = os.path.join(out_dir, RUN_FILE)
    earlier = last_checkpoint(out_dir) or any(
        os.path.exists(os.path.join(out_dir, name)) for name in (PAIRS_FOLDER, RUN_FILE)
    )
    if overwrite:
        for name in os.listdir(out_dir):
            if name.startswith("checkpoint-") or name == PAIRS_FOLDER:
                shutil.rmtree(os.path.join(out_dir, name))
    elif earlier and resume is None:
        raise ConfigError(
            f"{out_dir} already holds a DPO run: pass --resume_from_checkpoint last to "
            "continue it or --overwrite to start over"
        )
    elif earlier and os.path.exists(run_file):
        with open(run_file, encoding="utf-8") as fh:
            old = json.load(fh)
        diff = [f"{k}: {old[g].get(k)!r} -> {identity[g].get(k)!r}"
                for g in ("settings", "training") for k in identity[g]
                if old.get(g, {}).get(k) != identity[g][k]]  # fmt: skip
        if old.get("pairs_sha256") != identity["pairs_sha256"]:
            diff.insert(0, "the pairs (or their tokenisation) changed")
        if diff:
            raise ConfigError(f"{out_dir} was trained with other settings ({'; '.join(diff)}); "
                              "cannot resume (--overwrite starts over)")  # fmt: skip
    atomic_write_text(run_file, json.dumps(identity, indent=1, sort_keys=True))
    return None if overwrite else _resume_point(out_dir, resume)


def _resume_point(out_dir: str, resume: str | None) -> str | None:
    """``resume``: a checkpoint folder, or "last" / "true": the newest finished one in
    ``out_dir`` (none yet: a fresh start)."""
    if resume is None:
        return None
    if str(resume).lower() in ("last", "true"):
        return last_checkpoint(out_dir)
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise MissingFileError(f"{resume}: not a finished checkpoint (no trainer_state.json)")
    return resume


def run_dpo(
    model,
    tokenizer,
    pairs: list[EncodedPair],
    args,
    *,
    peft_config=None,
    resume: str | None = None,
    overwrite: bool = False,
    skipped_ties: int = 0,
    settings: dict | None = None,
    callbacks=None,
) -> DPORun:
    """Train ``model`` with :class:`FLRDPOTrainer` on ``pairs`` under ``args`` (a
    ``trl.DPOConfig``; ``args.output_dir`` is the run folder) and save the final model (LoRA
    merged) and tokenizer there as a plain transformers folder. ``resume``: a checkpoint
    folder or "last"; a folder that holds a run is refused unless resumed with the same
    settings (``args``' result fields, ``settings``, the pairs: :func:`run_identity`) or
    ``overwrite``. One run per folder: a second is refused while one holds it."""
    from accelerate import PartialState

    out = args.output_dir
    # the TrainingArguments' process state (its use_cpu decides gloo on CPUs)
    state = getattr(args, "distributed_state", None) or PartialState()
    lock, ckpt = None, None
    with state.main_process_first():  # the main process checks and clears the folder first
        if state.is_main_process:
            claim_output_folder(out, "flr dpo", "--output_dir", earlier=(RUN_FILE,))
            lock = lock_exclusive(os.path.join(os.path.realpath(out), "run"), what=out)
            ckpt = _check_out(out, resume, overwrite, run_identity(args, pairs, settings))
        elif not overwrite:
            ckpt = _resume_point(out, resume)
    try:
        t0 = time.time()
        start = 0
        if ckpt:
            with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as fh:
                start = json.load(fh)["global_step"]
            log.info("resuming from %s (step %d)", ckpt, start)
        trainer = _trainer_class()(
            model, args=args, train_dataset=pairs_dataset(pairs, os.path.join(out, PAIRS_FOLDER)),
            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=ckpt)
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            final = trainer.accelerator.unwrap_model(trainer.model)
            if peft_config is not None:
                final = final.merge_and_unload()
            final.save_pretrained(out)
            tokenizer.save_pretrained(out)
        trainer.accelerator.wait_for_everyone()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        return DPORun(
            out_dir=out, steps=trainer.state.global_step, start_step=start, pairs=len(pairs),
            skipped_ties=skipped_ties, truncated=sum(p.truncated for p in pairs),
            seconds=time.time() - t0, last=logged[-1] if logged else {},
        )  # fmt: skip
    finally:
        if lock is not None:
            lock.close()
