"""Loading from the Hugging Face hub for the hub-backed task configs (glue_*, lm_gsm8k, a hub name given to
text_file / lm_file), and the helpers every task shares when it loads with transformers/datasets.

The libraries themselves retry an unreachable hub for half a minute per file and then fail with pages of
traceback; here an unreachable hub fails at once, before any work, in one ``AssetError`` line that says
what the task needs and which offline task to use instead. A local model directory (``local_dir``) never
goes through the hub.

``ModelOptions`` is the top-level ``model`` node (``model.quantize``, ``model.gradient_checkpointing``);
``Loading`` adds the run's device and turns it into ``from_pretrained`` arguments (bitsandbytes
quantization with the task head kept un-quantized), gradient checkpointing and the ``task_info`` fields
(``weight_storage``: parameter bytes as stored and in float32).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from experiments.assets import AssetError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_switch() -> str | None:
    """The environment variable that puts the Hugging Face libraries offline, if one does."""
    for var in OFFLINE_VARIABLES:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (``timeout`` seconds at most), or None."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or type(e).__name__}"
    return None


@dataclass
class Hub:
    """Loads from the hub; any failure becomes one AssetError line naming what is needed."""

    names: list[str]  # what the task needs from the hub, for the message
    instead: str  # the offline alternative, for the message, e.g. "task=lm"
    local_only: bool  # an offline switch is set: only the local Hugging Face cache is tried

    @classmethod
    def connect(cls, names: list[str], instead: str) -> Hub:
        """With no offline switch and no connection, fail at once."""
        switch = offline_switch()
        why = None if switch else unreachable()
        hub = cls(names, instead, local_only=switch is not None)
        if why:
            raise AssetError(f"{hub._needs()}, which is unreachable here ({why}): run with internet "
                             f"(or set HF_HUB_OFFLINE=1 to use a local cache), or use {instead} offline")
        return hub

    def load(self, fn):
        """``fn()``, which loads with ``local_files_only=self.local_only`` where the loader takes it."""
        try:
            return fn()
        except (OSError, ValueError) as e:  # ConnectionError, OfflineModeIsEnabled, a missing repo or file
            if self.local_only:
                raise AssetError(f"{self._needs()}, which is unreachable here ({offline_switch()}=1) and not "
                                 f"in the local cache: run with internet, or use {self.instead} offline") from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AssetError(f"{self._needs()}; loading failed: {first}") from None

    def _needs(self) -> str:
        return f"this task needs {' and '.join(self.names)} from the Hugging Face hub"


@contextlib.contextmanager
def quiet():
    """Silence transformers' and datasets' logs and progress bars (load reports, "Loading weights" and
    Map/Saving bars) in every run's output; the previous settings are restored."""
    from datasets.utils import logging as dlog
    from transformers.utils import logging as tlog

    verbosity, t_bar, d_bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if t_bar:
            tlog.enable_progress_bar()
        if d_bar:
            dlog.enable_progress_bar()


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's content (vocabulary, normaliser, special tokens), not its path: a cache key for
    tokenised data. Truncation and padding settings are left out: each call with ``max_length`` rewrites
    them on the backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        blob = json.dumps(spec, sort_keys=True)
    else:
        blob = f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}"
    extra = f"{tokenizer.padding_side}|{tokenizer.model_input_names}|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(f"{blob}|{extra}".encode()).hexdigest()[:32]


# --- local models, and how a pretrained model is loaded (the top-level ``model`` node) --------------

def local_dir(name: str) -> Path | None:
    """The directory ``name`` points to when it is one (a model saved with ``save_pretrained``), else None.
    A local directory loads with ``local_files_only=True`` and never touches the hub."""
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() else None


