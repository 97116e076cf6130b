"""The `shoal` command: train / eval / plot, resume, and one clear message for every bad input."""

from __future__ import annotations

import builtins
import dataclasses
import contextlib
import signal
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal import cli
from shoal.checkpoint import list_checkpoints, load_checkpoint, lock_run_dir
from shoal.cli import main
from shoal.logging import read_progress

FAST = ["--num-envs", "2", "--num-steps", "16", "--no-dashboard", "--no-tensorboard"]


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:  # tyro's own parse errors
        code = exit.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_a_run_in_which_no_episode_ended_says_so(tmp_path, capsys):
    code, out, _ = run(capsys, "train", "--env", "gym:MountainCar-v0", *FAST, "--total-timesteps", "128",
                       "--run-dir", str(tmp_path / "run"))  # its episodes last 200 steps
    assert code == 0 and "no episode ended in this run" in out and "nan" not in out


def test_eval_and_resume_build_the_env_with_the_keyword_arguments_the_run_had(tmp_path, capsys):
    """make_binding("gym:CartPole-v1", max_episode_steps=5) in Python: the command must not rebuild the defaults."""
    import numpy as np

    from shoal.envs import make_binding
    from shoal.ppo import PPOConfig, train

    config = PPOConfig(env="gym:CartPole-v1", num_envs=2, num_steps=16, total_timesteps=64, dashboard=False,
                       tensorboard=False, run_dir=str(tmp_path / "short"))
    train(config, make_binding("gym:CartPole-v1", max_episode_steps=5))
    assert load_checkpoint(tmp_path / "short")["env_kwargs"] == {"max_episode_steps": 5}
    code, out, _ = run(capsys, "eval", str(tmp_path / "short"), "--episodes", "3", "--deterministic")
    assert code == 0 and "return 5.00 ± 0.00" in out  # a 5-step time limit, as the run had (CartPole lasts 8+)
    code, _, _ = run(capsys, "train", "--resume", str(tmp_path / "short"), "--total-timesteps", "256")
    assert code == 0
    assert {row.get("episode/length") for row in read_progress(tmp_path / "short")} == {5.0}

    numpy = dataclasses.replace(config, run_dir=str(tmp_path / "numpy"))  # numpy numbers (a sweep's) are numbers
    train(numpy, make_binding("gym:CartPole-v1", max_episode_steps=5, sutton_barto_reward=np.bool_(False)))
    recorded = load_checkpoint(tmp_path / "numpy")["env_kwargs"]
    assert recorded == {"max_episode_steps": 5, "sutton_barto_reward": False}
    assert type(recorded["sutton_barto_reward"]) is bool
    assert run(capsys, "eval", str(tmp_path / "numpy"))[0] == 0

    class Off:  # an object: no data a checkpoint holds
        def __bool__(self):
            return False

    other = dataclasses.replace(config, run_dir=str(tmp_path / "object"))
    train(other, make_binding("gym:CartPole-v1", sutton_barto_reward=Off()))
    code, _, err = run(capsys, "eval", str(tmp_path / "object"))
    assert code == 2 and "was built with keyword arguments a checkpoint cannot hold" in err


