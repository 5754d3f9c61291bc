"""LLM backends for the data pipeline: one interface, chosen per role (teacher, judge, tagger, embedder).

    spec                      backend
    openai:MODEL@BASE_URL     any OpenAI-compatible server: `/chat/completions`, `/embeddings`
                              (a vLLM server for Qwen3-235B, a hosted API for GPT-4o)
    hf:NAME                   a local transformers model (`tiny`, `smollm2-135m` or a folder) through
                              our KV-cache sampler, batched; embeddings = mean-pooled last hidden states
    simulated                 the simulated expert (`tagpr.expert`): synthetic users only
    hashing                   (embedder only) a lexical embedding: hashed words + character trigrams

Every backend answers `chat(requests)` with one `Reply` per request, in order, and
`embed(texts)` with unit vectors. A failed request is a `Reply` with `error` set, never
an exception, so one bad record cannot stop a 96,000-call run; it is not cached, so a
rerun asks again.

A reply that continues a partial assistant message (R2P) is stored as its continuation whatever the
server's convention (`continuation`: vLLM returns only the new text, llama.cpp the prefix too).

`openai`: bounded concurrency (a thread pool), retries with exponential backoff and
jitter on 429 / 5xx / timeouts / connection errors / malformed replies (honouring
`Retry-After`), the key read from an environment variable and never logged or cached.
Every successful reply is appended to an on-disk cache keyed by a hash of the request
(model, messages, sampling settings, sample index), so a rerun resumes without asking
again. The cache is an append-only JSONL file per role; a torn last line (a kill in
mid-write) is ignored on load. Each request also carries an `X-TagPR-Meta` header
(role and record id; no secrets) that servers ignore and the tests' scripted server reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .models import load_model
from .sampler import generate


class LLMError(RuntimeError):
    pass


@dataclass
class Request:
    messages: list[dict]  # [{"role": "user", "content": ...}, ...]
    meta: dict = field(default_factory=dict)  # {"role", "id", ...}: routing and the simulated expert; not sent as body
    temperature: float = 0.0
    max_tokens: int = 1024
    sample: int = 0  # the k-th of K samples of one prompt: part of the cache key and the seed
    prefix: str = ""  # the assistant's reply so far: generation continues it (R2P intervention)

    def key(self, model: str) -> str:
        body = json.dumps(
            [model, self.messages, self.temperature, self.max_tokens, self.sample, self.prefix], sort_keys=True
        )
        return hashlib.sha256(body.encode()).hexdigest()

    @property
    def seed(self) -> int:
        return zlib.crc32(json.dumps([self.messages, self.sample, self.prefix]).encode())


@dataclass
class Reply:
    text: str = ""
    error: str = ""  # non-empty: the request failed after all retries
    cached: bool = False
    finished: bool = True  # the model stopped by itself (False: it hit max_tokens)


class Cache:
    """Append-only JSONL of {"key", "text", "finished"}; loaded once, appended under a lock."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.data: dict[str, tuple[str, bool]] = {}
        self.lock = threading.Lock()
        if self.path and self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self.data[row["key"]] = (row["text"], bool(row.get("finished", True)))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a torn last line from a killed run: that request is asked again

    def get(self, key: str) -> tuple[str, bool] | None:
        return self.data.get(key)

    def put(self, key: str, text: str, finished: bool = True) -> None:
        with self.lock:
            self.data[key] = (text, finished)
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "text": text, "finished": finished}, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())


