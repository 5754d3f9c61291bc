"""A real OpenAI-compatible server in the loop: llama.cpp's (the `xllamacpp` wheel) on the SmolLM2 GGUF, started by
`scripts/serve.py` on 127.0.0.1 and a free port, health-checked, stopped at the end. Against it: the continuation
convention, build_data.py (what a 135M model does wrong, counted), evaluate.py (zero-shot, RAG-R, R2P), and a
server killed in mid-run, restarted, the run repeated: nothing lost, no cached request sent again."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tagpr import llm

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
sys.path.insert(0, str(Path(__file__).parent))
from llm_server import Server  # noqa: E402

# ----------------------------------------------------------------------------- both conventions, scripted


class Echo:
    """A stand-in expert for the scripted server: every reply is the same continuation."""

    def chat(self, requests):
        return [llm.Reply(" friend! How are you?")]


@pytest.mark.parametrize("echo", [False, True], ids=["vllm-style", "llama.cpp-style"])
def test_a_continued_reply_is_its_continuation_on_both_conventions(tmp_path, echo):
    with Server(Echo(), echo_prefix=echo) as srv:
        b = llm.OpenAIBackend("m", srv.url, key_env="NONE", cache_path=tmp_path / "c.jsonl", retries=0)
        ask = [
            llm.Request([{"role": "user", "content": "Say hi"}], {"role": "teacher"}, prefix="Hello there, my"),
            llm.Request([{"role": "user", "content": "Say hi"}], {"role": "teacher"}),
        ]
        got = [r.text for r in b.chat(ask)]
    assert got == [" friend! How are you?"] * 2  # the prefix is never doubled
    assert llm.continuation("Hello there, my friend", "Hello there, my") == " friend"
    assert llm.continuation(" friend", "Hello there, my") == " friend"
    assert llm.continuation("Hello", "") == "Hello"


# ----------------------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealServer:
    """`python scripts/serve.py --port P` in a subprocess; start() waits for /health, stop() ends it; its log
    (llama.cpp's, on stderr) goes to `log`."""

    def __init__(self, port: int, log: Path):
        self.port, self.proc, self.log = port, None, log
        self.url = f"http://127.0.0.1:{port}/v1"

    def start(self):
        pytest.importorskip("xllamacpp", reason="the serve extra is not installed (pip install -e '.[serve]')")
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "scripts" / "serve.py"),
                    "--port",
                    str(self.port),
                    "--parallel",
                    "2",
                    "--ctx",
                    "2048",
                ],
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,  # its own process group, so kill() takes the server and its children
            )
        line = self.proc.stdout.readline()  # printed once /health says ok
        assert line.startswith("serving "), f"the server did not start: {line!r}"
        return self

    def completed(self) -> int:
        """Chat completions the server has finished (llama.cpp logs one "stop processing" per request)."""
        return self.log.read_text(errors="replace").count("stop processing") if self.log.is_file() else 0

    def kill(self):
        """SIGKILL to the server's whole process group: no chance to finish a request or flush anything."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RealServer(free_port(), tmp_path_factory.mktemp("server") / "server.log").start()
    yield s
    s.stop()


def post(url, body):
    req = urllib.request.Request(
        f"{url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_llama_cpp_repeats_the_prefix_and_the_backend_keeps_the_continuation(server, tmp_path):
    msgs = [{"role": "user", "content": "Say hi"}]
    prefix = "Hello there, my"
    raw = post(
        server.url,
        {
            "model": "local",
            "messages": msgs + [{"role": "assistant", "content": prefix}],
            "max_tokens": 4,
            "temperature": 0,
            "seed": 1,
            "continue_final_message": True,
            "add_generation_prompt": False,
        },
    )["choices"][0]["message"]["content"]
    assert raw.startswith(prefix) and len(raw) > len(prefix)  # llama.cpp's convention
    b = llm.OpenAIBackend("local", server.url, key_env="NONE", cache_path=tmp_path / "c.jsonl", retries=1)
    rep = b.chat([llm.Request(msgs, {"role": "teacher"}, temperature=0.0, max_tokens=4, prefix=prefix)])[0]
    assert not rep.error and rep.text == raw[len(prefix) :]


def run(args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def build_args(url, out, teacher=None):
    spec = f"openai:local@{url}"
    return [
        "build_data.py",
        "--out",
        str(out),
        "--tasks",
        "LaMP_3",
        "--instances-per-task",
        "3",
        "--chains",
        "2",
        "--max-tokens",
        "96",
        "--rl-per-task",
        "2",
        "--synthetic-users",
        "4",
        "--spot-check",
        "2",
        "--teacher",
        teacher or spec,
        "--judge",
        spec,
        "--tagger",
        spec,
        "--embedder",
        "hashing",
        "--teacher-key-env",
        "NONE",
        "--judge-key-env",
        "NONE",
        "--tagger-key-env",
        "NONE",
        "--retries",
        "1",
        "--backoff",
        "0.2",
        "--concurrency",
        "2",
    ]


@pytest.mark.slow
def test_build_data_counts_what_a_small_real_model_does_wrong(server, tmp_path):
    """SmolLM2-135M as teacher writes no `Answer:` line in 96 tokens, and as judge no parsable scores: every
    chain is dropped at the stage that catches it, counted, and the run ends with one clear error line."""
    r = run(build_args(server.url, tmp_path / "a"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: no chain survived")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    teacher = m["stages"]["2_teacher"]
    assert teacher["in"] == 3 * (2 + 1) and teacher["in"] == teacher["out"] + sum(teacher["dropped"].values())
    assert sum(teacher["dropped"].values()) > 0  # what the small model did wrong
    assert m["calls"]["teacher"]["requests"] >= 9 and m["calls"]["teacher"]["failures"] == 0
    # the simulated teacher's chains reach the real judge: its replies are counted the same way
    r = run(build_args(server.url, tmp_path / "b", teacher="simulated"))
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    judge = m["stages"]["4_judge"]
    assert judge["in"] > 0 and judge["in"] == judge["out"] + sum(judge["dropped"].values())
    assert m["calls"]["judge"]["requests"] >= judge["in"]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    if r.returncode == 2:  # the 135M judge may drop every chain: then the run says so in one line, and nothing else
        assert r.stderr.strip().splitlines()[-1].startswith("error: no chain survived"), r.stderr[-2000:]
    else:  # else the survivors are written
        assert r.returncode == 0 and judge["out"] > 0 and (tmp_path / "b" / "sft.jsonl").is_file(), r.stderr[-2000:]


@pytest.mark.slow
def test_evaluate_zero_shot_rag_r_and_r2p(server, tmp_path):
    from tagpr import synthetic

    synthetic.generate(tmp_path / "lamp", ["LaMP_3"], seed=0, sizes={"train": (2, 1), "dev": (2, 1), "test": (1, 1)})
    out = tmp_path / "eval"
    r = run(
        [
            "evaluate.py",
            "--model",
            f"openai:local@{server.url}",
            "--api-key-env",
            "NONE",
            "--methods",
            "zero-shot,rag-r,r2p",
            "--tasks",
            "LaMP_3",
            "--limit",
            "2",
            "--k",
            "2",
            "--max-new-direct",
            "8",
            "--max-new-reason",
            "48",
            "--r2p-candidates",
            "2",
            "--r2p-chunk",
            "24",
            "--r2p-max-tokens",
            "48",
            "--r2p-interventions",
            "1",
            "--concurrency",
            "2",
            "--out",
            str(out),
            "--lamp-dir",
            str(tmp_path / "lamp"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("zero-shot", "rag-r", "r2p"):  # the MAE recomputed from the official files it wrote
        folder = out / method / "LaMP_3"
        golds = {g["id"]: float(g["output"]) for g in json.loads((folder / "golds.json").read_text())["golds"]}
        preds = {g["id"]: g["output"] for g in json.loads((folder / "predictions.json").read_text())["golds"]}
        assert set(preds) == set(golds) and len(golds) == 2
        errors = [rating_error(preds[i], golds[i]) for i in golds]
        assert metrics[method]["LaMP_3"]["MAE"] == pytest.approx(sum(errors) / 2, abs=1e-9), method
    traces = [json.loads(line) for line in (out / "r2p" / "LaMP_3" / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 2 and not any(t.get("error") for t in traces)


def rating_error(pred: str, gold: float) -> float:
    """The official LaMP-3 rule, written out: |pred − gold|, or the worst error for the gold when pred is no number."""
    try:
        return abs(float(pred) - gold)
    except ValueError:
        return max(abs(1 - gold), abs(5 - gold))


@pytest.mark.slow
def test_a_server_killed_mid_run_then_restarted_loses_nothing(tmp_path):
    """build_data against a server killed once it has answered 3 of the 9 teacher requests: the run ends with
    the rest failed (counted, not cached); the server restarted and the run repeated, only what had no answer is
    asked (the teacher's requests = 9 − cached), and at the end every teacher request has its answer cached."""
    port = free_port()
    srv = RealServer(port, tmp_path / "server1.log").start()
    out = tmp_path / "run"
    cache = out / "cache" / "teacher.jsonl"
    proc = subprocess.Popen(
        [sys.executable, *build_args(srv.url, out)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and srv.completed() < 3:
        time.sleep(0.05)
    srv.kill()  # SIGKILL, mid-request: not a polite stop
    proc.wait(timeout=300)
    cached = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    assert 3 <= len(cached) < 9, len(cached)  # killed mid-run
    srv = RealServer(port, tmp_path / "server2.log").start()
    try:
        r = run(build_args(srv.url, out))
    finally:
        srv.stop()
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    calls = m["calls"]["teacher"]
    assert calls["cache_hits"] == len(cached) and calls["requests"] == 9 - len(cached), calls
    assert len({json.loads(line)["key"] for line in cache.read_text().splitlines() if line.strip()}) == 9