def looks_like_path(name: str) -> bool:
    """A name written as a path (``/abs``, ``./rel``, ``~/x``, ``C:\\x``) rather than a hub repo id."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.sep != "/" and os.sep in name

def local_or_hub(model: str, hub: Hub | None, load, builtin: tuple[str, Callable[[], object]],
                 error: type[Exception] = ValueError):
    """``load(path_or_name, local_files_only)`` for the task's built-in offline model (``builtin``: its name
    and a function giving its path), a local directory (no hub access at all) or a hub name (through
    ``hub``); a directory that does not load, or a path that is no directory, is one ``error`` line."""
    name, path_of = builtin
    if model == name:
        return load(str(path_of()), True)
    path = local_dir(model)
    if path is not None:
        try:
            return load(str(path), True)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise error(f"invalid option task.model={model!r}: the directory does not load: {first}") from None
    if hub is None or looks_like_path(model):
        raise error(f"invalid option task.model={model!r}: no such directory (expected {name}, a directory "
                    "saved with save_pretrained, or a Hugging Face hub name)")
    return hub.load(lambda: load(model, hub.local_only))


QUANTIZE = ("none", "int8", "nf4", "fp4")


def _once(record: logging.LogRecord, _seen: set = set()) -> bool:  # noqa: B006 - the set is the memory
    """A logging filter that lets each message through once."""
    message = record.getMessage()
    if message in _seen:
        return False
    _seen.add(message)
    return True


@dataclass
class ModelOptions:
    """The top-level ``model`` node (``model.quantize=nf4``): how a task that loads a pretrained
    transformers model loads its frozen base. ``experiments/schema.py`` makes it the ``schema/model`` node."""

    quantize: str = "none"  # none | int8 (LLM.int8) | nf4 (QLoRA's 4-bit NormalFloat) | fp4 (bitsandbytes)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, slower)

    def validate(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ValueError(f"invalid option model.quantize={self.quantize!r}: expected one of {', '.join(QUANTIZE)}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"invalid option model.gradient_checkpointing={self.gradient_checkpointing!r}: "
                             "expected true or false")
        if self.quantize != "none":
            import importlib.util

            for package in ("bitsandbytes", "accelerate"):
                if importlib.util.find_spec(package) is None:
                    raise ValueError(f"invalid option model.quantize={self.quantize}: needs the {package} package "
                                     f"(pip install {package})")

    @property
    def default(self) -> bool:
        return self == ModelOptions()


@dataclass
class Loading(ModelOptions):
    """``ModelOptions`` plus the run's device: what the entry point passes to a builder's keyword-only
    ``loading`` parameter. A quantized model is loaded straight onto that device (bitsandbytes quantizes while
    loading); an unquantized one on the CPU, as before (the trainer moves it)."""

    device: str = "cpu"

    @property
    def compute_dtype(self):
        import torch

        if torch.device(self.device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    def from_pretrained_kwargs(self, head: tuple[str, ...] | list[str] = ()) -> dict:
        """``quantization_config`` and ``device_map`` for ``from_pretrained`` ({} unquantized). ``head``: the
        task head's module names, kept un-quantized. transformers' own default keeps only the output embedding
        (``lm_head``) and the last module, and any explicit skip list replaces that default, so the head is
        always named here: a new classifier must train, and a 4-bit one could not."""
        if self.quantize == "none":
            return {}
        import torch
        from transformers import BitsAndBytesConfig

        skip = list(dict.fromkeys([*head, "lm_head"]))
        if self.quantize == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
            # on a CPU every int8 matmul logs that it casts its float32 input to float16: once is enough
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_once)
        else:  # nf4 with double quantization as in QLoRA (Dettmers et al. 2023); fp4 as bitsandbytes' default
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quantize,
                                        bnb_4bit_use_double_quant=self.quantize == "nf4",
                                        bnb_4bit_compute_dtype=self.compute_dtype, llm_int8_skip_modules=skip)
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return {"quantization_config": config, "device_map": {"": str(device)}}

    def prepare(self, model):
        """Gradient checkpointing (``use_reentrant=False``), with the input embeddings' output requiring grad
        so that gradients reach adapters behind frozen layers; and 4-bit layers kept in the layout they train
        in. Returns the model.

        bitsandbytes (0.50) repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first forward pass
        without gradients (an evaluation: the lm tasks score the untouched base before training), and from
        then on multiplies through a kernel that is not differentiable in its input, so adapters below a
        layer would stop getting gradients through it. The repacking is switched off here."""
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        if not self.gradient_checkpointing:
            return model
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"invalid option model.gradient_checkpointing=true: {type(model).__name__} does not "
                             "support gradient checkpointing")
        kwargs = {"use_reentrant": False}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it activation_checkpointing_enable
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not getattr(model, "_require_grads_hooks", None):  # transformers >= 4.35 already did it for text
            model.enable_input_require_grads()
        return model

    def info(self, model) -> dict:
        """What the record's ``task_info`` says about the loaded base (see ``weight_storage``)."""
        out = {"quantize": self.quantize, "gradient_checkpointing": self.gradient_checkpointing}
        if self.quantize != "none":
            out["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
            if self.quantize != "int8":
                out["double_quant"] = self.quantize == "nf4"
        return {**out, **weight_storage(model)}


def weight_storage(model) -> dict:
    """The parameters' storage: ``params`` (weights, a 4-bit one counted as the values it packs),
    ``weight_bytes`` (bytes as stored: a bitsandbytes 4-bit parameter packs two weights per byte, an int8
    one takes one byte each), ``weight_bytes_fp32`` (the same weights in float32), ``quant_state_bytes`` (the
    quantization constants kept beside them: 4-bit absmax (double-quantized: 8-bit absmax plus their
    float32 scales) and code book, int8 row scales) and ``quantized_modules`` (bitsandbytes Linear layers)."""
    import math

    params = stored = state = quantized = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n = math.prod(qs.shape) if qs is not None else p.numel()
        params += n
        stored += p.numel() * p.element_size()
        if qs is not None:
            for t in (qs.absmax, qs.code, *((qs.state2.absmax, qs.state2.code) if qs.nested else ())):
                state += t.numel() * t.element_size()
        scb = getattr(p, "SCB", None)
        if scb is not None:
            state += scb.numel() * scb.element_size()
    for m in model.modules():
        quantized += type(m).__name__ in ("Linear4bit", "Linear8bitLt")
    return {"params": params, "weight_bytes": stored, "weight_bytes_fp32": 4 * params, "quant_state_bytes": state,
            "quantized_modules": quantized}


def model_fingerprint(model, skip: tuple[str, ...] = ()) -> str:
    """A content hash of the weights (per-tensor sums in float64): cheap, and changes with any checkpoint.
    ``skip``: module names left out (a new head, whose random init is no part of the checkpoint)."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not torch.is_tensor(t) or any(part in skip for part in name.split(".")):
                continue
            t = t.double()
            h.update(f"{name}{tuple(t.shape)}{t.sum().item():.17g}{t.abs().sum().item():.17g}".encode())
    return h.hexdigest()[:16]
