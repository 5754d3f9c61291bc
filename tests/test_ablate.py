"""scripts/ablate.py: every row changes what it claims to change (read back from the runs' own files, tiny size),
and the report's paired differences worked out by hand on planted files."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def held_out(path: Path, greedy: dict, samples: dict, parsed: dict) -> None:
    """A train_rl held_out_step<N>.json: each question's greedy score, its samples' scores and parse flags."""
    path.parent.mkdir(parents=True, exist_ok=True)
    per = {
        i: {
            "greedy": greedy[i],
            "greedy_parsed": True,
            "sampled": sum(samples[i]) / len(samples[i]),
            "samples": samples[i],
            "samples_parsed": parsed[i],
        }
        for i in greedy
    }
    path.write_text(json.dumps({"held_out": per, "swap": {i: {"greedy": 0.0} for i in greedy}}))


def test_report_differences_by_hand(tmp_path):
    """Two seeds, four LaMP-2 questions: full and w/o Tag planted; the differences are worked out here."""
    import ablate

    from tagpr import ablation_report

    ids = ["q0", "q1", "q2", "q3"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval_prompts.jsonl").write_text(
        "".join(json.dumps({"id": i, "task": "LaMP_2"}) + "\n" for i in ids)
    )
    T, F = True, False
    # full: seed 0 right on q0, q1; seed 1 right on q0. Samples: two a question.
    plant = {
        ("full", 0): ({"q0": 1, "q1": 1, "q2": 0, "q3": 0}, {"q0": [1, 1], "q1": [1, 0], "q2": [0, 0], "q3": [0, 0]}),
        ("full", 1): ({"q0": 1, "q1": 0, "q2": 0, "q3": 0}, {"q0": [1, 0], "q1": [1, 1], "q2": [0, 0], "q3": [1, 0]}),
        ("no_tag", 0): ({"q0": 0, "q1": 0, "q2": 0, "q3": 0}, {"q0": [0, 0], "q1": [0, 0], "q2": [0, 0], "q3": [0, 0]}),
        ("no_tag", 1): ({"q0": 1, "q1": 0, "q2": 0, "q3": 0}, {"q0": [1, 0], "q1": [0, 0], "q2": [0, 0], "q3": [0, 0]}),
    }
    # parse flags: full parses everything; w/o Tag parses only the right answers and q2's first sample
    for (name, s), (g, smp) in plant.items():
        parsed = {i: [T, T] for i in ids} if name == "full" else {i: [bool(x) for x in smp[i]] for i in ids}
        if name == "no_tag":
            parsed["q2"] = [T, F]
        held_out(tmp_path / "rl" / name / f"seed{s}" / "held_out_step8.json", g, smp, parsed)
    held_out(
        tmp_path / "rl" / "full" / "seed0" / "held_out_step0.json", *plant[("no_tag", 0)], {i: [F, F] for i in ids}
    )
    a = SimpleNamespace(rl_steps=8, guided_steps=4)
    rows = {r.name: r for r in ablate.rows_of(a)}
    scores = {n: ablation_report.row_scores(tmp_path, rows[n], [0, 1]) for n in ("full", "no_tag", "no_rl")}
    d = ablation_report.difference(scores["full"], scores["no_tag"], [0, 1], ids, 1)
    # greedy, per question the mean over seeds: full [1, .5, 0, 0], w/o Tag [.5, 0, 0, 0] → Δ = [−.5, −.5, 0, 0]
    assert d["greedy"][0] == pytest.approx(-0.25)
    # sampled: full [(1+.5)/2, (.5+1)/2, 0, (0+.5)/2] = [.75, .75, 0, .25]; w/o Tag [.25, 0, 0, 0] → mean Δ = −1.5/4
    assert d["sampled"][0] == pytest.approx(-0.375)
    # parse share (4 samples a question, seeds pooled): full 1 everywhere; w/o Tag q0 1/4 (seed 1's right one),
    # q1 0, q2 2/4 (each seed's first), q3 0
    assert d["parsed"][0] == pytest.approx((-0.75 - 1 - 0.5 - 1) / 4)
    # among parsed, pooled: full 7 right of 16; w/o Tag 1 right of 3 parsed (q0's one, q2's two wrong)
    assert d["among"][0] == pytest.approx(1 / 3 - 7 / 16)
    lo, hi = d["sampled"][1:]
    assert lo <= -0.375 < hi < 0  # every question's Δ ≤ 0, and only q2's is 0
    assert ablation_report.verdict(d["sampled"]) == "reproduced (lower)"
    assert ablation_report.verdict((0.1, 0.02, 0.2)) == "the other way (higher)"
    # each seed's own sampled difference: seed 0 full (1 + .5 + 0 + 0) / 4 = .375 against 0; seed 1 full
    # (.5 + 1 + 0 + .5) / 4 = .5 against w/o Tag's .5 / 4 = .125: both −.375
    assert d["by_seed"] == pytest.approx([-0.375, -0.375])
    assert ablation_report.verdict(d["sampled"], d["by_seed"]) == "reproduced (lower)"
    assert ablation_report.verdict((-0.04, -0.07, -0.01), [-0.08, 0.02, -0.06]) == "lower, not on every seed"
    assert ablation_report.verdict((0.04, 0.01, 0.07), [0.08, -0.02]) == "higher, not on every seed"
    assert ablation_report.verdict((0.01, -0.02, 0.04), [0.08, 0.02]) == "not separable at this scale"
    # w/o RL: the SFT policy's step-0 file, the same for every seed
    assert scores["no_rl"][0] == scores["no_rl"][1]
    assert scores["no_rl"][0]["greedy"] == {i: 0 for i in ids}
    # the table's row for w/o Tag carries those numbers
    md = ablation_report.table(tmp_path, [rows["full"], rows["no_tag"]], scores, [0, 1], "LaMP_2", ids, "1")
    line = next(x for x in md.splitlines() if x.startswith("| w/o Tag"))
    assert "| 0.125 | 0.062 | 0.188 | 0.333 |" in line  # greedy .5/4, sampled .25/4, parse 3/16, among 1/3
    assert all(f"| {x} [" in line for x in ("-0.250", "-0.375", "-0.812", "-0.104")), line
    assert "| -0.375 / -0.375 | reproduced (lower) |" in line
    # a row whose reference is not full: the question-only rows, planted as full's (reference) and w/o Tag's
    # numbers, while full itself is replaced by w/o Tag's: the w/o UE row's Δ is against its own reference
    q = {"full": scores["no_tag"], "rm_question_only": scores["full"], "rm_question_only_no_ue": scores["no_tag"]}
    rs = [rows[n] for n in q]
    md = ablation_report.table(tmp_path, rs, q, [0, 1], "LaMP_2", ids, "3q")
    line = next(x for x in md.splitlines() if x.startswith("| PRMU w/o UE, question only"))
    assert all(f"| {x} [" in line for x in ("-0.250", "-0.375", "-0.812", "-0.104")), line
    assert "reproduced (lower) (Δ vs PRMU, question only)" in line
    line = next(x for x in md.splitlines() if x.startswith("| PRMU, question only"))
    assert "| +0.250 [" in line and "the other way (higher)" in line  # against full: w/o Tag's numbers here


def test_rows_all_is_the_papers_table_and_references_come_along():
    """--rows all: Tables 1 and 3 and the weights, not the extra question-only rows; a named row brings full and its
    own reference; an unknown name is refused with the known ones."""
    import ablate

    from tagpr.config import ConfigError

    a = lambda rows: SimpleNamespace(rows=rows, rl_steps=8, guided_steps=4)
    names = [r.name for r in ablate.selected_rows(a("all"))]
    assert names[:3] == ["full", "no_sft", "no_rl"] and len(names) == 14  # 8 of Tables 1 and 3, 6 weights
    assert not any(n.startswith("rm_question_only") for n in names)
    got = [r.name for r in ablate.selected_rows(a("rm_question_only_no_ue"))]
    assert got == ["full", "rm_question_only", "rm_question_only_no_ue"]
    assert [r.name for r in ablate.selected_rows(a("no_tag,no_tag"))] == ["full", "no_tag"]
    with pytest.raises(ConfigError, match="--rows no_such: unknown no_such; expected some of full, no_sft"):
        ablate.selected_rows(a("no_such"))


def test_only_the_whole_table_lands_in_docs():
    """--report auto: docs/ablations/report.md for every row with 3 seeds or more; a one-seed table, --quick or
    --rows writes only the run's own report.md."""
    import ablate

    assert ablate.auto_report(False, "all", [0, 1, 2]) == "docs/ablations/report.md"
    assert ablate.auto_report(False, "all", [3, 4, 5, 6]) == "docs/ablations/report.md"
    assert ablate.auto_report(False, "all", [0]) == ""  # `--seeds 0`: seed 0's table
    assert ablate.auto_report(False, "all", [0, 1]) == ""
    assert ablate.auto_report(True, "all", [0, 1, 2]) == ""
    assert ablate.auto_report(False, "full,no_tag", [0, 1, 2]) == ""


