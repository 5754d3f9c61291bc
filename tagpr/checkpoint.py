"""Checkpoints: atomic, exact, sharded under FSDP; and the final Hugging Face export.

A checkpoint is a folder `step_{step:08d}` holding
- the trained parameters and their optimizer state through torch.distributed.checkpoint
  (each rank writes its own shards under FSDP2; a single process writes everything).
  Frozen parameters (the layers below `--train-layers`, a LoRA run's whole base model) are
  not written: a resumed run reads them again from the model it starts from, as it did
  the first time;
- `rng_rank{r}.pt`: every RNG the run uses (python, numpy, torch CPU, CUDA), per rank,
- `trainer_state.json`: step, data position and whatever the trainer needs to go on,
- `config.json`: the resolved config.
It is written as `step_….tmp` and renamed once every rank is done, so a run killed at
any moment leaves the previous checkpoint intact; `latest()` ignores `.tmp` folders.
The LR schedule is a pure function of the step, so restoring the step restores it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from . import dist, lora
from .config import ConfigError
from .files import read_json, write_json

_STEP = re.compile(r"^step_(\d{8})$")
PARTIAL = StateDictOptions(strict=False)  # frozen parameters come from the start model: absent from a checkpoint
# one process saving without a process group is intended here, not a mistake
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest(ckpt_dir: str | os.PathLike) -> Path | None:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    done = [p for p in d.iterdir() if _STEP.match(p.name) and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(_STEP.match(p.name).group(1))) if done else None


def save(
    ckpt_dir: str | os.PathLike, step: int, model, optimizer, trainer_state: dict, config: dict, keep: int = 2
) -> Path:
    d = dist.get()
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f"step_{step:08d}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    msd = _trained_only(model, msd)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if d.is_main:
        write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "world_size": d.world_size})
        write_json(tmp / "config.json", config)
    dist.barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        done = sorted((p for p in ckpt_dir.iterdir() if _STEP.match(p.name)), key=lambda p: p.name)
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _trained_only(model, msd: dict) -> dict:
    """`msd` without frozen parameters, under any of their names (a tied lm_head is the frozen embedding again)."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in msd.items() if k not in frozen}


def load(path: str | os.PathLike, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNGs; return the trainer state."""
    path = Path(path)
    msd, osd = get_state_dict(model, optimizer)  # also materialises optimizer state to load into
    state = {"model": _trained_only(model, msd), "optim": osd}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in state["model"] if f"model.{k}" not in saved]
    if missing:  # the run trains parameters this checkpoint never trained (e.g. another --train-layers)
        raise ConfigError(
            f"{path}: this checkpoint has no {missing[0]} ({len(missing)} trained tensors missing): it was written "
            "with other --train-layers / --lora-* flags; resume with those, or start afresh with --resume ''"
        )
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=PARTIAL)
    trainer_state = read_json(path / "trainer_state.json")
    rng = path / f"rng_rank{dist.get().rank}.pt"
    if trainer_state.get("world_size") == dist.get().world_size and rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    else:
        dist.print0(f"note: {path} was written by {trainer_state.get('world_size')} rank(s); RNG states not restored")
    return trainer_state


def write_hf_folder(sd: dict, hf_model, tokenizer, folder: Path) -> None:
    """safetensors weights (tied lm_head left out; from_pretrained re-ties it), config,
    generation config when the model has one, tokenizer and chat template."""

    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    if getattr(hf_model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_model.config.save_pretrained(folder)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def full_state_dict(model) -> dict:
    """The whole model's state on CPU (a collective under FSDP: every rank calls it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(model, lm, tokenizer, out_dir: str | os.PathLike) -> Path | None:
    """Write a folder plain `transformers.from_pretrained` loads: safetensors, config, generation
    config, tokenizer and its chat template. `model` is what was trained (FSDP or not, maybe a
    wrapper around `lm`); `lm` is the transformers model inside it. Returns the path on rank 0."""
    sd = full_state_dict(model)
    if not dist.get().is_main:
        dist.barrier()
        return None
    prefix = "lm." if any(k.startswith("lm.") for k in sd) else ""
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.endswith(".lora_A") for k in sd):  # LoRA: the adapters folded into the weights they adapt
        sd = lora.merged_state_dict(sd, lora.scalings(lm))
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_folder(sd, lm, tokenizer, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    dist.barrier()
    return out
