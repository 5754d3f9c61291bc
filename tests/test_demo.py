"""scripts/demo.py: the whole pipeline, wired end to end on the tiny model; killed in the RL stage, it resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pipeline_runs_and_resumes_after_a_kill(tmp_path):
    run = tmp_path / "demo"
    args = [
        sys.executable,
        "scripts/demo.py",
        "--run",
        str(run),
        "--policy",
        "tiny",
        "--sft-steps",
        "2",
        "--sft-batch",
        "4",
        "--sft-train-layers",
        "2",
        "--prmu-steps",
        "2",
        "--rl-steps",
        "4",
        "--rl-prompts",
        "2",
        "--rl-group",
        "2",
        "--rl-max-new",
        "8",
        "--eval-questions",
        "4",
        "--rl-eval-every",
        "2",
        "--base-methods",
        "zero-shot",
        "--seeds",
        "0,1",
    ]
    # as a user who runs the venv's python without activating it: no venv on PATH (so no `torchrun` there)
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d != venv_bin)
    env = {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "PATH": path, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = run / "rl_seed0" / "ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpt.is_dir() and any(ckpt.glob("step_*"))) and p.poll() is None:
        time.sleep(0.5)
    assert p.poll() is None, "the demo ended before its first RL checkpoint"
    os.killpg(p.pid, signal.SIGKILL)  # the driver and its torchrun workers, mid-RL
    p.wait()
    assert not (run / "rl_seed0" / "model").exists()
    before = (run / "rl_seed0" / "metrics.jsonl").read_text().splitlines()  # the rows written before the kill
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # a resume, not a restart: the rerun says where it resumed, and the rows up to there are the killed run's own
    said = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", (run / "logs" / "train_rl_seed0.log").read_text())
    assert said and int(said[-1][1]) >= 2 and int(said[-1][0]) == int(said[-1][1]), said
    resumed = int(said[-1][1])
    kept = [line for line in before if line.endswith("}") and json.loads(line)["step"] <= resumed]  # (not a torn one)
    assert len(kept) == resumed + 1  # steps 0 … N, each written once before the kill
    assert (run / "rl_seed0" / "metrics.jsonl").read_text().splitlines()[: len(kept)] == kept  # byte for byte
    assert "== 1 build_data: done already" in done.stdout and "== 2 train_sft: done already" in done.stdout
    rows = [json.loads(line) for line in (run / "rl_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # one uninterrupted-looking run (0: before training)
    assert [
        r["step"] for r in (json.loads(line) for line in (run / "rl_seed1" / "metrics.jsonl").read_text().splitlines())
    ] == [1, 2, 3, 4]  # seed 0's step 0 is the SFT row for all
    assert [k for k in rows[2] if k.startswith("eval/") and "among_parsed" not in k] == [
        "eval/held_out/LaMP_2/accuracy_greedy",
        "eval/held_out/LaMP_2/parsed_greedy",
        "eval/held_out/LaMP_2/accuracy_sampled",
        "eval/held_out/LaMP_2/parsed_sampled",
        "eval/swap/LaMP_2/accuracy_greedy",
        "eval/swap/LaMP_2/parsed_greedy",
    ]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000004"]  # --keep 1: the latest checkpoint only
    report = (run / "report.md").read_text()
    for row in (
        "No-profile floor",
        "Base model: Zero-shot",
        "After SFT (tagged reasoning)",
        "After SFT + RL, seed 0",
        "After SFT + RL, seed 1",
        "After SFT + RL, mean of seeds 0,1",
        "Oracle ceiling",
    ):
        assert f"| {row}" in report, row
    # the SFT row is the start policy's held-out scores, the seeds' rows their last ones: means of per-question scores
    sft = json.loads((run / "rl_seed0" / "held_out_step0.json").read_text())
    rl1 = json.loads((run / "rl_seed1" / "held_out_step4.json").read_text())
    mean = lambda d, k: sum(v[k] for v in d.values()) / len(d)
    assert len(sft["held_out"]) == len(sft["swap"]) == 4
    sft_row = next(line for line in report.splitlines() if line.startswith("| After SFT (tagged"))
    assert sft_row.split(" | ")[1].startswith(f"{mean(sft['held_out'], 'greedy'):.3f} [")
    assert sft_row.split(" | ")[2].startswith(f"{mean(sft['held_out'], 'sampled'):.3f} [")
    assert sft_row.split(" | ")[3].startswith(f"{mean(sft['swap'], 'greedy'):.3f} [")
    seed1 = next(line for line in report.splitlines() if line.startswith("| After SFT + RL, seed 1"))
    assert seed1.split(" | ")[2].startswith(f"{mean(rl1['held_out'], 'sampled'):.3f} [")
    assert rows[-1]["eval/held_out/LaMP_2/accuracy_sampled"] == pytest.approx(
        mean(json.loads((run / "rl_seed0" / "held_out_step4.json").read_text())["held_out"], "sampled")
    )
    assert "### What the table shows" in report and "- SFT + RL > SFT, sampled: gain" in report
    assert "## Data (build_data.py manifest)" in report and (run / "curves.png").stat().st_size > 1000
    # every RL prompt's user has preference pairs; PRMU trained the embeddings of those it did not hold out, and
    # the RL run counted exactly those
    emitted = json.loads((run / "data" / "manifest.json").read_text())["stages"]["7_emit"]["rl_prompts"]
    assert all(c["user_has_pairs"] == c["written"] > 0 for c in emitted.values()), emitted
    users = json.loads((run / "prmu" / "model" / "users.json").read_text())
    prompts = [json.loads(line) for line in (run / "data" / "rl_prompts.jsonl").read_text().splitlines()]
    known = sum(p["user_id"] in users for p in prompts)
    rl_cfg = json.loads((run / "rl_seed0" / "config.json").read_text())
    assert rl_cfg["prompts_with_trained_user"] == known > 0
    # the old log-probs: the sampler's in fp32, a recomputation in bf16 (where they differ by more than ε)
    assert rl_cfg["old_logp"] == {"fp32": "sampler", "bf16": "recompute"}[rl_cfg["precision"]]
    assert f"old log-probs: {rl_cfg['old_logp']}" in report
    timings = json.loads((run / "timings.json").read_text())
    assert {
        "1 build_data",
        "2 train_sft",
        "3 train_prmu",
        "4 train_rl seed 0",
        "4 train_rl seed 1",
        "5 evaluate base",
    } == set(timings)


def test_malloc_env(monkeypatch):
    """--malloc: system → nothing; auto → jemalloc preloaded (after any LD_PRELOAD already set) with its pages
    kept, or nothing where the machine has none; jemalloc where there is none → a clear error."""
    import ctypes.util

    from tagpr import config, stages

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    monkeypatch.setenv("LD_PRELOAD", "libfoo.so")
    assert stages.malloc_env("system") == {}
    assert stages.malloc_env("auto") == {
        "LD_PRELOAD": "libfoo.so libjemalloc.so.2",
        "MALLOC_CONF": "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1",
    }
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert stages.malloc_env("auto") == {}
    with pytest.raises(config.ConfigError, match="no libjemalloc"):
        stages.malloc_env("jemalloc")


def test_a_killed_stage_says_it_was_killed_and_what_to_do(tmp_path):
    """A stage whose process the kernel killed (a lone process: exit −9; under torchrun: its summary names a rank's
    exitcode −9) stops the script with the out-of-memory hint; any other failure, or exit code −90, without it."""
    from tagpr import stages

    def failure(code: str) -> str:
        with pytest.raises(SystemExit) as e:
            stages.run([sys.executable, "-c", code], tmp_path / "stage.log")
        return str(e.value)

    lone = failure("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert "exit -9" in lone and "SIGKILL" in lone and "--eval-batch 24" in lone
    ranks = failure("print('  exitcode  : -9 (pid: 3148)  (SIGKILL)'); raise SystemExit(1)")
    assert "exit 1" in ranks and "out-of-memory killer" in ranks
    for code in ("raise SystemExit(1)", "print('  exitcode  : -90 (pid: 3148)'); raise SystemExit(1)"):
        assert "SIGKILL" not in failure(code) and "stage failed (exit 1)" in failure(code)
    assert "exitcode  : -9 (pid: 3148)" in (tmp_path / "stage.log").read_text()  # the stage's output is kept


def test_lora_flags_reach_the_trainers_and_the_report(tmp_path):
    """--sft-lora-rank / --rl-lora-rank: the stage commands carry --lora-rank R when R > 0 and no LoRA flag at 0
    (the trainers' default), so a run folder made before the flags resumes with the same commands; the report's
    recipe line says what each stage trained."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo import DemoConfig

    from tagpr import stages
    from tagpr.demo_report import trained

    def lora_of(cmd):
        return [cmd[i + 1] for i, x in enumerate(cmd) if x.startswith("--lora")] if "--lora-rank" in cmd else []

    plain = DemoConfig()
    sft = stages.sft_cmd(plain, tmp_path, tmp_path / "sft", "bf16")
    rl = stages.rl_cmd(plain, "p", "r", tmp_path, tmp_path / "rl", 0, "bf16", "recompute")
    assert not any(x.startswith("--lora") for x in sft + rl)
    a = DemoConfig(sft_lora_rank=16, rl_lora_rank=8, sft_train_layers=-1)
    assert lora_of(stages.sft_cmd(a, tmp_path, tmp_path / "sft", "bf16")) == ["16"]
    rl = stages.rl_cmd(a, "p", "r", tmp_path, tmp_path / "rl", 0, "bf16", "recompute")
    assert lora_of(rl) == ["8"] and rl[rl.index("--train-layers") + 1] == "4"
    assert trained(16) == "top 16 layers" and trained(-1) == "all layers"
    assert trained(-1, 16) == "LoRA r = 16 on all layers" and trained(4, 8) == "LoRA r = 8 on the top 4 layers"


def test_gain_curve_by_hand(tmp_path):
    """The report's gain-against-steps table on two seeds and four questions worked out by hand: the per-seed
    gains, their spread, the verdict, and the GSPO time to the step (held-out scoring excluded)."""
    from tagpr import demo_report

    def scores(greedy, sampled):
        return {
            "held_out": {f"q{i}": {"greedy": g, "sampled": s} for i, (g, s) in enumerate(zip(greedy, sampled))},
            "swap": {f"q{i}": {"greedy": 0.0} for i in range(4)},
        }

    files = {
        0: {0: scores([1, 0, 1, 0], [0, 0.5, 1, 0]), 2: scores([1, 0, 1, 0], [0.5, 0.5, 1, 0.5])},
        1: {2: scores([0, 0, 1, 1], [0, 1, 1, 0])},
    }
    for seed, steps in files.items():
        d = tmp_path / f"rl_seed{seed}"
        d.mkdir()
        for step, sc in steps.items():
            (d / f"held_out_step{step}.json").write_text(json.dumps(sc))
        t = 10.0 * (seed + 1)
        rows = [{"step": 0, "time/held_out": 99.0}] + [
            {
                "step": s,
                "time/rollout": t,
                "time/reward": 1.0,
                "time/old_logp": 2.0,
                "time/update": 3.0,
                **({"time/held_out": 99.0} if s == 2 else {}),
            }
            for s in (1, 2, 3)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = demo_report.gain_curve(tmp_path, [0, 1]).splitlines()
    assert len(table) == 3  # header, rule, step 2 (step 0 is SFT's own row)
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    # GSPO time to step 2: seed 0 (10+1+2+3)·2 = 32, seed 1 (20+1+2+3)·2 = 52 → 42
    assert cells[:2] == ["2", "42"]
    # sampled: seed 0 gains (.5+0+0+.5)/4 = .25, seed 1 (0+.5+0+0)/4 = .125 → mean .1875 > spread .125, interval > 0
    assert cells[2].startswith("+0.188 [+0.") and cells[3:6] == ["+0.250, +0.125", "0.125", "yes"]
    # greedy: seed 0 gains 0, seed 1 (−1+0+0+1)/4 = 0 → no gain, spread 0: not shown
    assert cells[6].startswith("+0.000") and cells[7:10] == ["+0.000, +0.000", "0.000", "no"]


def test_parse_split_by_hand(tmp_path):
    """The report's parse split on planted held-out files (3 questions, 2 samples, SFT and two seeds), worked out
    by hand: parse shares, the score among parsed answers pooled over seeds, and the sampled gain cut into its
    parse-rate and decision parts."""
    from tagpr import demo_report

    def planted(name, samples, parsed):
        per = {
            f"q{i}": {"greedy": 0.0, "sampled": sum(s) / len(s), "samples": s, "samples_parsed": p}
            for i, (s, p) in enumerate(zip(samples, parsed))
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"held_out": per, "swap": {q: {"greedy": 0.0} for q in per}}))
        return demo_report.scores_from(path)

    t, f = True, False
    sft = planted("sft", [[1, 0], [0, 0], [1, 1]], [[t, f], [t, t], [t, t]])
    rl = {
        0: planted("a", [[1, 1], [1, 0], [1, 0]], [[t, t], [t, t], [t, f]]),
        1: planted("b", [[0, 0], [1, 1], [1, 1]], [[f, f], [t, t], [t, t]]),
    }
    ids = ["q0", "q1", "q2"]
    # SFT: shares .5, 1, 1 → 5/6; parsed scores 1 + 0 + 0 + 1 + 1 over 5 parsed = .6; sampled .5 = 5/6 · .6
    assert demo_report.parsed_share(sft["split"], ids) == [0.5, 1.0, 1.0]
    assert demo_report.among_parsed(sft["split"], ids) == pytest.approx(0.6)
    g = demo_report.split_gain(sft, rl, [0, 1], ids)
    # RL pooled: shares 2/4, 4/4, 3/4 → .75; parsed scores 2 + 3 + 3 over 9 parsed = 8/9
    assert g["p"] == pytest.approx((5 / 6, 0.75)) and g["a"] == pytest.approx((0.6, 8 / 9))
    assert g["parsed"][0] == pytest.approx(0.75 - 5 / 6) and g["among"][0] == pytest.approx(8 / 9 - 0.6)
    # per seed among parsed: a 4/5 = .8, b 4/4 = 1 → +.2, +.4
    assert g["among_seeds"] == pytest.approx([0.2, 0.4])
    # the parts add up to the sampled gain: RL's sampled mean (.5 + .75 + .75)/3 = 2/3 against SFT's .5
    assert g["from_parsing"] == pytest.approx((0.75 - 5 / 6) * 0.6)
    assert g["from_decision"] == pytest.approx(0.75 * (8 / 9 - 0.6))
    assert g["from_parsing"] + g["from_decision"] == pytest.approx(2 / 3 - 0.5)
    # the intervals hold their estimate
    assert g["parsed"][1] <= g["parsed"][0] <= g["parsed"][2] and g["among"][1] <= g["among"][0] <= g["among"][2]
    cells = demo_report.split_cells(sft["split"], ids).split(" | ")
    assert cells[0].startswith("0.833 [") and cells[1].startswith("0.600 [")
    assert demo_report.split_cells(None, ids) == " | "  # files without the split: empty cells


