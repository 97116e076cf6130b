"""Logging sinks: the dashboard, CSV, TensorBoard, W&B (offline) and plots."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from shoal.envs import make_binding
from shoal.errors import APIUsageError
from shoal.logging import CSV_FIELDS, Logger, plot_runs, read_progress
from shoal.ppo import PPOConfig, train

METRICS = {"update": 3, "episode/return": 21.5, "episode/return_mean20": 30.25, "episode/length": 21.5,
           "episode/total": 40, "loss/policy": -0.01, "loss/value": 5.5, "loss/entropy": 0.69, "lr": 2.5e-4,
           "perf/steps_per_second": 12345.0, "perf/sim_fraction": 0.5, "perf/inference_fraction": 0.2,
           "perf/learn_fraction": 0.3, "loss/approx_kl": math.nan}


@pytest.mark.parametrize("width", [130, 60])  # narrower than 100 columns: the boxes stack, nothing is cut
def test_dashboard_shows_progress_throughput_episodes_losses_and_time_split(width):
    logger = Logger(None, total_steps=1000, title="shoal PPO · CartPole-v1", dashboard=True)
    logger._console = Console(record=True, force_terminal=True, width=width)
    logger._start_dashboard()
    logger.log(640, METRICS)
    logger.close()
    text = logger._console.export_text()
    for expected in ["shoal PPO · CartPole-v1", "640/1000", "12,345", "30.2", "21.5", "value loss", "5.5",
                     "entropy", "0.69", "50/20/30%", "eta", "sim/act/learn", "explained var", "0.00025"]:
        assert expected in text, expected


def test_titles_and_messages_are_printed_as_given_not_as_markup(capsys):
    """A run directory or env name with brackets (a sweep's "lr[/x]") is text: rich would drop or refuse it."""
    logger = Logger(None, total_steps=10, title="shoal PPO · Game[/v1] · runs/sweep[lr=0.1]", dashboard=True)
    logger._console = Console(record=True, force_terminal=True, width=130)
    logger._start_dashboard()
    logger.message("agents: [agent_0, agent_1] [/bold]")
    logger.log(10, METRICS)
    logger.close()
    text = logger._console.export_text()
    assert "Game[/v1] · runs/sweep[lr=0.1]" in text and "agents: [agent_0, agent_1] [/bold]" in text
    capsys.readouterr()
    quiet = Logger(None, dashboard=False)  # no dashboard, no progress lines: messages all the same
    quiet.message("solved [at] step 5")
    quiet.close()
    assert capsys.readouterr().out == "solved [at] step 5\n"


def test_the_dashboard_redraws_on_a_terminal_only(monkeypatch):
    """FORCE_COLOR makes rich take any stdout for a terminal, and TTY_INTERACTIVE=1 asks for redraws: off one
    (pytest's capture here, a CI log) the Logger prints plain lines all the same."""
    for environ, live in (({}, False), ({"FORCE_COLOR": "1"}, False), ({"FORCE_COLOR": "0"}, False),
                          ({"FORCE_COLOR": "1", "TTY_INTERACTIVE": "0"}, False), ({"TTY_INTERACTIVE": "1"}, False)):
        for name in ("FORCE_COLOR", "TTY_INTERACTIVE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        logger = Logger(None, total_steps=1000, dashboard=True, print_interval=0)
        assert (logger._live is not None) == live, environ
        logger.close()


def test_csv_tensorboard_and_resume_trimming(tmp_path):
    with Logger(tmp_path, dashboard=False) as logger:
        for step in (100, 200, 300):
            logger.log(step, {**METRICS, "global_step": step})
    rows = read_progress(tmp_path)
    assert [row["global_step"] for row in rows] == [100, 200, 300]
    assert "loss/approx_kl" not in rows[0]  # NaN is an empty cell
    assert list(open(tmp_path / "progress.csv").readline().strip().split(",")) == CSV_FIELDS
    assert list(tmp_path.glob("events.out.tfevents.*"))

    with Logger(tmp_path, dashboard=False, start_step=200) as logger:  # resumed from a checkpoint at 200
        logger.log(250, METRICS)
    assert [row["global_step"] for row in read_progress(tmp_path)] == [100, 200, 250]


def test_a_full_disk_is_an_error_that_names_the_file_and_every_sink_is_closed(tmp_path):
    (tmp_path / "progress.csv").symlink_to("/dev/full")  # every write fails: no space left on device
    logger = Logger(tmp_path, dashboard=False, tensorboard=True)
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'progress.csv'}'"):
        logger.open()
    logger.close()
    assert logger._tb is None and logger._csv_file is None


def test_a_resumed_run_refuses_a_progress_csv_without_its_header(tmp_path):
    with Logger(tmp_path, dashboard=False, tensorboard=False) as logger:
        logger.log(100, {**METRICS, "global_step": 100})
    lines = (tmp_path / "progress.csv").read_text().splitlines(keepends=True)
    (tmp_path / "progress.csv").write_text("".join(lines[1:]))  # the header line deleted by hand
    with pytest.raises(APIUsageError, match=r"progress.csv: its first line is not the header of a progress.csv \(no "
                                            r"global_step column\)"):
        Logger(tmp_path, dashboard=False, tensorboard=False, start_step=100).open()


def test_plain_lines_off_a_terminal(capsys):
    logger = Logger(None, total_steps=1000, dashboard=True, print_interval=0)
    logger.log(640, METRICS)
    logger.close()
    out = capsys.readouterr().out
    assert "step 640/1,000" in out and "return(20) 30.2" in out
    assert out.count("step 640/1,000") == 1  # close() does not print the line log() just printed again


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = PPOConfig(num_envs=2, num_steps=16, total_timesteps=64, dashboard=False, run_dir=str(tmp_path),
                       wandb=True, wandb_project="shoal-test")
    train(config, make_binding("cartpole"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_offline_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = PPOConfig(num_envs=2, num_steps=16, total_timesteps=64, dashboard=False, tensorboard=False,
                       run_dir=str(tmp_path), wandb=True, wandb_project="shoal-test")
    train(config, make_binding("cartpole"))
    train(PPOConfig(**{**config.__dict__, "total_timesteps": 128}), make_binding("cartpole"), resume_from=tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb_id").read_text()
    assert len(runs) == 2 and all(run_id in run.name for run in runs)  # one W&B run, logged twice
    (tmp_path / "wandb_id").write_text("not an id!")
    with pytest.raises(APIUsageError, match=r"wandb_id holds 'not an id!', not a W&B run id .*: delete it"):
        train(PPOConfig(**{**config.__dict__, "total_timesteps": 192}), make_binding("cartpole"), resume_from=tmp_path)
    (tmp_path / "wandb_id").write_text("")  # a run killed while writing it: a new W&B run, and its id kept
    train(PPOConfig(**{**config.__dict__, "total_timesteps": 192}), make_binding("cartpole"), resume_from=tmp_path)
    assert (tmp_path / "wandb_id").read_text() not in ("", run_id)



def test_progress_csv_cut_short_by_a_kill_still_reads_and_a_bad_cell_is_named(tmp_path):
    with Logger(tmp_path, dashboard=False, tensorboard=False) as logger:
        for step in range(1, 4):
            logger.log(step * 100, {"episode/return_mean20": float(step)})
    path = tmp_path / "progress.csv"
    text = path.read_text()
    for cut in ("400,4,1.5,-", "400,4,1.5,-12", "400,4,1.5,-12\r"):  # the last row, cut while written
        path.write_text(text + cut)
        assert [row["global_step"] for row in read_progress(tmp_path)] == [100, 200, 300]
    path.write_text(text.replace("200,", "abc,", 1) + "400,4,1.5,-")
    with pytest.raises(APIUsageError, match="progress.csv, line 3: a cell that is not a number"):
        read_progress(tmp_path)


def test_a_file_that_is_not_a_progress_csv_is_named_with_what_is_wrong(tmp_path):
    path = tmp_path / "progress.csv"
    path.write_text("global_step,loss/value\n100,1.0\n,2.0\n")
    with pytest.raises(APIUsageError, match="progress.csv, line 3: no global_step; expected a progress.csv written"):
        read_progress(tmp_path)
    path.write_text("loss/value\n1.0\n")
    with pytest.raises(APIUsageError, match="progress.csv, line 2: no global_step"):
        plot_runs([tmp_path], tmp_path / "x.png", metric="loss/value")
    path.write_bytes(b"global_step\n\xff\n")
    with pytest.raises(APIUsageError, match=r"progress.csv is not a CSV text file \(UnicodeDecodeError: 'utf-8' "
                                            r"codec can't decode byte 0xff in position 12"):
        read_progress(tmp_path)
    with pytest.raises(APIUsageError, match="progress.csv is not a CSV text file"):  # nor resumed into
        Logger(tmp_path, dashboard=False, tensorboard=False, start_step=100).log(200, {})


def test_a_logger_writes_no_file_before_its_first_log(tmp_path):
    # train() checks and locks the run directory first: a Logger made for another run's directory must not
    # have emptied or cut its progress.csv by then
    with Logger(tmp_path, dashboard=False) as logger:
        logger.log(100, {"loss/value": 1.0})
    before = (tmp_path / "progress.csv").read_text()
    files = sorted(tmp_path.iterdir())
    for start_step in (0, 50):
        Logger(tmp_path, dashboard=False, start_step=start_step).close()
    assert (tmp_path / "progress.csv").read_text() == before and sorted(tmp_path.iterdir()) == files


def test_a_byte_order_mark_is_no_data_and_a_directory_is_no_csv(tmp_path):
    (tmp_path / "progress.csv").write_text("\ufeffglobal_step,loss/value\n100,1.0\n", encoding="utf-8")
    assert read_progress(tmp_path) == [{"global_step": 100.0, "loss/value": 1.0}]
    (tmp_path / "run" / "progress.csv").mkdir(parents=True)
    with pytest.raises(APIUsageError, match="progress.csv' is not a file: expected a run directory"):
        read_progress(tmp_path / "run")


def test_plot_one_line_per_run(tmp_path):
    for name, scale in (("a", 1), ("b", 2)):
        with Logger(tmp_path / name, dashboard=False, tensorboard=False) as logger:
            for step in range(1, 6):
                logger.log(step * 100, {"episode/return_mean20": step * scale})
    out = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_runs([tmp_path / "a"], tmp_path / "plots" / "noext") == tmp_path / "plots" / "noext.png"
    assert plot_runs([tmp_path / "a"], tmp_path / "plots") == tmp_path / "plots" / "learning_curves.png"
    with pytest.raises(NotADirectoryError, match=f"Not a directory: '{tmp_path / 'plots' / 'noext.png'}'"):
        plot_runs([tmp_path / "a"], tmp_path / "plots" / "noext.png" / "under_a_file.png")


def test_plot_marks_runs_without_data_and_refuses_an_unknown_metric(tmp_path):
    with Logger(tmp_path / "early", dashboard=False, tensorboard=False) as logger:
        logger.log(100, {"episode/return_mean20": math.nan, "loss/value": 1.0})  # no episode finished yet
    with pytest.raises(APIUsageError, match="nothing to draw: no run has a value of 'episode/return_mean20' yet"):
        plot_runs([tmp_path / "early"], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()
    with pytest.raises(APIUsageError, match="no run has a column 'loss/valu' in progress.csv: expected one of"):
        plot_runs([tmp_path / "early"], tmp_path / "typo.png", metric="loss/valu")
    (tmp_path / "stopped" / "seed1").mkdir(parents=True)  # a run stopped before its first update: no CSV
    (tmp_path / "stopped" / "seed1" / "config.json").write_text("{}")
    (tmp_path / "early" / "seed1").mkdir()
    with Logger(tmp_path / "early" / "seed1", dashboard=False, tensorboard=False) as logger:
        logger.log(100, {"episode/return_mean20": 3.0})  # one point: drawn as a marker
    labels = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.legend
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.axes.Axes, "legend", lambda axis, **kw: labels.extend(
            line.get_label() for line in axis.get_lines()) or original(axis, **kw))
        out = plot_runs([tmp_path / "stopped" / "seed1", tmp_path / "early" / "seed1"], f"{tmp_path / 'new'}/")
    assert out == tmp_path / "new" / "learning_curves.png" and out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(APIUsageError, match="stopped/progress.csv' does not exist"):  # the runs' parent: no run
        plot_runs([tmp_path / "stopped"], tmp_path / "parent.png")
    assert labels == [f"{tmp_path / 'stopped' / 'seed1'} (no episode/return_mean20 yet)",
                      str(tmp_path / "early" / "seed1")]  # two seed1 runs: named by their paths
    labels.clear()
    with pytest.MonkeyPatch.context() as patch:  # a run given twice, or by its progress.csv: one line
        patch.setattr(matplotlib.axes.Axes, "legend", lambda axis, **kw: labels.extend(
            line.get_label() for line in axis.get_lines()) or original(axis, **kw))
        plot_runs([tmp_path / "early", tmp_path / "early" / "progress.csv", f"{tmp_path / 'early'}/"],
                  tmp_path / "once.png", metric="loss/value")
    assert labels == ["early"]
    with pytest.raises(APIUsageError, match=r"stopped/progress.csv' does not exist"):  # said once, not .../progress.csv
        plot_runs([tmp_path / "stopped" / "progress.csv"], tmp_path / "none.png")


def test_plot_of_a_sweep_gives_every_run_a_colour_of_its_own(tmp_path, monkeypatch):
    import matplotlib.axes

    runs = []
    for seed in range(24):
        runs.append(tmp_path / f"seed{seed}")
        with Logger(runs[-1], dashboard=False, tensorboard=False) as logger:
            logger.log(100, {"episode/return_mean20": float(seed)})
            logger.log(200, {"episode/return_mean20": seed + 1.0})
    colours = []
    original = matplotlib.axes.Axes.legend
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda axis, **kw: colours.extend(
        line.get_color() for line in axis.get_lines()) or original(axis, **kw))
    out = plot_runs(runs, tmp_path / "sweep.png")
    assert len(colours) == 24 and len({tuple(colour) for colour in colours}) == 24
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_plot_runs_needs_a_list_of_runs(tmp_path):
    with pytest.raises(APIUsageError, match="plot_runs needs a list of run directories, got \\[\\]"):
        plot_runs([], tmp_path / "x.png")
    with pytest.raises(APIUsageError, match="plot_runs needs a list of run directories, got 'runs/a'"):
        plot_runs("runs/a", tmp_path / "x.png")


def test_logger_arguments_of_the_wrong_kind_are_named(tmp_path):
    with pytest.raises(APIUsageError, match="Logger: run_dir must be a path or None, got 5"):
        Logger(5)
    with Logger(tmp_path, dashboard=False, tensorboard=False) as logger:
        with pytest.raises(APIUsageError, match=r"takes an int step >= 0 and a dict of numbers by name, got 1 and "
                                                r"\[1, 2\]"):
            logger.log(1, [1, 2])
        with pytest.raises(APIUsageError, match=r"got 1 and \{3: 1.0\}"):  # a name TensorBoard would choke on
            logger.log(1, {3: 1.0})
        with pytest.raises(APIUsageError, match=r"got -5 and \{\}"):
            logger.log(-5, {})
    assert not (tmp_path / "progress.csv").exists()  # nothing was written for them


def test_a_numpy_step_budget_and_a_cut_csv_row_on_resume_are_fine(tmp_path):
    with Logger(tmp_path, total_steps=np.int64(512), dashboard=False, tensorboard=False) as logger:
        assert logger.total_steps == 512 and type(logger.total_steps) is int
        logger.log(64, {"global_step": 64})
    with open(tmp_path / "progress.csv", "a") as file:
        file.write("12")  # a row cut short when the run was killed, mid-number
    with open(tmp_path / "progress.csv", "a") as file:
        file.write("x,y\n")  # and garbage after it
    with Logger(tmp_path, total_steps=512, dashboard=False, tensorboard=False, start_step=64) as logger:
        logger.log(128, {})
    assert [row["global_step"] for row in read_progress(tmp_path)] == [64, 128]


def test_a_resumed_run_keeps_the_checkpoints_own_tensorboard_point(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Logger(tmp_path, dashboard=False) as logger:
        for step in (100, 200, 300):
            logger.log(step, {"loss/value": 1.0})
    with Logger(tmp_path, dashboard=False, start_step=200) as logger:  # resumed from the checkpoint at 200
        logger.log(300, {"loss/value": 2.0})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/value")] == [(100, 1.0), (200, 1.0), (300, 2.0)]


def test_numpy_and_torch_metrics_are_logged_as_numbers_and_anything_else_is_refused(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = Logger(tmp_path, dashboard=False)
    logger.log(1, {"loss/value": np.float32(0.5), "update": np.int64(1), "episode/return": torch.tensor(3.0)})
    with pytest.raises(APIUsageError, match=r"metric 'loss/value' must be a number .*, got Tensor of shape \(3,\)"):
        logger.log(2, {"loss/value": torch.zeros(3)})
    with pytest.raises(APIUsageError, match="metric 'note' must be a number .*, got str 'hello'"):
        logger.log(2, {"note": "hello"})
    logger.close()
    with pytest.raises(APIUsageError, match="Logger.log on a closed Logger"):
        logger.log(3, {"loss/value": 1.0})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("episode/return")] == [(1, 3.0)]
    assert read_progress(tmp_path) == [{"global_step": 1.0, "update": 1.0, "episode/return": 3.0, "loss/value": 0.5}]
    with pytest.raises(APIUsageError, match="Logger: start_step must be an int >= 0, got '5'"):
        Logger(tmp_path, dashboard=False, start_step="5")
    with pytest.raises(APIUsageError, match="Logger: print_interval must be a number of seconds >= 0, got -1"):
        Logger(None, dashboard=False, print_interval=-1)


def test_a_resumed_run_rewrites_progress_csv_whole_or_not_at_all(tmp_path, monkeypatch):
    with Logger(tmp_path, dashboard=False, tensorboard=False) as logger:
        for step in (100, 200, 300):
            logger.log(step, {"loss/value": 1.0})
    before = (tmp_path / "progress.csv").read_text()

    def killed(self, rows):
        raise KeyboardInterrupt  # as if the run were stopped while it rewrites the file

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        Logger(tmp_path, dashboard=False, tensorboard=False, start_step=200).log(300, {})
    assert (tmp_path / "progress.csv").read_text() == before and sorted(tmp_path.iterdir()) == [
        tmp_path / "progress.csv"]
    monkeypatch.undo()
    (tmp_path / ".progress.abc.tmp").write_text("a rewrite a killed run left unfinished")
    (tmp_path / "progress.csv").chmod(0o644)
    with Logger(tmp_path, dashboard=False, tensorboard=False, start_step=200) as logger:
        logger.log(300, {"loss/value": 2.0})
    assert sorted(tmp_path.iterdir()) == [tmp_path / "progress.csv"]
    assert (tmp_path / "progress.csv").stat().st_mode & 0o777 == 0o644  # not the temporary file's 0o600
    assert [(row["global_step"], row["loss/value"]) for row in read_progress(tmp_path)] == [
        (100, 1.0), (200, 1.0), (300, 2.0)]
