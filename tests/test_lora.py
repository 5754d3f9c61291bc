"""tagpr.lora: adapters that start as the base model exactly, train alone, merge into the export, and feed the
rollout engine the merged weights; in train_sft and train_rl, exact on 1 and 2 ranks and across a resume."""

import copy
import math
from pathlib import Path

import pytest
import torch
from test_engine import MODELS, left_pad

from tagpr import engine, lora, sampler

SPEC = lora.LoRASpec(rank=4, alpha=8.0)


def adapted(name, spec=SPEC, seed=0):
    lm = copy.deepcopy(MODELS[name])
    lora.add_adapters(lm, spec, seed=seed)
    return lm


def randomize_b(lm, seed=1):
    """B ≠ 0, as after training (B starts at zero, so nothing else shows the adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lm.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)


IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_zero_b_gives_the_base_logits_exactly(name):
    lm = adapted(name)
    n = sum(isinstance(m, lora.LoRALinear) for m in lm.modules())
    assert n == 3 * 7  # every attention and MLP projection of the 3 layers
    assert any(m.lora_A.abs().sum() > 0 for m in lm.modules() if isinstance(m, lora.LoRALinear))
    with torch.no_grad():
        assert torch.equal(lm(input_ids=IDS).logits, MODELS[name](input_ids=IDS).logits)


def test_the_state_dict_keeps_the_base_names_and_adds_the_adapters():
    lm = adapted("qwen2", lora.LoRASpec(rank=2, targets=("q_proj", "v_proj"), layers=1))
    base = MODELS["qwen2"].state_dict()
    sd = lm.state_dict()
    extra = sorted(set(sd) - set(base))
    assert set(base) <= set(sd)
    assert extra == [f"model.layers.2.self_attn.{p}.{ab}" for p in ("q_proj", "v_proj") for ab in ("lora_A", "lora_B")]
    assert all(torch.equal(sd[k], base[k]) for k in base)
    # only the adapters train: 2 projections × (A 2×96 + B out×2); q out 96, v out 2 kv heads × 16 = 32
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == extra
    assert sum(p.numel() for p in lora.adapter_parameters(lm)) == 2 * 96 + 96 * 2 + 2 * 96 + 32 * 2


def test_initial_a_is_kaiming_uniform_and_seeded():
    """A ~ U(−1/√in, 1/√in) (kaiming_uniform with a = √5, as nn.Linear initialises a weight), the same for one
    seed, another for another; B zero."""
    a, b, c = adapted("llama", seed=0), adapted("llama", seed=0), adapted("llama", seed=1)
    A = lambda m: torch.cat([x.lora_A.flatten() for x in m.modules() if isinstance(x, lora.LoRALinear)])
    bound = 1 / math.sqrt(96)  # every target's input is 96 wide except down_proj's (160)
    q = a.model.layers[0].self_attn.q_proj.lora_A.detach()
    assert q.abs().max() <= bound and q.abs().max() > 0.9 * bound and abs(float(q.mean())) < 0.2 * bound
    d = a.model.layers[0].mlp.down_proj.lora_A.detach()
    assert d.abs().max() <= 1 / math.sqrt(160)
    assert torch.equal(A(a), A(b)) and not torch.equal(A(a), A(c))
    assert all(float(m.lora_B.detach().abs().sum()) == 0 for m in a.modules() if isinstance(m, lora.LoRALinear))


def test_only_the_adapters_get_gradients_and_the_base_stays_bit_equal():
    lm = adapted("qwen3")
    before = {k: v.clone() for k, v in lm.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(lm(input_ids=IDS).logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
        loss.backward()
        for n, p in lm.named_parameters():
            assert p.requires_grad == ("lora_" in n) and (p.grad is not None) == ("lora_" in n), n
        opt.step()
        opt.zero_grad()
    after = lm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(float(m.lora_B.detach().abs().sum()) > 0 for m in lm.modules() if isinstance(m, lora.LoRALinear))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_the_merged_state_dict_loads_as_the_base_architecture_with_the_adapted_logits(name):
    lm = adapted(name)
    randomize_b(lm)
    merged = lora.merged_state_dict(lm.state_dict(), lora.scalings(lm))
    plain = copy.deepcopy(MODELS[name])
    plain.load_state_dict(merged)  # strict: exactly the base model's keys
    with torch.no_grad():
        want, got, base = lm(input_ids=IDS).logits, plain(input_ids=IDS).logits, MODELS[name](input_ids=IDS).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (base - want).abs().max() > 0.05 * want.abs().max()  # the adapters do change the model
    # W' = W + (α/r)·B A, checked on one projection by hand
    q = lm.model.layers[1].self_attn.q_proj
    w = MODELS[name].model.layers[1].self_attn.q_proj.weight
    assert torch.allclose(merged["model.layers.1.self_attn.q_proj.weight"], w + 2.0 * q.lora_B @ q.lora_A)


def test_the_engine_samples_the_merged_weights():
    """Rollouts through the engine (which reads `merged_weight()`) = transformers' forward through the adapters,
    and = the engine on a plain model holding the merged weights."""
    lm = adapted("llama")
    randomize_b(lm)
    plain = copy.deepcopy(MODELS["llama"])
    plain.load_state_dict(lora.merged_state_dict(lm.state_dict(), lora.scalings(lm)))
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, mask, pos = left_pad(prompts)
    with torch.no_grad():
        e, _, _ = engine.prefill(lm, engine.Weights(lm, torch.float32, True), ids, mask, pos)
        ref = torch.stack([lm(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    assert (e - ref).abs().max() <= 1e-4 * ref.abs().max()
    a = sampler.generate(lm, prompts, eos_id=-1, pad_id=0, max_new_tokens=8, greedy=True).response_ids
    b = sampler.generate(plain, prompts, eos_id=-1, pad_id=0, max_new_tokens=8, greedy=True).response_ids
    base = sampler.generate(MODELS["llama"], prompts, eos_id=-1, pad_id=0, max_new_tokens=8, greedy=True)
    assert torch.equal(a, b) and not torch.equal(a, base.response_ids)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match=r"--lora-targets 'q_proj,qq_proj': qq_proj"):
        lora.parse_targets("q_proj,qq_proj")
    assert lora.parse_targets("all") == lora.ALL_TARGETS
    assert lora.parse_targets(" v_proj, q_proj ") == ("v_proj", "q_proj")
    with pytest.raises(ValueError, match="top 5 layers: the model has 3"):
        adapted("llama", lora.LoRASpec(rank=2, layers=5))
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.add_adapters(adapted("llama"), SPEC, seed=0)


# ----------------------------------------------------------------------------- in the trainers

LORA = ("--lora-rank", "4", "--lora-alpha", "8")


def exported(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def checkpoint_keys(out):
    from torch.distributed.checkpoint import FileSystemReader

    from tagpr import checkpoint

    meta = FileSystemReader(str(checkpoint.latest(out / "ckpt"))).read_metadata()
    return [k for k in meta.state_dict_metadata if k.startswith("model.")]


def check_export_is_base_plus_adapters(sd, layers=range(2)):
    """The export holds the base model's keys only; every tensor not adapted is the tiny base's bit for bit, every
    adapted projection in `layers` moved."""
    from tagpr.models import load_model

    base = {k: v for k, v in load_model("tiny", device="cpu")[0].state_dict().items() if k != "lm_head.weight"}
    assert sd.keys() == base.keys()
    adapted = [k for k in base if any(f"layers.{i}." in k for i in layers) and k.endswith("_proj.weight")]
    assert len(adapted) == 7 * len(layers)
    for k in base:
        assert torch.equal(sd[k], base[k]) != (k in adapted), k


def test_sft_with_lora_exports_the_adapted_model_merged(tmp_path):
    """train_sft --lora-rank 4: the checkpoint holds the adapters alone; the export is a plain model whose logits
    are the adapted model's (rebuilt from the checkpoint) within fp32 rounding, and only adapted weights moved."""
    from transformers import AutoModelForCausalLM

    import train_sft
    from tagpr import checkpoint
    from tagpr.models import LogprobModel, load_model

    out = tmp_path / "sft"
    train_sft.main(["--preset", "tiny", "--out", str(out), "--max-steps", "3", "--lr", "1e-2", "--resume", "", *LORA])
    keys = checkpoint_keys(out)
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys), keys[:5]
    sd = exported(out)
    check_export_is_base_plus_adapters(sd, layers=range(4))  # every layer of the 4
    lm, tok = load_model("tiny", device="cpu")
    lora.add_adapters(lm, lora.LoRASpec(rank=4, alpha=8.0), seed=0)
    model = LogprobModel(lm)
    checkpoint.load(checkpoint.latest(out / "ckpt"), model, torch.optim.AdamW(lora.adapter_parameters(lm)))
    plain = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = tok("Which tag does this movie relate to", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = lm(ids).logits, plain(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # with activation checkpointing (the qwen3-8b preset's): the same adapters, the same export, bit for bit
    ac = tmp_path / "ac"
    train_sft.main(
        ["--preset", "tiny", "--out", str(ac), "--max-steps", "3", "--lr", "1e-2", "--resume", "", *LORA]
        + ["--activation-checkpointing"]
    )
    other = exported(ac)
    assert all(torch.equal(other[k], sd[k]) for k in sd)


@pytest.mark.slow
def test_gspo_with_lora_one_rank_two_ranks_and_a_kill(tmp_path):
    """train_rl with adapters on the top 2 layers: 1 rank recomputing the frozen trunk in every forward = 2 ranks
    (FSDP2, the trunk cached per rollout batch) up to reduction order; on 2 ranks, resumed from the step-2
    checkpoint = the uninterrupted run, bit for bit (a SIGKILL's restart is test_rl's; here the checkpoint holds
    the adapters alone). The export is the base model with adapted top-layer projections."""
    import re
    import shutil

    from test_rl import rows, script, weights

    extra = [*LORA, "--train-layers", "2"]
    script(tmp_path / "one", extra=[*extra, "--no-trunk-cache"])
    two = script(tmp_path / "two", nproc=2, extra=extra)
    # r·(in + out) a projection, hidden 128, q/o 128 out, k/v 64, MLP 384: 4·(256+192+192+256+512+512+512) a layer
    assert "0.0195M of 1.1M parameters trained" in two  # × 2 layers = 19,456
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for k, v in x.items():
            if isinstance(v, float):
                assert v == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    assert any(r["clip_frac_low/u1"] + r["clip_frac_high/u1"] > 0 for r in b)  # the adapters did move the policy
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all((wa[k] - wb[k]).abs().max() <= 1e-5 for k in wa)
    check_export_is_base_plus_adapters(wb, layers=(2, 3))
    keys = checkpoint_keys(tmp_path / "two")
    assert len(keys) == 2 * 7 * 2 and all(".layers.2." in k or ".layers.3." in k for k in keys)

    # back to the step-2 checkpoint of the 2-rank run (as a kill after it would leave it), then the same command
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "model")
    for step in (3, 4):
        shutil.rmtree(tmp_path / "resumed" / "ckpt" / f"step_{step:08d}")
    resumed = script(tmp_path / "resumed", nproc=2, extra=extra)
    assert re.search(r"resumed from \S+step_00000002 at step 2", resumed), resumed[-2000:]
    assert rows(tmp_path / "resumed") == rows(tmp_path / "two")
    wr = weights(tmp_path / "resumed")
    assert all(torch.equal(wr[k], wb[k]) for k in wb)


def test_gspo_refuses_lora_dropout(tmp_path):
    import train_rl
    from tagpr.config import ConfigError

    with pytest.raises(ConfigError, match=r"--lora-dropout 0\.1: must be 0 in GSPO"):
        train_rl.main(["--preset", "tiny", "--out", str(tmp_path / "x"), *LORA, "--lora-dropout", "0.1"])
    with pytest.raises(ConfigError, match=r"--lora-targets 'q,v'"):
        train_rl.main(["--preset", "tiny", "--out", str(tmp_path / "x"), *LORA, "--lora-targets", "q,v"])
    assert not (tmp_path / "x").exists()  # refused before anything was written


@pytest.mark.parametrize("weights", ["full", "lora"])
def test_a_gspo_step_with_adapters_moves_the_policy_as_the_full_step_does(weights):
    """One on-policy GSPO update (the library's loss, then Adam at a small lr) on 4 groups of 4 fixed rollouts
    with zero-mean advantages: the surrogate Σ Â_i·s_i / N rises from its on-policy value 0 (first order: the step
    goes up the gradient), and each rollout's log-ratio ranks with its advantage; with the full weights and with
    adapters alike (the adapters' step: only they move). (The toy letters task of test_rl climbs through the tied
    embeddings, which LoRA does not train: it cannot compare the two.)"""
    from tagpr.losses import gspo_loss
    from tagpr.models import LogprobModel

    lm = copy.deepcopy(MODELS["qwen3"]).train()
    if weights == "lora":
        lora.add_adapters(lm, lora.LoRASpec(rank=8, alpha=16.0), seed=0)
    params = [p for p in lm.parameters() if p.requires_grad]
    model = LogprobModel(lm)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (16, 14), generator=g)
    mask = torch.zeros(16, 13, dtype=torch.bool)
    mask[:, 7:] = True  # the rollouts: the last 6 of each row's 13 predicted tokens
    adv = torch.randn(16, generator=g).view(4, 4)
    adv = ((adv - adv.mean(1, keepdim=True)) / adv.std(1, keepdim=True)).flatten()
    with torch.no_grad():
        old = model(ids)[0]
    loss, _ = gspo_loss(model(ids)[0], old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)  # on-policy: s = 1 and Σ Â = 0
    loss.backward()
    opt = torch.optim.Adam(params, lr=1e-3)
    opt.step()
    with torch.no_grad():
        new = model(ids)[0]
    log_s = ((new - old) * mask).sum(1) / mask.sum(1)
    surrogate = float((adv * log_s.exp()).mean())
    assert surrogate > 1e-3, surrogate
    rank = lambda x: x.argsort().argsort().double()
    assert torch.corrcoef(torch.stack([rank(adv), rank(log_s)]))[0, 1] > 0.6  # Spearman's ρ