@pytest.mark.slow
def test_every_row_changes_what_it_claims(tmp_path):
    """Every row at tiny size, one seed: each run's config.json and metrics.jsonl say the row did what it claims."""
    import ablate

    names = [r.name for r in ablate.rows_of(SimpleNamespace(rl_steps=2, guided_steps=1))]
    run = tmp_path / "abl"
    tiny = ["--policy", "tiny", "--sft-steps", "2", "--sft-batch", "4", "--sft-train-layers", "2", "--prmu-steps", "2"]
    tiny += ["--rl-steps", "2", "--rl-prompts", "2", "--rl-group", "2", "--rl-max-new", "8", "--eval-questions", "4"]
    cmd = [sys.executable, "scripts/ablate.py", "--run", str(run), "--quick", "--rows", ",".join(names), *tiny]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    check_rows(run)


def check_rows(run: Path) -> None:
    """What every row claims, read from its files."""
    import ablate

    from tagpr import prmu

    rl = lambda name: run / "rl" / name / "seed0"
    cfg = lambda name: json.loads((rl(name) / "config.json").read_text())
    lines = lambda name: (rl(name) / "metrics.jsonl").read_text().splitlines()
    rows = lambda name: [r for r in map(json.loads, lines(name)) if "stage" in r]  # training steps, not scorings
    sft, base = str(run / "sft" / "model"), "tiny"
    # full: from the SFT policy, PRMU, one guided step then one exploratory (no R_tag, no R_p there)
    assert cfg("full")["policy"] == sft and cfg("full")["prmu"] == str(run / "prmu" / "full" / "model")
    assert [r["stage"] for r in rows("full")] == ["guided", "exploratory"]
    guided, exploratory = rows("full")
    assert guided["reward/personal"] != 0.0 and guided["reward/tag"] != 0.0  # garbage earns R_tag's penalties
    assert exploratory["reward/personal"] == exploratory["reward/tag"] == 0.0
    assert (rl("full") / "held_out_step0.json").is_file()  # the SFT policy's scores: the w/o RL row
    # scored as the tables need (greedy, samples with the parse split), without the swap control
    scored = json.loads((rl("no_tag") / "held_out_step2.json").read_text())
    assert "swap" not in scored and all("samples_parsed" in v for v in scored["held_out"].values())
    assert not (run / "rl" / "no_rl").exists()
    assert cfg("no_sft")["policy"] == base
    assert cfg("no_tag")["w_tag"] == 0.0 and rows("no_tag")[0]["reward/tag"] == 0.0
    assert cfg("no_prmu")["prmu"] == "none" and rows("no_prmu")[0]["reward/personal"] == 0.0
    assert [r["stage"] for r in rows("one_stage")] == ["guided", "guided"]
    # Table 3's reward models: untrained (no step: its user rows and backbone are the seeded initial ones), w/o UE
    prmu_cfg = lambda kind: json.loads((run / "prmu" / kind / "config.json").read_text())
    assert prmu_cfg("untrained")["max_steps"] == 0 and prmu_cfg("no_ue")["use_user_embeddings"] is False
    assert prmu_cfg("full")["use_user_embeddings"] is True
    assert cfg("untrained_rm")["prmu"] == str(run / "prmu" / "untrained" / "model")
    assert cfg("no_ue")["prmu"] == str(run / "prmu" / "no_ue" / "model")
    # Table 3, question only: reward models that read each prompt without its profile, with and without user rows
    for kind, ue in (("question_only", True), ("question_only_no_ue", False)):
        assert prmu_cfg(kind)["profile_in_input"] is False and prmu_cfg(kind)["use_user_embeddings"] is ue
        assert json.loads((run / "prmu" / kind / "model" / "prmu.json").read_text())["profile_in_input"] is False
    assert prmu_cfg("full")["profile_in_input"] is True and prmu_cfg("no_ue")["profile_in_input"] is True
    for name, kind in (("rm_question_only", "question_only"), ("rm_question_only_no_ue", "question_only_no_ue")):
        assert cfg(name)["prmu"] == str(run / "prmu" / kind / "model")
        assert rows(name)[0]["reward/personal"] != 0.0
        assert "reads each prompt without its profile" in (run / "logs" / f"rl_{name}_0.log").read_text()
    from safetensors.torch import load_file

    users = json.loads((run / "prmu" / "untrained" / "model" / "users.json").read_text())
    torch.manual_seed(prmu_cfg("untrained")["seed"])  # as train_prmu: the seed, the backbone (forked RNG), the rows
    backbone, _ = prmu.load_backbone("tiny", prmu_cfg("untrained")["seed"])
    fresh = prmu.PRMU(backbone, len(users), True).user_embeddings.weight.detach()
    saved = lambda kind: next(iter(load_file(run / "prmu" / kind / "model" / "user_embeddings.safetensors").values()))
    assert torch.equal(saved("untrained"), fresh)
    assert not torch.equal(saved("full"), fresh)  # the trained model's rows moved
    # the weights: one changed per row, in the config and in the logged reward (R = R_v + w_f R_f + R_rep +
    # w_tag R_tag + w_p R_p, so the step's mean reward is that sum of the parts' means)
    for w, v in ablate.DEFAULT_WEIGHTS.items():
        for times in (0.5, 2):
            name = f"{w}_x{times:g}"
            c = cfg(name)
            assert c[w] == v * times and all(c[o] == ov for o, ov in ablate.DEFAULT_WEIGHTS.items() if o != w)
            r = rows(name)[0]
            want = r["reward/verifiable"] + c["w_format"] * r["reward/format"] + r["reward/repetition"]
            want += c["w_tag"] * r["reward/tag"] + c["w_personal"] * r["reward/personal"]
            assert r["reward"] == pytest.approx(want, abs=1e-9), name
    report = (run / "report.md").read_text()
    for r in ablate.rows_of(SimpleNamespace(rl_steps=2, guided_steps=1)):
        assert f"| {r.label} |" in report, r.label