def test_train_eval_plot_and_resume(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    code, out, _ = run(capsys, "train", *FAST, "--total-timesteps", "256", "--run-dir", run_dir,
                       "--checkpoint-interval", "4")
    assert code == 0 and "trained 256 steps" in out and f"run directory: {run_dir}" in out
    assert "tensorboard --logdir" not in out  # --no-tensorboard: no event files to show
    assert [p.name for p in list_checkpoints(run_dir)] == ["update_000004.pt", "update_000008.pt"]
    assert (Path(run_dir) / "config.json").exists()

    code, out, _ = run(capsys, "train", "--resume", run_dir, "--total-timesteps", "512")
    assert code == 0 and "trained 256 steps (from step 256 to 512)" in out
    recent = float(read_progress(run_dir)[-1]["episode/return_mean20"])  # the run's, across the resume
    assert f"mean return of the last 20 episodes: {recent:.1f}" in out
    assert load_checkpoint(run_dir)["global_step"] == 512
    assert load_checkpoint(run_dir)["config"]["num_envs"] == 2  # the run's own config, not the preset's
    assert [row["update"] for row in read_progress(run_dir)] == list(range(1, 17))

    code, out, _ = run(capsys, "eval", run_dir, "--episodes", "3")
    assert code == 0 and "CartPole-v1: 3 episodes, return" in out

    png = tmp_path / "curves.png"
    code, out, _ = run(capsys, "plot", run_dir, run_dir, "--out", str(png), "--metric", "loss/value")
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_train_and_eval_a_pettingzoo_env(tmp_path, capsys):
    run_dir = str(tmp_path / "kaz")
    code, out, _ = run(capsys, "train", "--env", "pettingzoo:butterfly/knights_archers_zombies-v11", *FAST,
                       "--total-timesteps", "256", "--run-dir", run_dir)
    assert code == 0 and "trained" in out
    code, out, _ = run(capsys, "eval", run_dir, "--episodes", "2")
    assert code == 0 and "butterfly/knights_archers_zombies-v11: 2 agent-episodes, return" in out


@pytest.mark.parametrize("argv,message", [
    (["train", "--env", "mujoco"], "unknown env 'mujoco'"),
    (["train", "--env", "pettingzoo:butterfly/pistonbal-v6"], "did you mean butterfly/pistonball-v6"),
    (["train", "--env", "atari:Breakou"], "did you mean Breakout"),
    (["train", "--env", "gym:NoSuchEnv-v0"], "unknown Gymnasium env id 'NoSuchEnv-v0'"),
    (["train", "--env", "gym:LunarLander-v3"], "'LunarLander-v3' needs a package that is not installed: Box2D"),
    (["train", "--num-envs", "-4"], "num_envs must be a positive integer, got -4"),
    (["train", "--num-steps", "0"], "num_steps must be a positive integer, got 0"),
    (["train", "--total-timesteps", "-1"], "total_timesteps must be a positive integer"),
    (["train", "--num-envs", "8", "--envs-per-batch", "3"], r"envs_per_batch \(3\) must divide num_envs \(8\)"),
    (["train", "--learning-rate", "-0.1"], "learning_rate must be > 0"),
    (["train", "--ent-coef", "-1"], r"ent_coef must be >= 0, got -1.0"),
    (["train", "--device", "tpu7"], "device 'tpu7' is not a torch device"),
    (["train", "--device", "mps"], "device 'mps' is not available in this torch build"),
    (["train", "--resume", "/nonexistent/run"], "'/nonexistent/run' does not exist: expected a checkpoint"),
    (["eval", "/nonexistent/ckpt.pt"], "'/nonexistent/ckpt.pt' does not exist: expected a checkpoint"),
    (["train", "--seed", "-5"], r"seed must be an integer from 0 to 2\*\*32 - 1"),
    (["train", "--device", "cuda:7"], "device 'cuda:7': this torch sees"),
    (["eval", "x.pt", "--seed", "-1"], r"--seed must be an integer from 0 to 2\*\*32 - 1"),
    (["eval", "x.pt", "--device", "tpu7"], "device 'tpu7' is not a torch device"),
    (["eval", "x.pt", "--episodes", "0"], "--episodes must be a positive integer"),
    (["eval", "x.pt", "--max-steps", "0"], "--max-steps must be a positive integer"),
    (["plot", "/nonexistent/run"], "progress.csv' does not exist"),
    (["fly"], "unknown command 'fly': expected train, eval or plot"),
])
def test_bad_input_gets_one_clear_message(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("error:") == 1
    import re
    assert re.search(message, err), err


@pytest.mark.parametrize("argv,message", [
    (["train", "--backend", "threads"], "invalid choice 'threads' for argument '--backend'"),
    (["train", "--num-envs", "four"], "--num-envs"),
    (["train", "--no-such-flag"], "Unrecognized options"),
])
def test_bad_flags_are_reported_by_the_parser(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in " ".join((out + err).split()).replace("│", "").replace("  ", " ")


def test_checkpoint_from_another_env_is_refused(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert run(capsys, "train", *FAST, "--total-timesteps", "64", "--run-dir", run_dir)[0] == 0
    code, _, err = run(capsys, "eval", run_dir, "--env", "gym:Acrobot-v1")
    assert code == 2 and "does not fit env 'Acrobot-v1'" in err and "MultiDiscrete([2])" in err
    code, _, err = run(capsys, "train", "--resume", run_dir, "--env", "gym:Acrobot-v1", "--total-timesteps", "999")
    assert code == 2 and "that run trained on env 'cartpole', not 'gym:Acrobot-v1'" in err
    code, _, err = run(capsys, "train", "--resume", run_dir)
    assert code == 2 and "already at step 64" in err and "--total-timesteps" in err
    code, _, err = run(capsys, "train", "--resume", run_dir, "--total-timesteps", "999", "--hidden-size", "32", "--lstm")
    assert code == 2 and ("--hidden-size, --lstm would build another network than the run's; the run's was built "
                          "with policy='auto', hidden_size=0, lstm=False: drop --hidden-size, --lstm") in err
    code, _, err = run(capsys, "train", "--resume", run_dir, "--total-timesteps", "999", "--policy", "cnn")
    assert code == 2 and "--policy would build no network (NatureCNN (policy kind 'cnn') reads frames" in err
    code, _, _ = run(capsys, "train", "--resume", run_dir, "--total-timesteps", "128", "--hidden-size", "64",
                     "--policy", "mlp", "--no-tensorboard")  # the network the run has: it goes on
    assert code == 0


def test_resuming_an_lstm_run_with_no_lstm_names_that_flag(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert run(capsys, "train", *FAST, "--lstm", "--total-timesteps", "32", "--run-dir", run_dir)[0] == 0
    code, _, err = run(capsys, "train", "--resume", run_dir, "--total-timesteps", "64", "--no-lstm")
    assert code == 2 and "lstm=True: drop --no-lstm or start a new run" in err
    code, _, err = run(capsys, "train", "--resume", str(tmp_path))
    assert code == 2 and "no checkpoint in" in err
    code, _, err = run(capsys, "eval", run_dir, "--max-steps", "5")  # no CartPole episode ends that soon
    assert code == 2 and "CartPole-v1: no episode ended within max_steps=5 steps" in err
    code, out, _ = run(capsys, "eval", run_dir, "--episodes", "50", "--max-steps", "40")  # an untrained pole: ~10
    assert code == 0 and re.search(r"CartPole-v1: \d episodes? \(of 50 asked: the --max-steps 40 steps ran out "
                                   r"first\), return", out)


def test_resume_from_a_checkpoint_file_and_unwritable_paths(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", *FAST, "--total-timesteps", "64", "--run-dir", str(run_dir),
               "--checkpoint-interval", "1")[0] == 0
    first = sorted((run_dir / "checkpoints").glob("*.pt"))[0]
    code, _, err = run(capsys, "train", "--resume", str(first), "--total-timesteps", "96")
    assert code == 2 and "holds update_000002.pt, newer than the checkpoint resumed from (update 1)" in err
    branch = tmp_path / "branch"  # the run went on past that checkpoint: its continuation goes elsewhere
    code, out, _ = run(capsys, "train", "--resume", str(first), "--total-timesteps", "96", "--run-dir", str(branch))
    assert code == 0 and f"run directory: {branch}" in out
    assert min(path.name for path in (branch / "checkpoints").glob("*.pt")) == "update_000002.pt"
    code, _, err = run(capsys, "train", "--resume", str(first), "--total-timesteps", "128", "--run-dir", str(branch))
    assert code == 2 and "holds checkpoints of another run (newest update_000003.pt)" in err  # branch is a run now
    loose = tmp_path / "models" / "cartpole.pt"  # a checkpoint kept outside a run directory starts a new one
    loose.parent.mkdir()
    loose.write_bytes(first.read_bytes())
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "train", "--resume", str(loose), "--total-timesteps", "96")
    assert code == 0 and "run directory: runs/cartpole__1__" in out and os.listdir(loose.parent) == ["cartpole.pt"]
    made = os.listdir("runs")
    code, _, err = run(capsys, "train", "--resume", str(loose), "--total-timesteps", "16")
    assert code == 2 and "the run is already at step 32 of total_timesteps 16" in err
    assert os.listdir("runs") == made  # the run directory made for it is gone again
    (tmp_path / "a_file").write_text("")
    code, _, err = run(capsys, "train", *FAST, "--run-dir", str(tmp_path / "a_file" / "run"))
    assert code == 2 and err.count("error:") == 1 and "a_file" in err


def test_a_checkpoint_in_a_folder_named_checkpoints_outside_a_run_starts_a_new_run(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", *FAST, "--total-timesteps", "32", "--run-dir", str(run_dir))[0] == 0
    project = tmp_path / "project"  # a project that keeps its models in checkpoints/ and has a config of its own
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.json").write_text('{"my": "settings"}')
    shutil.copy(list_checkpoints(run_dir)[-1], project / "checkpoints" / "best.pt")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "train", "--resume", "project/checkpoints/best.pt", "--total-timesteps", "64")
    assert code == 0 and "run directory: runs/cartpole__1__" in out
    assert (project / "config.json").read_text() == '{"my": "settings"}'
    assert sorted(os.listdir(project)) == ["checkpoints", "config.json"]
    spelled = f"run/checkpoints/../checkpoints/{list_checkpoints(run_dir)[-1].name}"  # the run's own, all the same
    code, out, _ = run(capsys, "train", "--resume", spelled, "--total-timesteps", "64")
    assert code == 0 and "run directory: run " in out
    monkeypatch.chdir(run_dir / "checkpoints")  # a file named from inside its run's checkpoints/
    code, out, _ = run(capsys, "train", "--resume", list_checkpoints(run_dir)[-1].name, "--total-timesteps", "96")
    assert code == 0 and "run directory: .. " in out and not (run_dir / "checkpoints" / "runs").exists()


def test_default_run_dirs_of_runs_started_in_one_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda _: "20250101-120000")
    Path("runs").mkdir()
    Path("runs/cartpole__1__20250101-120000_3").write_text("")  # a file under one of the names: skipped too
    names = [cli._make_default_run_dir("cartpole", 1) for _ in range(3)]
    assert names == [f"runs/cartpole__1__20250101-120000{suffix}" for suffix in ("", "_2", "_4")]
    assert all(Path(name).is_dir() for name in names)
    os.chdir(Path("runs/cartpole__1__20250101-120000"))
    Path("runs").write_text("")  # a file where the runs directory goes
    with pytest.raises(NotADirectoryError, match="Not a directory: 'runs'"):  # not "File exists"
        cli._make_default_run_dir("cartpole", 1)


def test_a_run_dir_in_use_is_refused(tmp_path, capsys):
    with lock_run_dir(tmp_path):  # as another `shoal train --run-dir` holds it
        code, _, err = run(capsys, "train", *FAST, "--total-timesteps", "64", "--run-dir", str(tmp_path))
    assert code == 2 and f"error: another run is using run_dir '{tmp_path}'" in err and os.listdir(tmp_path) == []


def test_a_damaged_newest_checkpoint_is_reported_once_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", *FAST, "--total-timesteps", "64", "--run-dir", str(run_dir),
               "--checkpoint-interval", "1")[0] == 0
    list_checkpoints(run_dir)[-1].write_bytes(b"not a checkpoint")
    code, out, err = run(capsys, "train", "--resume", str(run_dir), "--total-timesteps", "96")
    assert code == 0 and "trained 64 steps (from step 32 to 96)" in out
    warned = [line for line in err.splitlines() if "warning" in line]  # one line each, no source line of shoal's
    assert len(warned) == 1 and warned[0].startswith(f"shoal train: warning: checkpoint '{run_dir}/checkpoints/")
    assert warned[0].endswith(f"loaded the newest one that can be, {run_dir}/checkpoints/update_000001.pt")


def test_plot_of_a_file_that_is_not_a_progress_csv_is_one_clear_error(tmp_path, capsys):
    for name, content, message in [
        ("no_step", b"episode/return_mean20\n1\n", "progress.csv, line 2: no global_step; expected a progress.csv"),
        ("binary", b"\xff\xfe\x00garbage\n", "progress.csv is not a CSV text file (UnicodeDecodeError: "),
        ("huge", b"global_step\n" + b"1" * 200_000 + b"\n", "progress.csv is not a CSV text file (Error: field "
                                                            "larger than field limit"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "progress.csv").write_bytes(content)
        code, _, err = run(capsys, "plot", str(tmp_path / name), "--out", str(tmp_path / "x.png"))
        assert code == 2 and err.count("error:") == 1 and message in err, err


def test_wandb_without_a_login_is_one_clear_error(tmp_path):
    pytest.importorskip("wandb")
    shoal = Path(sys.executable).parent / "shoal"
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_API_KEY="")
    done = subprocess.run([str(shoal), "train", *FAST, "--wandb", "--total-timesteps", "64", "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "W&B did not start" in done.stderr and "WANDB_MODE=offline" in done.stderr


def test_usage():
    assert main([]) == 2
    assert main(["--help"]) == 0


def test_the_installed_command_exits_2_without_a_traceback():
    shoal = Path(sys.executable).parent / "shoal"
    done = subprocess.run([str(shoal), "train", "--env", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("shoal train: error: unknown env 'nope'")


def test_ctrl_c_while_the_command_starts_is_interrupted_not_a_traceback(monkeypatch, capsys, ctrl_c_raises):
    # The entry point imports shoal.cli (torch: seconds) inside its own error handling.
    code = "import sys, shoal.__main__; assert 'torch' not in sys.modules, 'imported before main()'"
    subprocess.run([sys.executable, "-c", code], check=True)
    import shoal.__main__
    from shoal.__main__ import main as entry_point

    real_import, imported = builtins.__import__, []

    def interrupted(name, *args, **kwargs):
        if name != "shoal.cli":
            return real_import(name, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C in the middle: held until the import is done (torch's
        time.sleep(0.05)                     # C++ import code aborts the process when it is cut into)
        module = real_import(name, *args, **kwargs)
        imported.append(name)
        return module

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert entry_point(["train"]) == 130
    monkeypatch.undo()
    assert imported == ["shoal.cli"] and capsys.readouterr().err == "shoal train: interrupted\n"
    # Usage, --help and an unknown command are answered without importing torch; python -m shoal is the command.
    code = "import sys, shoal.__main__; shoal.__main__.main(['--help']); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "shoal", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: shoal {train,eval,plot}")
    assert tuple(cli.COMMANDS) == shoal.__main__.COMMANDS


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, capsys):
    run_dir = tmp_path / "my run"  # the commands to copy quote it
    shoal = Path(sys.executable).parent / "shoal"
    argv = [str(shoal), "train", *FAST, "--total-timesteps", "100000000", "--run-dir", str(run_dir),
            "--checkpoint-interval", "0"]
    # Ctrl-C's default action, also where pytest runs as a background job, whose children inherit SIGINT ignored
    training = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(read_progress(run_dir) if (run_dir / "progress.csv").exists() else []) < 3:  # 3 updates done
        assert training.poll() is None and time.monotonic() < deadline, training.communicate()
        time.sleep(0.05)
    training.send_signal(signal.SIGINT)
    _, err = training.communicate(timeout=60)

    assert training.returncode == 130 and "Traceback" not in err
    [path] = list_checkpoints(run_dir)  # only the one Ctrl-C wrote (no periodic ones)
    checkpoint = load_checkpoint(path)
    assert checkpoint["update"] >= 3 and checkpoint["global_step"] == checkpoint["update"] * 32
    assert f"interrupted; checkpoint at step {checkpoint['global_step']:,} of 100,000,000" in err
    assert str(path) in err and f"resume with: shoal train --resume '{run_dir}'" in err

    more = checkpoint["global_step"] + 64
    code, out, _ = run(capsys, "train", "--resume", str(run_dir), "--total-timesteps", str(more))
    assert code == 0 and f"trained 64 steps (from step {checkpoint['global_step']:,} to {more:,})" in out
    assert f"shoal eval '{run_dir}'" in out


def _session_members(session: int) -> list[int]:
    """The live processes of a session, from /proc (workers lead process groups of their own)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)": state, ppid, pgrp, session
            if int(fields[3]) == session and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def test_sigterm_to_the_whole_job_stops_the_run_with_a_checkpoint_as_ctrl_c_does(tmp_path):
    """A batch scheduler's preemption or time limit: SIGTERM to every process of the job, the workers first."""
    run_dir = tmp_path / "run"
    shoal = Path(sys.executable).parent / "shoal"
    training = subprocess.Popen([str(shoal), "train", *FAST, "--backend", "multiprocessing", "--num-workers", "2",
                                 "--total-timesteps", "100000000", "--checkpoint-interval", "0", "--run-dir",
                                 str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    deadline = time.monotonic() + 120
    while len(read_progress(run_dir) if (run_dir / "progress.csv").exists() else []) < 3:
        assert training.poll() is None and time.monotonic() < deadline, training.communicate()
        time.sleep(0.05)
    for pid in _session_members(training.pid):  # the workers first (multiprocessing's forkserver: see the docs)
        if pid != training.pid and "forkserver" not in Path(f"/proc/{pid}/cmdline").read_text():
            os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)  # the parent last, well after
    training.send_signal(signal.SIGTERM)
    _, err = training.communicate(timeout=60)
    assert training.returncode == 143 and "Traceback" not in err, err
    [path] = list_checkpoints(run_dir)
    assert f"terminated (SIGTERM); checkpoint at step {load_checkpoint(path)['global_step']:,}" in err
    deadline = time.monotonic() + 10
    while _session_members(training.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session_members(training.pid)


def test_a_reader_of_stdout_that_goes_away_stops_the_run_with_a_checkpoint_and_one_message(tmp_path):
    """shoal train | head -1, or a log shipper that dies: the run stops as on Ctrl-C, not in silence."""
    run_dir = tmp_path / "run"
    shoal = Path(sys.executable).parent / "shoal"
    with subprocess.Popen([str(shoal), "train", "--num-envs", "2", "--num-steps", "16", "--no-tensorboard",
                           "--total-timesteps", "100000000", "--checkpoint-interval", "0", "--run-dir", str(run_dir)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "FORCE_COLOR": "1"}) as training:  # plain lines all the same
        assert training.stdout.readline().startswith("step ")
        training.stdout.close()  # the reader is gone: the next line breaks the pipe
        err = training.stderr.read()
        assert training.wait(timeout=120) == 2 and "Traceback" not in err
    [path] = list_checkpoints(run_dir)  # the one the broken pipe wrote
    assert err.startswith("shoal train: error: stdout was closed (broken pipe): the run stopped; checkpoint at step ")
    assert str(path) in err and f"resume with: shoal train --resume {run_dir}" in err

    with subprocess.Popen([str(shoal), "eval", str(run_dir), "--episodes", "2"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as evaluating:
        evaluating.stdout.close()
        err = evaluating.stderr.read()
        assert evaluating.wait(timeout=120) == 2 and err == "shoal eval: error: stdout was closed (broken pipe)\n"
    with subprocess.Popen([str(shoal), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}) as usage:
        usage.stdout.close()  # shoal --help | true
        err = usage.stderr.read()
        assert usage.wait(timeout=120) == 2 and err == ""


def test_atari_smoke_train_checkpoint_resume_eval(tmp_path, capsys):
    run_dir = str(tmp_path / "breakout")
    small = ["--num-envs", "4", "--num-steps", "64", "--no-dashboard", "--no-tensorboard", "--update-epochs", "1"]
    code, out, _ = run(capsys, "train", "--env", "atari:Breakout", *small, "--total-timesteps", "1024",
                       "--run-dir", run_dir, "--checkpoint-interval", "2")
    assert code == 0, out
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["global_step"] == 1024 and checkpoint["env"] == "atari:Breakout"
    assert checkpoint["config"]["clip_coef"] == 0.1  # the Atari preset
    code, out, _ = run(capsys, "train", "--resume", run_dir, "--total-timesteps", "2048")
    assert code == 0 and load_checkpoint(run_dir)["global_step"] == 2048
    code, out, _ = run(capsys, "eval", run_dir, "--episodes", "1")
    assert code == 0 and "Breakout (Atari): 1 episode, return" in out