def test_a_better_decision_needs_the_gain_above_the_seeds_spread(tmp_path):
    """The report's decision verdict, on planted files (4 questions, 2 samples, all parsed; SFT scores 0): seeds
    gaining +1 and +0.5 among parsed answers pool to +0.75 > spread 0.5 → yes; seeds gaining +1 and 0 pool to
    +0.5 < spread 1 → not shown, though every question's pooled difference (≥ 0.5) puts the interval above 0."""
    from types import SimpleNamespace

    from tagpr import demo_report

    def planted(name, scores):
        per = {
            f"q{i}": {"greedy": 0.0, "sampled": x, "samples": [x, x], "samples_parsed": [True, True]}
            for i, x in enumerate(scores)
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"held_out": per, "swap": {q: {"greedy": 0.0} for q in per}}))
        return demo_report.scores_from(path)

    ids = ["q0", "q1", "q2", "q3"]
    a = SimpleNamespace(base_methods="zero-shot")
    base = {"zero-shot": {"LaMP_2": {"accuracy": 0.0}}}
    sft = planted("sft", [0, 0, 0, 0])
    for b_scores, gain, spread, verdict in (([1, 1, 0, 0], 0.75, 0.5, "yes"), ([0, 0, 0, 0], 0.5, 1.0, "not shown")):
        rl = {0: planted("a", [1, 1, 1, 1]), 1: planted("b", b_scores)}
        avg = {k: {i: (rl[0][k][i] + rl[1][k][i]) / 2 for i in ids} for k in ("greedy", "sampled", "swap")}
        line = next(x for x in demo_report.claims(a, base, sft, rl, avg, [0, 1], "LaMP_2", ids) if "two parts" in x)
        assert f"(gain {gain:+.3f} [" in line and f"spread {spread:.3f})" in line, line
        assert line.endswith(
            f"A better decision after RL: {verdict} (needs the interval above 0 and the gain above the spread)."
        )
        assert demo_report.split_gain(sft, rl, [0, 1], ids)["among"][1] > 0