def test_the_gpu_recipe_prints_every_stage_at_the_trainers_preset(tmp_path):
    """The README's GPU recipe, --dry: every trainer under torchrun on 8 ranks at its qwen3-8b preset with the
    user's folders, each row's own flags, the base model scored on the LaMP folder (no synthetic floor or oracle);
    nothing run, nothing written but the run folder. Missing folders or files are named before anything runs."""
    data = tmp_path / "data"
    data.mkdir()
    for f in ("sft.jsonl", "prp.jsonl", "pqp.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl", "tags.json"):
        (data / f).write_text("{}\n")
    run = tmp_path / "abl"
    gpu = ["--preset", "qwen3-8b", "--data", str(data), "--lamp-dir", "/data/LaMP", "--run", str(run)]
    models = ["--policy", "/models/Qwen3-8B", "--prmu-backbone", "/models/RM"]
    cmd = [sys.executable, "scripts/ablate.py", *gpu, *models, "--rows", "no_tag,untrained_rm", "--seeds", "0,1"]
    p = subprocess.run([*cmd, "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [x[2:].split() for x in p.stdout.splitlines() if x.startswith("$ ")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    trainers = [x for x in lines if "evaluate.py" not in x]
    # SFT, two reward models (full, untrained), 3 rows × 2 seeds of GSPO; then the base model
    assert [x[5] for x in trainers] == ["train_sft.py"] + ["train_prmu.py"] * 2 + ["train_rl.py"] * 6
    flag = lambda x, f: x[len(x) - x[::-1].index(f)]  # the last one given: argparse's
    for x in trainers:
        assert x[:5] == torchrun and x[6:8] == ["--preset", "qwen3-8b"], x
    sft, prmu_full, prmu_untrained, *rl = trainers
    assert flag(sft, "--model") == "/models/Qwen3-8B" and flag(sft, "--max-steps") == "1750"
    assert flag(sft, "--sft") == str(data / "sft.jsonl") and "--micro-batch" not in sft  # the preset's
    assert flag(prmu_full, "--backbone") == "/models/RM" and flag(prmu_untrained, "--max-steps") == "0"
    assert [flag(x, "--out").split("/")[-2:] for x in rl] == [
        [r, f"seed{s}"] for s in (0, 1) for r in ("full", "no_tag", "untrained_rm")
    ]
    for x in rl:
        assert flag(x, "--policy") == str(run / "sft" / "model") and flag(x, "--precision") == "bf16"
        assert flag(x, "--max-steps") == "64" and flag(x, "--global-batch") == "128" and "--mini-batches" not in x
    assert flag(rl[1], "--w-tag") == "0.0" and "--w-tag" not in rl[0]
    assert flag(rl[2], "--prmu") == str(run / "prmu" / "untrained" / "model")
    assert "--eval-before" in rl[0] and "--eval-before" not in rl[3]  # full seed 0 scores the SFT policy
    (base,) = [x for x in lines if "evaluate.py" in x]
    assert flag(base, "--lamp-dir") == "/data/LaMP" and flag(base, "--methods") == "zero-shot"
    assert sorted(x.name for x in run.iterdir()) == []  # nothing ran
    # what is missing is named before anything runs
    p = subprocess.run(
        [sys.executable, "scripts/ablate.py", *gpu, "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode != 0 and "--policy smollm2-135m: --trainer-preset qwen3-8b needs a model folder" in p.stderr
    (data / "pqp.jsonl").unlink()
    p = subprocess.run([*cmd, "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and f"--data {data}: no pqp.jsonl" in p.stderr