def test_a_bf16_base_gives_the_same_autocast_forward():
    """`hold_base_in_bf16`: the frozen projections stored in bf16 give, under bf16 autocast, the logits and the
    adapters' gradients of the fp32 base bit for bit (autocast rounds an fp32 weight the same way at every call),
    at half the projections' memory; the merged export is fp32 either way."""
    a = adapted("qwen2")
    randomize_b(a)
    b = copy.deepcopy(a)
    saved = lora.hold_base_in_bf16(b)
    proj = sum(m.weight.numel() for m in a.modules() if isinstance(m, lora.LoRALinear))
    assert saved == 2 * proj and b.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    layer = b.model.layers[0]
    assert layer.input_layernorm.weight.dtype == layer.self_attn.q_proj.lora_A.dtype == torch.float32
    out = []
    for m in (a, b):
        with torch.autocast("cpu", torch.bfloat16):
            logits = m(input_ids=IDS).logits
        logits.float().square().mean().backward()
        out.append((logits, [p.grad for p in lora.adapter_parameters(m)]))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(x, y) for x, y in zip(out[0][1], out[1][1]))
    merged = lora.merged_state_dict(b.state_dict(), lora.scalings(b))
    assert all(v.dtype == torch.float32 for v in merged.values())


def test_gspo_activation_checkpointing_changes_nothing(tmp_path):
    """train_rl --activation-checkpointing (the one-GPU LoRA recipe's): the same rows and the same merged export,
    bit for bit, with adapters on the top 2 layers and the trunk cache below them."""
    from test_rl import run, weights

    args = ("--max-steps", "2", "--lr", "1e-2", "--train-layers", "2", *LORA)
    a = run(tmp_path, "plain", *args)
    b = run(tmp_path, "ac", *args, "--activation-checkpointing")
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))}
    assert [drop(r) for r in a] == [drop(r) for r in b]
    assert any(r["clip_frac_low/u1"] + r["clip_frac_high/u1"] > 0 for r in a)  # the first update moved the policy
    wa, wb = weights(tmp_path / "plain"), weights(tmp_path / "ac")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_the_lora_bench_runs_at_tiny_size(tmp_path, synthetic_dir, capsys):
    """bench/lora.py on the tiny policy, 2 configurations × 2 steps: one row each, with the trained parameter count
    worked out by hand (rank 16 on the 4 layers: 16 × 2432 a layer × 4 = 155,648)."""
    import sys
    from pathlib import Path

    from tagpr import lamp, prompts, synthetic
    from tagpr.files import write_jsonl
    from tagpr.records import RLPrompt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import lora as bench_lora  # bench/lora.py

    write_jsonl(tmp_path / "sft.jsonl", [r.to_json() for r in synthetic.sft_records(synthetic_dir, ("LaMP_2",), k=2)])
    split = lamp.load_split(synthetic_dir, "LaMP_2", "train")
    data = [
        RLPrompt(q.id, "LaMP_2", q.user_id, prompts.build_prompt("LaMP_2", q, 2), split.golds[q.id])
        for q in split.questions[:16]
    ]
    write_jsonl(tmp_path / "p.jsonl", [r.to_json() for r in data])
    argv = ["--policy", "tiny", "--sft", str(tmp_path / "sft.jsonl"), "--prompts", str(tmp_path / "p.jsonl")]
    bench_lora.main([*argv, "--steps", "2", "--precision", "fp32", "--configs", "top4,lora16-top4"])
    rows = [
        line.split("|")[1:-1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| top4") or line.startswith("| lora16")
    ]
    assert [r[0].strip() for r in rows] == ["top4", "lora16-top4"]
    assert rows[1][1].strip() == "0.16M"  # 155,648
    assert all(float(x) > 0 for r in rows for x in r[2:])


def test_a_checkpoint_of_other_trained_parameters_is_refused(tmp_path):
    """A checkpoint holds only what its run trained: resuming it with more trained layers, or with adapters, stops
    with one line that names the checkpoint, a missing tensor and the flags, and leaves the run's files as they
    were."""
    import json

    import train_sft
    from tagpr.config import ConfigError

    out = tmp_path / "sft"
    base = ["--preset", "tiny", "--out", str(out), "--max-steps", "2", "--save-every", "1"]
    train_sft.main([*base, "--max-steps", "1", "--train-layers", "2", "--resume", ""])
    before = {p.name: p.read_bytes() for p in (out / "config.json", out / "metrics.jsonl")}
    for flags, missing in ((["--train-layers", "3"], "layers.1.self_attn.q_proj.weight"), (LORA, "lora_A")):
        with pytest.raises(ConfigError, match=rf"step_00000001: this checkpoint has no \S*{missing} .*--train-layers"):
            train_sft.main([*base, *flags])
        assert {p.name: p.read_bytes() for p in (out / "config.json", out / "metrics.jsonl")} == before
    assert json.loads(before["config.json"])["train_layers"] == 2


def test_lora_vs_layers_arms_parse_and_refuse():
    """scripts/lora_vs_layers.py's arm specs: name:layers:rank:steps:lr, and a clear error naming the flag."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import lora_vs_layers

    from tagpr import config

    got = lora_vs_layers.arms("top16:16:0:12:2e-4,lora:-1:16:10:1e-3", "--sft-arms")
    assert got == [("top16", 16, 0, 12, 2e-4), ("lora", -1, 16, 10, 1e-3)]
    for bad in ("lora:-1:16:10", "lora:all:16:10:1e-3", "lora:-1:16:0:1e-3", "a/b:4:0:2:1e-4", "x:0:0:2:1e-4"):
        with pytest.raises(config.ConfigError, match="--sft-arms"):
            lora_vs_layers.arms(bad, "--sft-arms")


@pytest.mark.slow
def test_lora_vs_layers_runs_each_arm_as_it_says(tmp_path):
    """At tiny size: each SFT arm trains what its spec says (read from its config.json), is scored before any
    GSPO step, and the RL arm starts from the named SFT arm; compare_runs reads the arms."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "cmp"
    tiny = ["--policy", "tiny", "--sft-batch", "4", "--prmu-steps", "2", "--rl-prompts", "2", "--rl-group", "2"]
    tiny += ["--rl-max-new", "8", "--eval-questions", "4", "--seeds", "0"]
    cmd = [sys.executable, "scripts/lora_vs_layers.py", "--run", str(run), *tiny]
    cmd += ["--sft-arms", "top:2:0:2:1e-3,lora:-1:4:2:1e-3", "--rl-arms", "lorarl:-1:4:1:1e-3", "--rl-from", "lora"]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cfg = lambda path: json.loads((run / path / "config.json").read_text())
    assert cfg("top/sft")["train_layers"] == 2 and cfg("top/sft")["lora_rank"] == 0
    assert cfg("lora/sft")["train_layers"] == -1 and cfg("lora/sft")["lora_rank"] == 4
    assert cfg("lora+lorarl/rl_seed0")["policy"] == str(run / "lora" / "sft" / "model")
    assert cfg("lora+lorarl/rl_seed0")["lora_rank"] == 4 and cfg("lora+lorarl/rl_seed0")["max_steps"] == 1
    for arm in ("top", "lora"):
        assert (run / arm / "rl_seed0" / "held_out_step0.json").is_file()
    assert (run / "lora+lorarl" / "rl_seed0" / "held_out_step1.json").is_file()
    timings = json.loads((run / "timings.json").read_text())
    assert {"sft top", "sft lora", "rl lora+lorarl seed 0"} <= set(timings)
    c = subprocess.run(
        [sys.executable, "scripts/compare_runs.py", "--a", str(run / "lora"), "--b", str(run / "lora+lorarl")],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert c.returncode == 0 and "| LaMP_2 accuracy |" in c.stdout, c.stderr