def test_gains_are_improvements_per_task_by_hand(tmp_path):
    """LaMP-3's MAE falls when RL helps: its gain is SFT − RL. And the report finds each question's task in the
    run's eval_prompts.jsonl."""
    from tagpr import demo_report

    sft = {"greedy": {"q0": 2.0, "q1": 1.0}}
    rl = {0: {"greedy": {"q0": 1.0, "q1": 1.0}}, 1: {"greedy": {"q0": 1.0, "q1": 0.0}}}
    g = demo_report.rl_gain(sft, rl, [0, 1], "greedy", ["q0", "q1"], sign=-1)
    # per question SFT − mean RL: 2 − 1 = 1, 1 − .5 = .5 → .75; per seed (1 + 0)/2 = .5 and (1 + 1)/2 = 1
    assert g["gain"] == pytest.approx(0.75) and g["seeds"] == pytest.approx([0.5, 1.0]) and g["spread"] == 0.5
    assert g["lo"] == pytest.approx(0.5) and g["clears"]
    assert demo_report.rl_gain(sft, rl, [0, 1], "greedy", ["q0", "q1"])["gain"] == pytest.approx(-0.75)
    (tmp_path / "data").mkdir()
    rows = [{"id": "b", "task": "LaMP_3"}, {"id": "a", "task": "LaMP_2"}, {"id": "c", "task": "LaMP_3"}]
    (tmp_path / "data" / "eval_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo_report.task_questions(tmp_path, ["c", "a", "b"], "LaMP_2") == {"LaMP_2": ["a"], "LaMP_3": ["b", "c"]}
    assert demo_report.task_questions(tmp_path / "none", ["b", "a"], "LaMP_7") == {"LaMP_7": ["a", "b"]}


def test_results_table_and_claims_by_hand():
    """The report's table and verdicts on planted scores (4 questions, SFT and two seeds), worked out by hand: the
    mean-of-seeds row is the per-question mean over seeds; the sampled gain clears (interval above 0, above the
    spread), the greedy one does not; the swap drop personalizes for RL and not for SFT."""
    from types import SimpleNamespace

    from tagpr import demo_report, metrics

    ids = ["q0", "q1", "q2", "q3"]
    sc = lambda g, s, w: {"greedy": dict(zip(ids, g)), "sampled": dict(zip(ids, s)), "swap": dict(zip(ids, w))}
    sft = sc([1, 0, 1, 0], [0.5, 0.0, 0.5, 0.0], [1, 0, 1, 0])
    rl = {
        0: sc([1, 0, 1, 1], [1.0, 0.5, 1.0, 0.5], [0, 0, 0, 0]),
        1: sc([1, 1, 1, 0], [1.0, 0.5, 0.5, 0.5], [0, 0, 0, 0]),
    }
    base = {m: {"LaMP_2": {"accuracy": 0.25}} for m in ("zero-shot", "floor", "oracle")}
    a = SimpleNamespace(rl_temperature=1.0, eval_samples=2, base_methods="zero-shot")
    table, avg = demo_report.results_table(a, base, sft, rl, {0: 2, 1: 2}, [0, 1], "LaMP_2", ids)
    mean_row = next(line for line in table.splitlines() if line.startswith("| After SFT + RL, mean of seeds 0,1"))
    cells = [c.strip() for c in mean_row.strip("|").split("|")]
    # greedy: per question (1+1)/2, (0+1)/2, 1, (1+0)/2 → 0.75; sampled: 1, .5, .75, .5 → 0.6875; swap 0
    assert cells[1].startswith("0.750 [") and cells[2].startswith("0.688 [") and cells[3].startswith("0.000 [")
    lo, hi = metrics.bootstrap_ci([1.0, 0.5, 1.0, 0.5])
    assert cells[1] == f"0.750 [{lo:.3f}, {hi:.3f}]"
    said = demo_report.claims(a, base, sft, rl, avg, [0, 1], "LaMP_2", ids)
    # sampled: SFT .25, RL .6875 → +.4375; per seed +.5 and +.375, spread .125; every question gains ≥ .5·… > 0
    sampled = next(x for x in said if x.startswith("- SFT + RL > SFT, sampled"))
    assert "gain +0.438" in sampled and "per seed +0.500, +0.375 (spread 0.125): yes" in sampled
    # greedy: SFT .5, RL .75 → +.25; per seed +.25, +.25; but q0 and q2 gain 0: the interval reaches 0 → no
    greedy = next(x for x in said if x.startswith("- SFT + RL > SFT, greedy"))
    assert "gain +0.250" in greedy and greedy.endswith(
        "not shown (needs the interval above 0 and the gain above the spread)."
    )
    assert "- SFT > base: greedy accuracy 0.500 against the best base row's 0.250 (yes)." in said
    swaps = [x for x in said if x.startswith("- Profile swap")]
    assert swaps[0].endswith("(not shown).") and "worsens by 0.000" in swaps[0]  # SFT: swap = greedy here
    assert "worsens by 0.750" in swaps[1] and swaps[1].endswith("(personalizes).")


def test_summary_table_puts_the_tasks_side_by_side_by_hand():
    """The report's Table-1 layout on planted scores: LaMP-2 (accuracy) and LaMP-3 (MAE, lower is better), two
    questions each, SFT and two seeds, two samples a question, all parsed but one. Worked out by hand: each cell, the
    mean-of-seeds row, and the improvement row (for MAE, SFT − RL)."""
    from types import SimpleNamespace

    from tagpr import demo_report

    def sc(greedy, samples, parsed):
        return {
            "greedy": greedy,
            "sampled": {i: sum(x) / len(x) for i, x in samples.items()},
            "swap": {i: 0.0 for i in greedy},
            "split": {i: (samples[i], parsed[i]) for i in samples},
        }

    t, f = True, False
    ok = {i: [t, t] for i in ("a", "b", "c", "d")}
    # a, b: LaMP-2 (accuracy); c, d: LaMP-3 (MAE)
    sft = sc({"a": 1, "b": 0, "c": 2, "d": 0}, {"a": [1, 0], "b": [0, 0], "c": [2, 2], "d": [0, 4]}, ok)
    rl = {
        0: sc({"a": 1, "b": 1, "c": 1, "d": 0}, {"a": [1, 1], "b": [1, 0], "c": [1, 1], "d": [0, 0]}, ok),
        1: sc(
            {"a": 1, "b": 0, "c": 1, "d": 0}, {"a": [1, 1], "b": [0, 0], "c": [1, 4], "d": [0, 0]}, {**ok, "c": [t, f]}
        ),
    }
    base = {
        m: {"LaMP_2": {"accuracy": v}, "LaMP_3": {"MAE": 1.5 - v}}
        for m, v in (("floor", 0.25), ("zero-shot", 0.0), ("oracle", 1.0))
    }
    a = SimpleNamespace(rl_temperature=1.0, eval_samples=2, base_methods="zero-shot")
    greedy, parsed = demo_report.summary_table(
        a, base, sft, rl, [0, 1], {"LaMP_2": ["a", "b"], "LaMP_3": ["c", "d"]}
    ).split("\n\n")
    rows = {
        r.split(" | ")[0].strip("| "): [c.strip() for c in r.strip("|").split("|")[1:]] for r in greedy.splitlines()
    }
    assert greedy.splitlines()[0] == "| model (greedy) | LaMP_2 accuracy | LaMP_3 MAE ↓ |"
    assert rows["No-profile floor"] == ["0.250", "1.250"] and rows["Oracle ceiling"] == ["1.000", "0.500"]
    assert rows["Base model: Zero-shot"] == ["0.000", "1.500"]
    # SFT greedy: LaMP-2 (1 + 0)/2 = .5, LaMP-3 (2 + 0)/2 = 1; the seeds' mean: a 1, b .5 → .75; c 1, d 0 → .5
    assert rows["After SFT"][0].startswith("0.500 [") and rows["After SFT"][1].startswith("1.000 [")
    mean_row = rows["After SFT + RL, mean of seeds 0,1"]
    assert mean_row[0].startswith("0.750 [") and mean_row[1].startswith("0.500 [")
    # improvements: LaMP-2 .75 − .5 = +.25; LaMP-3 SFT − RL = 1 − .5 = +.5
    gains = rows["RL − SFT, paired (improvement)"]
    assert gains[0].startswith("+0.250 [") and gains[1].startswith("+0.500 [")
    rows = {
        r.split(" | ")[0].strip("| "): [c.strip() for c in r.strip("|").split("|")[1:]] for r in parsed.splitlines()
    }
    assert rows["No-profile floor"] == ["", ""]
    # among parsed: SFT LaMP-2 (1+0+0+0)/4 = .25, LaMP-3 (2+2+0+4)/4 = 2; seed 1's LaMP-3 drops its unparsed 4:
    # (1 + 0 + 0)/3 = 1/3; pooled RL LaMP-3: (1+1+0+0 + 1+0+0)/7 = 3/7 → improvement 2 − 3/7 = 1.571
    assert rows["After SFT"][0].startswith("0.250 [") and rows["After SFT"][1].startswith("2.000 [")
    assert rows["After SFT + RL, seed 1"][1].startswith("0.333 [")
    assert rows["After SFT + RL, mean of seeds 0,1"][1].startswith("0.429 [")
    gains = rows["RL − SFT, paired (improvement)"]
    # LaMP-2 pooled RL among parsed: (1+1+1+0 + 1+1+0+0)/8 = .625 → +.375
    assert gains[0].startswith("+0.375 [") and gains[1].startswith("+1.571 [")


def test_preset_long_is_the_recipe_its_test_report_scored():
    """`--preset long` is the recipe of x10, the three-kind run whose test-user report the README cites: its
    header and recipe line, rendered from the preset alone, appear verbatim in docs/demo/x10_3task_bound_test.
    A preset edited away from that recipe (another step count, cap, chain style, task) fails here until a new
    run's report is kept."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo import PRESETS, DemoConfig, old_logp_source

    from tagpr import config
    from tagpr.demo_report import recipe

    a, _ = config.parse(DemoConfig, PRESETS, ["--preset", "long"])
    kept = (ROOT / "docs" / "demo" / "x10_3task_bound_test" / "report.md").read_text()
    assert f"# TagPR demo ({a.policy}, synthetic users ({a.difficulty}), {a.tasks})\n" in kept
    held_out = ", ".join(f"{a.eval_questions} {t}" for t in a.tasks.split(","))
    assert f"({a.eval_split}, disjoint from training): the first {held_out} questions, k = {a.k} " in kept
    assert f"{a.chain_style} chains, bf16 matmuls" in kept
    assert recipe(a, old_logp_source(a, "bf16")) in kept
    assert f"mean of {a.eval_samples})" in kept and a.malloc == "system"


def test_refill_and_stratify_flags_reach_train_rl(tmp_path):
    """--rl-dynamic-sampling / --rl-stratify: train_rl gets --dynamic-sampling N / --stratify S when set and
    neither flag at the defaults (so earlier run folders resume with the same commands); the recipe line says so."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo import DemoConfig

    from tagpr import stages
    from tagpr.demo_report import recipe

    def cmd(a):
        return stages.rl_cmd(a, "p", "r", tmp_path, tmp_path / "rl", 0, "bf16", "recompute")

    plain = cmd(DemoConfig())
    assert "--dynamic-sampling" not in plain and "--stratify" not in plain
    assert "dynamic" not in recipe(DemoConfig(), "recompute")
    a = DemoConfig(rl_dynamic_sampling=3, rl_stratify="task")
    c = cmd(a)
    assert c[c.index("--dynamic-sampling") + 1] == "3" and c[c.index("--stratify") + 1] == "task"
    assert recipe(a, "recompute").endswith(
        "old log-probs: recompute, dynamic sampling ≤ 3 rounds, batches stratified by task."
    )


def test_compare_runs_by_hand(tmp_path):
    """scripts/compare_runs.py on two planted runs (2 seeds; LaMP-2 questions q0, q1 and LaMP-3's r0, r1, 2 samples
    each), worked out by hand: B − A on greedy, parse share and the score among parsed answers (pooled over seeds,
    and per seed), and A − B for LaMP-3's MAE; runs on other questions are refused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_runs

    from tagpr import config

    t, f = True, False

    def run(name, per_seed):
        """per_seed: {seed: {question: (greedy, samples, parsed)}}"""
        root = tmp_path / name
        (root / "data").mkdir(parents=True)
        rows = [{"id": q, "task": "LaMP_2" if q[0] == "q" else "LaMP_3"} for q in per_seed[0]]
        (root / "data" / "eval_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for s, qs in per_seed.items():
            per = {
                q: {"greedy": g, "sampled": sum(x) / 2, "samples": x, "samples_parsed": p}
                for q, (g, x, p) in qs.items()
            }
            body = json.dumps({"held_out": per, "swap": {q: {"greedy": 0.0} for q in per}})
            (root / f"rl_seed{s}").mkdir()
            (root / f"rl_seed{s}" / "held_out_step2.json").write_text(body)
            if s == 0:
                (root / f"rl_seed{s}" / "held_out_step0.json").write_text(body)
        return root

    a = run("a", {
        0: {"q0": (1, [1, 0], [t, t]), "q1": (0, [0, 0], [t, f]), "r0": (1, [1, 1], [t, t]), "r1": (2, [2, 0], [t, t])},
        1: {"q0": (1, [1, 1], [t, t]), "q1": (0, [1, 0], [t, t]), "r0": (1, [1, 1], [t, t]), "r1": (2, [2, 2], [t, t])},
    })  # fmt: skip
    b = run("b", {
        0: {"q0": (1, [1, 1], [t, t]), "q1": (1, [1, 0], [t, t]), "r0": (0, [0, 0], [t, t]), "r1": (1, [1, 1], [t, t])},
        1: {"q0": (1, [1, 1], [t, t]), "q1": (1, [1, 1], [t, f]), "r0": (0, [0, 1], [t, t]), "r1": (1, [0, 0], [t, t])},
    })  # fmt: skip
    ma, mb = compare_runs.models(a, "rl", [0, 1]), compare_runs.models(b, "rl", [0, 1])
    c2 = compare_runs.compare(ma, mb, ["q0", "q1"], 1)
    assert c2["greedy"] == pytest.approx((0.5, 1.0, 0.5))
    assert c2["parsed"] == pytest.approx((0.875, 0.875, 0.0))  # q0 4/4, q1 3/4 in both
    # among parsed: A (3 + 0 + 1) / (4 + 1 + 2) = 4/7, B (4 + 1 + 1) / (4 + 2 + 1) = 6/7; per seed A 1/3 → B 3/4,
    # A 3/4 → B 1
    assert c2["among"] == pytest.approx((4 / 7, 6 / 7, 2 / 7))
    assert c2["among_seeds"] == pytest.approx([3 / 4 - 1 / 3, 1 / 4])
    assert c2["among_ci"][0] <= 2 / 7 <= c2["among_ci"][1]
    c3 = compare_runs.compare(ma, mb, ["r0", "r1"], -1)  # MAE: the improvement is A − B
    assert c3["greedy"] == pytest.approx((1.5, 0.5, 1.0)) and c3["among"] == pytest.approx((1.25, 0.375, 0.875))
    text = compare_runs.table(a, b, "rl", [0, 1])
    assert "| LaMP_3 MAE | 1.500 → 0.500 | +1.000 [" in text and "| 0.571 → 0.857 | +0.286 [" in text
    (b / "data" / "eval_prompts.jsonl").write_text(json.dumps({"id": "other", "task": "LaMP_2"}) + "\n")
    with pytest.raises(config.ConfigError, match="different held-out questions"):
        compare_runs.table(a, b, "rl", [0, 1])