class Backend:
    name = "backend"
    model_id = ""  # part of every cache key: replies of different models never mix
    cache: Cache | None = None

    def __init__(self):
        self.requests = 0  # requests actually sent (not answered from the cache)
        self.cache_hits = 0
        self.failures = 0

    def describe(self) -> str:
        return self.name

    chunk = 256  # requests per `_chat` call: replies are cached after each, so a killed run loses one chunk

    def chat(self, requests: Sequence[Request], progress: str | None = None) -> list[Reply]:
        """Replies in order; cached ones first, the rest through `_chat` in chunks (each cached when done)."""
        replies: list[Reply | None] = [None] * len(requests)
        todo = []
        for i, r in enumerate(requests):
            hit = self.cache.get(r.key(self.model_id)) if self.cache else None
            if hit is not None:
                replies[i] = Reply(hit[0], cached=True, finished=hit[1])
                self.cache_hits += 1
            else:
                todo.append(i)
        # longest prompts first: batches of similar length pad less, and the slow ones show early
        todo.sort(key=lambda i: -len(json.dumps(requests[i].messages)) - len(requests[i].prefix))
        with _bar(len(todo), progress) as bar:
            for a in range(0, len(todo), self.chunk):
                part = todo[a : a + self.chunk]
                for i, rep in zip(part, self._chat([requests[i] for i in part])):
                    replies[i] = rep
                    if rep.error:
                        self.failures += 1
                    elif self.cache:
                        self.cache.put(requests[i].key(self.model_id), rep.text, rep.finished)
                bar.update(len(part))
        return replies  # type: ignore[return-value]

    def _chat(self, requests: Sequence[Request]) -> list[Reply]:
        raise LLMError(f"{self.describe()} cannot chat")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors (N, D), from the cache when this exact list was embedded before."""
        key = hashlib.sha256(json.dumps(["embed", self.model_id, list(texts)]).encode()).hexdigest()
        hit = self.cache.get(key) if self.cache else None
        if hit is not None:
            self.cache_hits += 1
            return np.asarray(json.loads(hit[0]), dtype=np.float64)
        vecs = self._embed(texts)
        if self.cache:
            self.cache.put(key, json.dumps(vecs.tolist()))
        return vecs

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        raise LLMError(f"{self.describe()} cannot embed")

    def stats(self) -> dict:
        return {
            "backend": self.describe(),
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "failures": self.failures,
        }


def _bar(total: int, desc: str | None):
    return tqdm(total=total, desc=desc, disable=desc is None, dynamic_ncols=True, leave=False)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- openai


def continuation(content: str, prefix: str) -> str:
    """The new text of a reply that continued the assistant's `prefix`. Servers differ: vLLM
    (`continue_final_message`) returns the continuation alone; llama.cpp's server treats a trailing assistant
    message as a prefill and returns prefix + continuation. A reply that starts with the whole (non-empty)
    prefix is taken as the second kind — a continuation that repeats a prefix of tens of characters word
    for word is not what a sampler produces."""
    return content[len(prefix) :] if prefix and content.startswith(prefix) else content


class OpenAIBackend(Backend):
    """An OpenAI-compatible HTTP server. `base_url` ends before `/chat/completions` (e.g. `http://h:8000/v1`)."""

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str,
        key_env: str = "OPENAI_API_KEY",
        cache_path=None,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 1.0,
    ):
        super().__init__()
        self.model = self.model_id = model
        self.base_url = base_url.rstrip("/")
        self.key_env = key_env
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.cache = Cache(cache_path)
        self._count = threading.Lock()

    def describe(self) -> str:
        return f"openai:{self.model}@{self.base_url}"

    def _post(self, path: str, body: dict, meta: dict) -> dict:
        """One HTTP POST with retries; returns the decoded JSON or raises LLMError (the last failure)."""
        headers = {"Content-Type": "application/json", "X-TagPR-Meta": json.dumps(meta, ensure_ascii=True)}
        key = os.environ.get(self.key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt * (0.5 + random.random() / 2)
            with self._count:
                self.requests += 1
            try:
                req = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    last = f"malformed reply (not JSON): {raw[:80]!r}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:
                    raise LLMError(f"{self.base_url}{path}: HTTP {e.code}: {e.read()[:200]!r}") from None
                ra = e.headers.get("Retry-After") if e.headers else None
                if ra and ra.replace(".", "", 1).isdigit():
                    wait = max(wait, float(ra))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.retries:
                time.sleep(wait)
        raise LLMError(f"{self.base_url}{path}: gave up after {self.retries + 1} attempts; last: {last}")

    def _one(self, r: Request) -> Reply:
        body = {
            "model": self.model,
            "messages": r.messages,
            "temperature": r.temperature,
            "max_tokens": r.max_tokens,
            "seed": r.seed,
        }
        if r.prefix:  # continue the assistant's partial reply (vLLM's extension of the chat API)
            body.update(
                messages=r.messages + [{"role": "assistant", "content": r.prefix}],
                continue_final_message=True,
                add_generation_prompt=False,
            )
        try:
            for attempt in range(self.retries + 1):
                out = self._post("/chat/completions", body, r.meta)
                try:
                    text = out["choices"][0]["message"]["content"]
                    if not isinstance(text, str):
                        raise TypeError
                    return Reply(
                        continuation(text, r.prefix),
                        finished=out["choices"][0].get("finish_reason", "stop") != "length",
                    )
                except (KeyError, IndexError, TypeError):
                    err = f"malformed reply (no choices[0].message.content): {str(out)[:80]}"
                    if attempt < self.retries:
                        time.sleep(self.backoff * 2**attempt)
            return Reply(error=err)
        except LLMError as e:
            return Reply(error=str(e))

    def _chat(self, requests):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests))

    def _embed(self, texts: Sequence[str], batch: int = 256) -> np.ndarray:
        """In requests of `batch` inputs (APIs cap the inputs per request)."""
        rows = []
        for a in range(0, len(texts), batch):
            out = self._post(
                "/embeddings", {"model": self.model, "input": list(texts[a : a + batch])}, {"role": "embedder"}
            )
            try:
                rows += [d["embedding"] for d in sorted(out["data"], key=lambda d: d["index"])]
            except (KeyError, TypeError, ValueError) as e:
                raise LLMError(f"{self.base_url}/embeddings: malformed reply: {e}") from None
        return _unit(np.asarray(rows, dtype=np.float64))


# ----------------------------------------------------------------------------- hf


class HFBackend(Backend):
    """A local transformers model: chat through `tagpr.sampler.generate` (batched, KV cache);
    sampling seeded per request, so a rerun reproduces; greedy when temperature is 0."""

    name = "hf"

    def __init__(
        self, model: str, cache_path=None, batch_size: int = 8, device: str | None = None, precision: str = "fp32"
    ):
        super().__init__()
        self.chunk = batch_size
        self.precision = precision
        self.model_id = f"hf:{model}" + ("" if precision == "fp32" else f"@{precision}")  # replies differ: a cache key
        self.spec = model
        self.batch_size = batch_size
        self.device = device
        self.cache = Cache(cache_path)
        self._lm = None

    def describe(self) -> str:
        return f"hf:{self.spec}"

    def _load(self):
        if self._lm is None:
            self._lm, self._tok = load_model(self.spec, device=self.device)
        return self._lm, self._tok

    def _chat(self, requests):

        lm, tok = self._load()
        ids = [
            tok(
                tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True) + r.prefix,
                add_special_tokens=False,
            )["input_ids"]
            for r in requests
        ]
        t = max(r.temperature for r in requests)
        gens = [torch.Generator().manual_seed(r.seed) for r in requests]
        roll = generate(
            lm,
            ids,
            tok.eos_token_id,
            tok.pad_token_id,
            max(r.max_tokens for r in requests),
            temperature=t or 1.0,
            greedy=t == 0,
            generator=gens,
            tokenizer=tok,
            precision=self.precision,
        )
        self.requests += len(requests)
        return [Reply(text, finished=bool(f)) for text, f in zip(roll.texts, roll.finished.tolist())]

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        lm, tok = self._load()
        vecs = []
        with torch.no_grad():
            for a in range(0, len(texts), self.batch_size):
                batch = tok(list(texts[a : a + self.batch_size]), return_tensors="pt", padding=True)
                hidden = lm.get_decoder()(**batch).last_hidden_state  # (B, T, H)
                m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                vecs.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).double().numpy())
        self.requests += len(texts)
        return _unit(np.concatenate(vecs))


# ----------------------------------------------------------------------------- hashing


class HashingEmbedder(Backend):
    """A lexical embedding with no model: the words of a name (split on `_`, `-`, spaces) and their
    character trigrams, hashed into `dim` buckets (crc32), counted, L2-normalised. Names that share
    words or stems ("input_analysis", "analyze_input") land close; unrelated ones near-orthogonal."""

    name = "hashing"

    def __init__(self, dim: int = 512):
        super().__init__()
        self.dim = dim

    def describe(self) -> str:
        return f"hashing (lexical, {self.dim} dims)"

    def features(self, text: str) -> list[str]:
        words = [w for w in re.split(r"[\s_\-]+", text.lower()) if w]
        grams = [f"#{w}#"[i : i + 3] for w in words for i in range(len(w))]
        return [f"w:{w}" for w in words] + [f"g:{g}" for g in grams if len(g) == 3]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), self.dim))
        for i, t in enumerate(texts):
            for f in self.features(t):
                x[i, zlib.crc32(f.encode()) % self.dim] += 2.0 if f.startswith("w:") else 1.0
        return _unit(x)


# ----------------------------------------------------------------------------- specs


def from_spec(
    spec: str,
    role: str,
    cache_dir: str | os.PathLike | None = None,
    key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    timeout: float = 120.0,
    retries: int = 5,
    backoff: float = 1.0,
    expert=None,
) -> Backend:
    """Build the backend a spec names (see the module docstring). `expert` builds the simulated one."""
    cache = Path(cache_dir) / f"{role}.jsonl" if cache_dir else None
    if spec == "simulated":
        if expert is None:
            raise LLMError(
                f"--{role} simulated: the simulated expert answers only for synthetic users "
                "(no --lamp-dir); pass an openai: or hf: backend for LaMP"
            )
        return expert.for_role()
    if spec == "hashing":
        return HashingEmbedder()
    if spec.startswith("hf:"):
        return HFBackend(spec[3:], cache_path=cache)
    if spec.startswith("openai:") and "@" in spec:
        model, url = spec[len("openai:") :].rsplit("@", 1)
        return OpenAIBackend(model, url, key_env, cache, concurrency, timeout, retries, backoff)
    raise LLMError(f"--{role} {spec!r}: expected simulated, hashing, hf:NAME or openai:MODEL@BASE_URL")
