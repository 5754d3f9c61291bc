"""PRMU: the Personalization Reward Model with User embeddings (TagPR §3.3, Eqs. 2–3).

    r(u, x, y) = score( backbone( [e_u ; embed(chat(x, y))] )[last real token] )    reward = σ(r)   (Eq. 3)

- backbone: a transformers sequence-classification model with one output — from a reward
  model (e.g. Skywork-Reward-V2-Qwen3-0.6B) or any causal LM with a fresh score head;
- e_u: a learnable row of a user-embedding table of the backbone's hidden size, fed as a
  prefix soft token in front of the input embeddings; row 0 is the unknown user (also
  any missing user id). `use_user_embeddings=False` drops the prefix: the paper's
  "PRMU w/o UE" ablation;
- input: the prompt (query + profile) as the user turn and the response as the
  assistant turn, rendered by the backbone's own chat template (Skywork-Reward-V2's format;
  a Qwen3 template puts the response's `<think>…</think>` in its reasoning slot);
- the score is read at the last non-pad token (right padding, the prefix counted).
Trained with the Bradley–Terry loss (Eq. 2) in `train_prmu.py`.

Over-long inputs: the prompt is cut from its left, which is where the profile starts
(the question and the instruction sit at its end); if the response alone does not fit,
its beginning is cut too so the final answer stays. An empty response is scored as is.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .checkpoint import write_hf_folder
from .models import TINY, load_tokenizer, model_config, resolve_model_path
from .prompts import without_profile
from .tokenizer import finish_tokenizer

UNKNOWN = 0


# ----------------------------------------------------------------------------- model


class PRMU(nn.Module):
    def __init__(self, backbone, n_users: int, use_user_embeddings: bool = True):
        super().__init__()
        self.backbone = backbone
        self.use_user_embeddings = use_user_embeddings
        hidden = backbone.config.hidden_size
        self.user_embeddings = nn.Embedding(n_users + 1, hidden)  # row 0: unknown user
        std = getattr(backbone.config, "initializer_range", 0.02)
        nn.init.normal_(self.user_embeddings.weight, std=std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, user_rows: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, T) right-padded; user_rows (B,) → logits r (B,)."""
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, H)
        if self.use_user_embeddings:
            prefix = self.user_embeddings(user_rows).unsqueeze(1).to(embeds.dtype)  # (B, 1, H)
            embeds = torch.cat([prefix, embeds], dim=1)  # (B, 1 + T, H)
            attention_mask = torch.cat([attention_mask.new_ones(len(user_rows), 1), attention_mask], dim=1)
        base = getattr(self.backbone, self.backbone.base_model_prefix)
        hidden = base(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(1) - 1  # (B,) last real token
        pooled = hidden[torch.arange(len(last), device=hidden.device), last]  # (B, H)
        return self.backbone.score(pooled).squeeze(-1).float()  # (B,)


def load_backbone(name: str | os.PathLike, seed: int = 0):
    """A sequence-classification backbone (one output) and its tokenizer: from a reward-model
    or causal-LM folder, `smollm2-135m` or `tiny` (a fresh score head where there was none)."""

    path = resolve_model_path(name)
    tok = load_tokenizer(name)
    if path == TINY:
        cfg = model_config(path, tok)
        cfg.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, local_files_only=True, trust_remote_code=False
        )
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


class Encoder:
    """(prompt, response) → token ids: the backbone's own chat template renders the conversation (user turn, then
    assistant turn), so a template that reshapes a reply (Qwen3's moves `<think>…</think>` into its reasoning slot)
    sees the real response; over-long inputs are cut (module docstring) and rendered again."""

    def __init__(self, tok, max_len: int):
        self.tok, self.max_len = tok, max_len

    def render(self, prompt: str, response: str) -> list[int]:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, prompt: str, response: str) -> list[int]:
        ids = self.render(prompt, response)
        if len(ids) <= self.max_len:
            return ids
        ids_of = lambda text: self.tok(text, add_special_tokens=False)["input_ids"]
        p, r = ids_of(prompt), ids_of(response)
        room = self.max_len - (len(ids) - len(p) - len(r))  # what the template leaves
        if room <= 0:
            raise ValueError(
                f"max_len {self.max_len} leaves no room for the chat template ({len(ids) - len(p) - len(r)} tokens)"
            )
        r = r[-room:] if len(r) > room else r  # keep the end of the response (its answer)
        p = p[len(p) - (room - len(r)) :] if len(p) + len(r) > room else p  # cut the prompt from the left
        while True:  # decoding a cut and encoding it again can merge tokens differently: cut on until it fits
            ids = self.render(self.tok.decode(p), self.tok.decode(r))
            over = len(ids) - self.max_len
            if over <= 0:
                return ids
            if len(p) >= over:
                p = p[over:]
            else:
                r, p = r[over - len(p) :], []


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def user_map(user_ids: Sequence[str]) -> dict[str, int]:
    """Rows 1..n for the distinct known user ids (sorted, so the map is reproducible); 0 is unknown."""
    return {u: i + 1 for i, u in enumerate(sorted({u for u in user_ids if u}))}


