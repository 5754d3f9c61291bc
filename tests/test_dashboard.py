"""--report-to tensorboard: the event files hold the numbers of metrics.jsonl, under the same names, at the same
steps (read back with TensorBoard's own reader); RL adds rollout texts, PRMU its held-out accuracy."""

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install -e '.[tensorboard]')")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def events(folder: Path) -> EventAccumulator:
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def same_numbers(out: Path) -> EventAccumulator:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ea = events(out / "tensorboard")
    tags = set(ea.Tags()["scalars"])
    n = 0
    for r in rows:
        for k, v in r.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            assert k in tags, k
            got = {e.step: e.value for e in ea.Scalars(k)}
            assert r["step"] in got, (k, r["step"])
            if math.isfinite(v):
                assert got[r["step"]] == pytest.approx(v, rel=1e-6, abs=1e-6), k  # stored as float32
            n += 1
    assert n >= 5 * len(rows)  # not a vacuous comparison
    return ea


def test_sft_and_prmu_events_equal_metrics_jsonl(tmp_path):
    import train_prmu
    import train_sft

    train_sft.main(
        [
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "sft"),
            "--max-steps",
            "3",
            "--report-to",
            "tensorboard",
            "--resume",
            "",
        ]
    )
    ea = same_numbers(tmp_path / "sft")
    assert {"loss", "lr", "grad_norm"} <= set(ea.Tags()["scalars"])
    train_prmu.main(
        [
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "prmu"),
            "--max-steps",
            "2",
            "--eval-every",
            "1",
            "--report-to",
            "tensorboard",
            "--resume",
            "",
        ]
    )
    ea = same_numbers(tmp_path / "prmu")
    assert {"eval_acc/all", "eval_acc/seen", "eval_acc/seen_no_ue"} <= set(ea.Tags()["scalars"])


def test_rl_events_and_rollout_texts(tmp_path):
    import train_rl

    out = tmp_path / "rl"
    train_rl.main(
        ["--preset", "tiny", "--out", str(out), "--max-steps", "2", "--report-to", "tensorboard", "--resume", ""]
    )
    ea = same_numbers(out)
    assert {"reward", "loss/u0", "clip_frac_high/u1"} <= set(ea.Tags()["scalars"])
    texts = ea.Tensors("rollouts/text_summary")
    assert [t.step for t in texts] == [1, 2]
    first = json.loads((out / "rollouts.jsonl").read_text().splitlines()[0])
    shown = texts[0].tensor_proto.string_val[0].decode()
    assert f"prompt `{first['prompt_id']}`" in shown and f"reward {first['reward']:.3f}" in shown


def test_without_the_package_the_flag_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    from tagpr import config
    from tagpr.runlog import tensorboard_writer

    real = builtins.__import__

    def no_tensorboard(name, *a, **kw):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(config.ConfigError, match=r"pip install -e '\.\[tensorboard\]'"):
        tensorboard_writer(tmp_path, None)


def test_a_resumed_run_drops_the_events_past_its_checkpoint(tmp_path):
    """A run killed after logging steps its last checkpoint does not hold: on resume those steps' events go, and
    TensorBoard shows each step once, with the resumed run's numbers. The killed tail is planted (reward 999 at
    steps 3 and 4, as a crashed run would leave them) so that a stale event cannot pass for a fresh one."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    import train_rl

    out = tmp_path / "rl"
    args = ["--preset", "tiny", "--out", str(out), "--report-to", "tensorboard", "--save-every", "2"]
    train_rl.main([*args, "--max-steps", "4", "--resume", ""])
    full = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # back to the state of a run killed after step 4's events, with step 2 its last checkpoint
    shutil.rmtree(out / "ckpt" / "step_00000004")
    shutil.rmtree(out / "model")
    stale = SummaryWriter(log_dir=str(out / "tensorboard"))
    for step in (3, 4):
        stale.add_scalar("reward", 999.0, step)
    stale.close()
    train_rl.main([*args, "--max-steps", "4", "--resume", "auto"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    ea = same_numbers(out)
    reward = ea.Scalars("reward")
    assert [e.step for e in reward] == [1, 2, 3, 4]  # each step once: the killed tail is gone
    assert [e.value for e in reward] == pytest.approx([r["reward"] for r in full], rel=1e-6)
