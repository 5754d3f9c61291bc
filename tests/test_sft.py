"""Runtime and SFT: the loop learns, batching and ranks don't change numbers, kills resume exactly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tagpr import checkpoint, records, synthetic
from tagpr.batching import epoch_batches
from tagpr.files import DataError, write_jsonl
from tagpr.hardware import keep_freed_memory
from tagpr.loop import fsdp_micro_batches, lr_at
from tagpr.models import LogprobModel, load_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdata")
    synthetic.generate(d / "lamp", seed=0, sizes={"train": (6, 2), "dev": (1, 1), "test": (1, 1)})
    recs = synthetic.sft_records(d / "lamp", tasks=("LaMP_2", "LaMP_3"), k=2)
    write_jsonl(d / "sft.jsonl", [r.to_json() for r in recs])
    return d / "sft.jsonl"


def args(sft_file, out, *extra):
    return [
        "--preset",
        "tiny",
        "--sft",
        str(sft_file),
        "--out",
        str(out),
        "--global-batch",
        "8",
        "--micro-batch",
        "4",
        "--eval-frac",
        "0",
        "--max-len",
        "1024",
        *extra,
    ]


def run_script(argv, nproc=1, timeout=600):
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    ) + [str(ROOT / "train_sft.py"), *argv]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_schedule_and_batching():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0) and lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10, 0.0) == pytest.approx(0.5)  # cosine midpoint
    lengths = list(range(50))
    a = epoch_batches(lengths, 8, epoch=1, seed=3)
    assert a == epoch_batches(lengths, 8, epoch=1, seed=3) and a != epoch_batches(lengths, 8, epoch=2, seed=3)
    assert sorted(i for b in a for i in b) == list(range(50))
    # 5 rows in micro-batches of 2: 3 real ones; alone, nothing is padded
    assert list(fsdp_micro_batches(list(range(5)), 2)) == [([0, 1], True), ([2, 3], True), ([4], True)]
    assert list(fsdp_micro_batches([], 2)) == []


def test_fsdp_micro_batches_pad_to_the_busiest_rank(monkeypatch):
    """Another rank has 3 micro-batches: this one (2 rows → 1) runs 2 more, each one row (index 0) marked not
    real, so every rank makes the same number of forwards and backwards; the count is asked of all ranks."""
    from tagpr import dist, loop

    asked = []
    monkeypatch.setattr(loop.dist, "all_reduce", lambda t, op: asked.append((int(t), op)) or torch.tensor(3))
    assert list(fsdp_micro_batches([7, 9], 2)) == [([7, 9], True), ([0], False), ([0], False)]
    assert asked == [(1, "max")] and dist is loop.dist


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_is_accepted_by_glibc():
    """glibc takes both settings (mallopt returns 1). Their effect is a speed matter (fewer page faults on
    large tensors, not deterministic enough to count in a test): bench/README.md."""
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent


def test_malformed_sft_lines(tmp_path):
    good = {"id": "1", "task": "LaMP_2", "user_id": "u", "prompt": "p", "chain": "<think></think>", "answer": "comedy"}
    p = tmp_path / "sft.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + "{not json\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:3: malformed JSON"):
        records.read_sft(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "chain"}) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:2: missing field 'chain'"):
        records.read_sft(p)
    p.write_text(json.dumps({**good, "answer": 5}) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:1: field 'answer' must be a string"):
        records.read_sft(p)
    p.write_text(json.dumps({**good, "task": "LaMP_9"}) + "\n")
    with pytest.raises(DataError, match="unknown task"):
        records.read_sft(p)
    p.write_text("")
    with pytest.raises(DataError, match="no records"):
        records.read_sft(p)


def test_micro_batch_split_gives_same_gradients(sft_file):
    import train_sft

    lm, tok = load_model("tiny", device="cpu")
    model = LogprobModel(lm)
    recs = records.read_sft(sft_file)[:8]
    cfg = train_sft.SFTConfig(max_len=1024)
    data, _ = train_sft.tokenize(recs, tok, cfg)
    n_tok = sum(sum(m) for _, m in data)
    grads = []
    for micro in (1, 4):  # 8 × 1 vs 2 × 4
        model.zero_grad()
        mbs = [rows for rows, _ in fsdp_micro_batches(list(range(8)), micro)]
        train_sft.run_batch(model, data, mbs, tok.pad_token_id, torch.device("cpu"), n_tok, 1, train=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_packing_and_activation_checkpointing_change_nothing(sft_file, tmp_path):
    import train_sft
    from tagpr import dist
    from tagpr.batching import pack_rows

    assert pack_rows([0, 1, 2, 3], [5, 3, 4, 2], 8) == [[0, 1], [2, 3]]  # first-fit decreasing: 5+3, 4+2
    lm, tok = load_model("tiny", device="cpu")
    recs = records.read_sft(sft_file)[:6]
    cfg = train_sft.SFTConfig(max_len=1024, micro_batch=2)
    data, _ = train_sft.tokenize(recs, tok, cfg)
    n_tok = sum(sum(m) for _, m in data)
    d = dist.get()
    results = []
    for packed, ac in ((False, False), (True, False), (False, True)):
        model = LogprobModel(load_model("tiny", device="cpu")[0])
        model = dist.apply_fsdp(model, torch.device("cpu"), activation_checkpointing=ac)
        micro = train_sft.plan_micro_batches(list(range(6)), data, cfg, d, packed)
        loss = train_sft.run_batch(model, data, micro, tok.pad_token_id, torch.device("cpu"), n_tok, 1, True, packed)
        results.append((loss, [p.grad.clone() for p in model.parameters()], model))
    assert len(train_sft.plan_micro_batches(list(range(6)), data, cfg, d, True)) < 3  # fewer, fuller rows
    for loss, grads, _ in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for a, b in zip(grads, results[0][1]):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # the export of an activation-checkpointed model has plain transformers names
    checkpoint.export_hf(results[2][2], results[2][2].lm, tok, tmp_path / "ac")
    assert "_checkpoint_wrapped_module" not in " ".join(load_file(str(tmp_path / "ac" / "model.safetensors")))


def test_overfits_and_exports(sft_file, tmp_path):
    from transformers import AutoModelForCausalLM

    import train_sft

    train_sft.main(
        args(sft_file, tmp_path / "o", "--max-steps", "40", "--epochs", "100", "--lr", "3e-3", "--save-every", "100")
    )
    curve = losses(tmp_path / "o")
    assert curve[-1] < 0.35 * curve[0], curve  # the loss of the same 24 sequences falls by far
    # the export loads with plain transformers and gives the trained weights' logits
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model")
    ours, tok = load_model(tmp_path / "o" / "model", device="cpu")
    sd = load_file(str(tmp_path / "o" / "model" / "model.safetensors"))
    ids = tok("Which tag does this movie relate to", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, ours(ids).logits)
    assert torch.equal(exported.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    ckpt = checkpoint.latest(tmp_path / "o" / "ckpt")
    assert ckpt.name == "step_00000040"


@pytest.mark.slow
def test_one_rank_equals_two_ranks(sft_file, tmp_path):
    run_script(args(sft_file, tmp_path / "one", "--max-steps", "3"))
    run_script(args(sft_file, tmp_path / "two", "--max-steps", "3"), nproc=2)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    # Adam divides by √v, so reduction-order noise on near-zero gradients shows up in a few
    # elements; a wrong reduction (mean instead of sum over ranks) would move most by ~lr = 2e-3
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert diff.max() <= 0.05 * 2e-3 and (diff > 1e-5).float().mean() < 1e-3, k


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(sft_file, tmp_path):
    common = ("--max-steps", "6", "--save-every", "2", "--keep", "3")
    run_script(args(sft_file, tmp_path / "full", *common))
    cmd = [sys.executable, str(ROOT / "train_sft.py"), *args(sft_file, tmp_path / "kill", *common)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while checkpoint.latest(tmp_path / "kill" / "ckpt") is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run, right after the first checkpoint landed
    proc.wait()
    killed_at = checkpoint.latest(tmp_path / "kill" / "ckpt")
    assert killed_at is not None and not (tmp_path / "kill" / "model").exists()
    run_script(args(sft_file, tmp_path / "kill", *common))  # --resume auto
    assert losses(tmp_path / "kill") == losses(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "kill" / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dist_helpers_alone_are_identities():
    from tagpr import dist

    d = dist.init(device="cpu")
    assert (d.rank, d.world_size, d.is_main, d.distributed) == (0, 1, True, False)
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce(t, "sum") is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert dist.sum_scalar(2.5) == 2.5 and dist.any_true(True) and not dist.any_true(False)
    assert dist.broadcast_object({"a": 1}) == {"a": 1}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_top_layers_only(sft_file, tmp_path, precision):
    """--train-layers 1: only the top decoder layer and the final norm move, and the loss falls; in fp32 on every
    machine, in bf16 autocast where the CPU has bf16 matmul hardware."""
    import train_sft
    from tagpr import hardware

    if precision == "bf16" and not hardware.bf16_matmul():
        pytest.skip("bf16 autocast needs a CPU with AVX512-BF16 or AMX (this one has neither, or TAGPR_CPU=plain)")
    train_sft.main(
        args(
            sft_file,
            tmp_path / "top",
            "--max-steps",
            "8",
            "--epochs",
            "100",
            "--lr",
            "3e-3",
            "--train-layers",
            "1",
            "--precision",
            precision,
            "--save-every",
            "100",
        )
    )
    curve = losses(tmp_path / "top")
    assert curve[-1] < curve[0] - 0.25, curve
    start = {k: v for k, v in load_model("tiny", device="cpu", seed=0)[0].state_dict().items()}
    done = load_file(str(tmp_path / "top" / "model" / "model.safetensors"))
    top = max(int(k.split(".")[2]) for k in done if k.startswith("model.layers."))
    moved = {k for k in done if not torch.equal(done[k], start[k])}
    want = {k for k in done if k.startswith(f"model.layers.{top}.") or k == "model.norm.weight"}
    assert moved == want
    cfg = json.loads((tmp_path / "top" / "config.json").read_text())
    assert cfg["precision"] == precision and 0 < cfg["trainable_params"] < cfg["params"]


def test_bf16_is_refused_without_the_hardware(sft_file, tmp_path):
    """A CPU without bf16 hardware (or TAGPR_CPU=plain) refuses --precision bf16 before any work, naming the fix."""
    import train_sft
    from tagpr import hardware

    if hardware.bf16_matmul():
        pytest.skip("this CPU has bf16 matmul hardware (AVX512-BF16 or AMX): nothing to refuse")
    with pytest.raises(hardware.PrecisionError, match=r"AVX512-BF16 or AMX.*--precision fp32"):
        train_sft.main(args(sft_file, tmp_path / "top", "--precision", "bf16"))
    assert not (tmp_path / "top").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["top", "lora"])
def test_top_layers_on_two_ranks_resume(sft_file, tmp_path, weights):
    """FSDP2 with frozen lower layers: 2 ranks, resumed from step 2, = 1 rank straight through. `lora`: rank-4
    adapters in the top 2 layers instead (the base sharded and frozen, the checkpoint the adapters alone)."""
    common = ("--train-layers", "2", "--save-every", "2", "--max-steps", "4", "--keep", "3")
    common += ("--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2") if weights == "lora" else ()
    run_script(args(sft_file, tmp_path / "one", *common))
    run_script(args(sft_file, tmp_path / "two", *common), nproc=2)
    shutil.rmtree(tmp_path / "two" / "model")  # back to the step-2 checkpoint
    shutil.rmtree(checkpoint.latest(tmp_path / "two" / "ckpt"))
    assert checkpoint.latest(tmp_path / "two" / "ckpt").name == "step_00000002"
    run_script(args(sft_file, tmp_path / "two", *common), nproc=2)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-4, k
    base = load_model("tiny", device="cpu")[0].state_dict()  # with top 2 of 4 layers, layer 1 never moves
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert not torch.equal(a[q.format(3)], base[q.format(3)]) and torch.equal(a[q.format(1)], base[q.format(1)])