# ----------------------------------------------------------------------------- saved model and scoring


def save(
    model: PRMU,
    tok,
    users: dict[str, int],
    out_dir: str | os.PathLike,
    full_state: dict | None = None,
    max_len: int = 2048,
    profile_in_input: bool = True,
) -> Path:
    """`<out>/backbone` (a transformers folder), `user_embeddings.safetensors`, `users.json`, `prmu.json` (with the
    input length `max_len` the model was trained at and whether its input held the prompt's profile, which the
    `Scorer` then follows)."""

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = full_state if full_state is not None else model.state_dict()
    backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    write_hf_folder(backbone, model.backbone, tok, tmp / "backbone")
    save_file(
        {"weight": sd["user_embeddings.weight"].detach().contiguous().clone()}, str(tmp / "user_embeddings.safetensors")
    )
    (tmp / "users.json").write_text(json.dumps(users, indent=1))
    (tmp / "prmu.json").write_text(
        json.dumps(
            {
                "use_user_embeddings": model.use_user_embeddings,
                "n_users": len(users),
                "max_len": max_len,
                "profile_in_input": profile_in_input,
            }
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


class Scorer:
    """The scoring API for RL: `score(user_ids, prompts, responses) → σ(r)` per response.

    Inputs are encoded as in training: at the `max_len` saved in the export (`max_len` here overrides it; an
    export from before it was saved is read at 2048, the trainer's default then), and without the prompts' profile
    items where the model was trained without them (`train_prmu.py --no-profile-in-input`)."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        max_len: int | None = None,
        batch_size: int = 8,
    ):

        path = Path(path)
        for f in ("backbone/config.json", "user_embeddings.safetensors", "users.json", "prmu.json"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path / f}: missing; train the reward model with `python train_prmu.py`")

        self.tok = finish_tokenizer(AutoTokenizer.from_pretrained(path / "backbone", local_files_only=True))
        backbone = AutoModelForSequenceClassification.from_pretrained(
            path / "backbone", local_files_only=True, dtype=torch.float32
        )
        meta = json.loads((path / "prmu.json").read_text())
        self.users = json.loads((path / "users.json").read_text())
        self.model = PRMU(backbone, meta["n_users"], meta["use_user_embeddings"])
        self.model.user_embeddings.weight.data.copy_(load_file(str(path / "user_embeddings.safetensors"))["weight"])
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.max_len = max_len or meta.get("max_len", 2048)
        self.profile_in_input = meta.get("profile_in_input", True)
        self.encode = Encoder(self.tok, self.max_len)
        self.batch_size = batch_size

    def rows(self, user_ids: Sequence[str | None]) -> list[int]:
        return [self.users.get(u, UNKNOWN) if u else UNKNOWN for u in user_ids]

    @torch.no_grad()
    def logits(self, user_ids, prompts, responses) -> torch.Tensor:
        if not (len(user_ids) == len(prompts) == len(responses)):
            raise ValueError("user_ids, prompts and responses must have the same length")
        rows = self.rows(user_ids)
        if not self.profile_in_input:
            prompts = [without_profile(p) for p in prompts]
        out = []
        for a in range(0, len(prompts), self.batch_size):
            seqs = [
                self.encode(p, r) for p, r in zip(prompts[a : a + self.batch_size], responses[a : a + self.batch_size])
            ]
            ids, mask = pad_right(seqs, self.tok.pad_token_id, self.device)
            out.append(self.model(ids, mask, torch.tensor(rows[a : a + self.batch_size], device=self.device)))
        return torch.cat(out).cpu() if out else torch.zeros(0)

    def score(self, user_ids, prompts, responses) -> torch.Tensor:
        """σ(r) in (0, 1) per response (Eq. 3)."""
        return torch.sigmoid(self.logits(user_ids, prompts, responses))
