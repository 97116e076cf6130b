"""Where training metrics go: a live console dashboard, a CSV per run, TensorBoard, Weights & Biases.

The trainer calls :meth:`Logger.log` once per update with a flat dict of numbers keyed
``"group/name"`` (``"episode/return"``, ``"loss/value"``, ``"perf/steps_per_second"`` ...).
One :class:`Logger` fans each dict out to every sink that is switched on:

- console: a ``rich`` dashboard (progress bar with ETA, throughput, episodes, losses, where the time
  goes) on a terminal; one plain line every few seconds otherwise (CI logs, pipes);
- ``RUN_DIR/progress.csv``: one row per update, the easiest thing to load in pandas;
- TensorBoard event files in ``RUN_DIR`` (``tensorboard --logdir runs``);
- W&B when ``wandb=True`` (``WANDB_MODE=offline`` works without a network).

:func:`plot_runs` draws ``progress.csv`` curves of several runs into one PNG (``shoal plot``).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console, Group

from shoal.errors import APIUsageError, check_int, install_hint, is_int, is_number, stdout_to_devnull
from shoal.spaces import _short

# The columns of progress.csv, in order; metrics outside this list still reach TensorBoard and W&B.
CSV_FIELDS = [
    "global_step", "update", "wall_time", "episode/return", "episode/return_mean20", "episode/length",
    "episode/count", "loss/policy", "loss/value", "loss/entropy", "loss/approx_kl", "loss/clipfrac",
    "loss/explained_variance", "lr", "perf/steps_per_second", "perf/sim_fraction",
    "perf/inference_fraction", "perf/learn_fraction",
]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _number(key: str, value: Any) -> int | float:
    """A metric as a Python int or float (numpy scalars and one-element arrays or tensors too); APIUsageError
    for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = value.item()
        except (AttributeError, TypeError, ValueError, RuntimeError):  # no number, or more than one
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shape = getattr(value, "shape", None)
        raise APIUsageError(f"Logger.log: metric {key!r} must be a number (int, float, a numpy scalar or a "
                            f"one-element tensor), got {type(value).__name__}"
                            + (f" of shape {tuple(shape)}" if shape is not None else f" {value!r}"[:80]))
    return value


def _wandb_module():
    try:
        import wandb
    except ImportError:
        raise APIUsageError(f"--wandb needs the wandb package, which the wandb extra installs: "
                            f"{install_hint('wandb')}") from None
    return wandb


def _step_of(row: dict) -> float:
    """A progress row's global_step; infinity for a row cut short by a crash (so it is not kept)."""
    try:
        return float(row["global_step"])
    except (TypeError, ValueError):
        return math.inf


def _naming(error: OSError, path: str) -> OSError:
    """``error`` with the path of the file it concerns, where it names none."""
    if error.filename is not None or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror, str(path))


class _Console(Console):
    """rich's Console, but a reader of stdout that went away (``shoal train | head``, a dead log shipper) is a
    BrokenPipeError, which stops a run as Ctrl-C does (with a checkpoint), not rich's silent exit."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        stdout_to_devnull()
        raise BrokenPipeError(errno.EPIPE, "stdout was closed: the program reading shoal's output ended")


def _redraws(console: Console) -> bool:
    """Whether the live dashboard may redraw: where rich says so (not with TERM=dumb or TTY_INTERACTIVE=0) and
    stdout is a terminal. FORCE_COLOR makes rich take a pipe for one: a CI log would get 4 redraws a second
    (and rich's own Live shows nothing on a pipe until it stops, whatever TTY_INTERACTIVE says)."""
    try:
        terminal = console.file.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        terminal = False
    return console.is_interactive and terminal


class Logger:
    """Sends each update's metrics to the console, CSV, TensorBoard and W&B.

    Args:
        run_dir: where CSV and TensorBoard files go; None writes no files.
        total_steps: the run's step budget, for the progress bar.
        title: one line naming the run on the dashboard (env, backend, device).
        dashboard: show the live ``rich`` dashboard (falls back to plain lines off a terminal).
        tensorboard / wandb: switch those sinks on. ``wandb_project`` names the W&B project.
        config: the run's configuration, recorded by W&B.
        start_step: the first step of this process (resumed runs): older CSV rows past it are dropped.
    """

    def __init__(self, run_dir: str | os.PathLike | None = None, total_steps: int = 0, title: str = "shoal",
                 dashboard: bool = True, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "shoal", config: dict | None = None, start_step: int = 0,
                 print_interval: float = 5.0):
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise APIUsageError(f"Logger: run_dir must be a path or None, got {run_dir!r}")
        self.total_steps = check_int("Logger: total_steps", total_steps, minimum=0)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.title = title
        self.start_step = check_int("Logger: start_step", start_step, minimum=0)
        if not is_number(print_interval) or not print_interval >= 0:
            raise APIUsageError(f"Logger: print_interval must be a number of seconds >= 0, got {print_interval!r}")
        self.print_interval = print_interval
        self.latest: dict[str, Any] = {}
        self._last_print = 0.0
        self._csv_file = self._csv = self._tb = self._wandb = self._live = self._console = None
        self._printed = ""  # the last plain progress line printed
        self._closed = False
        # The sinks open in open() (train() calls it once it has checked and locked the run directory) or at
        # the first log(): a Logger made for a directory another run uses (or a finished run's) touches nothing.
        self._to_open = True
        self._tensorboard = tensorboard
        self._wandb_settings = (_wandb_module(), wandb_project, config) if wandb else None  # a missing one now
        if dashboard:
            self._console = _Console()
        self._redraw = dashboard and _redraws(self._console)  # the live dashboard starts in open(), after W&B

    # ---------------------------------------------------------------- sinks

    def _start_wandb(self, wandb, project: str, config: dict | None):
        """A W&B run; a run directory keeps its id (``wandb_id``), so a resumed run goes on in the same W&B run."""
        id_file = None if self.run_dir is None else self.run_dir / "wandb_id"
        kept = id_file.read_text().strip() if id_file is not None and id_file.exists() else ""  # empty: cut short
        if kept and not re.fullmatch(r"[A-Za-z0-9_-]+", kept):
            raise APIUsageError(f"{id_file} holds {kept[:40]!r}, not a W&B run id (letters, digits, _ and -): delete "
                                f"it, and the run logs to a new W&B run")
        run_id = None if id_file is None else kept or os.urandom(6).hex()
        try:
            run = wandb.init(project=project, name=self.run_dir.name if self.run_dir else None, id=run_id,
                             dir=str(self.run_dir) if self.run_dir else None, config=config or {}, resume="allow")
        except Exception as error:
            raise APIUsageError(f"W&B did not start: {type(error).__name__}: {str(error).rstrip('.')}. Run `wandb "
                                f"login`, or set WANDB_MODE=offline to log without an account or a network") from None
        if id_file is not None and not kept:  # kept only once W&B started with it
            from shoal.checkpoint import replaced_atomically

            with replaced_atomically(id_file, "w") as file:
                file.write(run_id)
        return run

    def open(self) -> None:
        """Start W&B and open the run directory's files now (else at the first :meth:`log`); once."""
        if not self._to_open:
            return
        self._to_open = False
        try:
            self._open_sinks()
        except BaseException:  # closed: a later log() is refused, not silently lost
            self.close()
            raise

    def _open_sinks(self) -> None:
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._wandb_settings:  # first: a W&B that does not start (no login) leaves no files of a run that never was
            self._wandb = self._start_wandb(*self._wandb_settings)  # its login prompt, if any, before the dashboard
        if self._redraw:
            self._start_dashboard()
        if self.run_dir is None:
            return
        self._open_csv()
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at or after it: the checkpoint's own step is kept, as in the CSV
            self._tb = SummaryWriter(str(self.run_dir), purge_step=self.start_step + 1 if self.start_step else None)

    def _open_csv(self) -> None:
        path = self.run_dir / "progress.csv"
        try:
            self._open_csv_at(path)
        except OSError as error:  # a full disk says nothing of where
            raise _naming(error, path) from None

    def _open_csv_at(self, path: Path) -> None:
        if not (path.exists() and self.start_step):  # a new run
            self._csv_file = open(path, "w", newline="")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
            self._csv.writeheader()
            self._csv_file.flush()
            return
        # Resumed: keep the rows up to the checkpoint's step. They are written whole into a temporary file,
        # then renamed over the old one: a run killed meanwhile leaves the old file as it was, never an empty
        # one. Rows are appended from then on.
        for stale in self.run_dir.glob(".progress.*.tmp"):  # such a killed run's unfinished rewrite
            stale.unlink(missing_ok=True)
        from shoal.checkpoint import replaced_atomically  # here: a resumed run has torch loaded already

        rows = _complete_rows(path)  # first: the error for a file that is not CSV text
        with open(path, newline="", encoding="utf-8-sig") as file:
            header = next(csv.reader([file.readline()]), [])
        if header and "global_step" not in header:
            raise APIUsageError(f"{path}: its first line is not the header of a progress.csv (no global_step "
                                f"column): expected the file of a run of `shoal train`; move it away, and the "
                                f"resumed run starts a new one")
        kept = [row for _, row in rows if _step_of(row) <= self.start_step]
        with replaced_atomically(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        self._csv_file = open(path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")

    def _start_dashboard(self) -> None:
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold cyan]steps"), BarColumn(bar_width=None), MofNCompleteColumn(),
            TextColumn("•"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self._console, expand=True,
        )
        self._task = self._progress.add_task("train", total=self.total_steps or None, completed=self.start_step)
        self._live = Live(self._render(), console=self._console, refresh_per_second=4, transient=False)
        self._live.start()

    def _render(self):
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        m = self.latest

        def box(title: str, rows: list[tuple[str, Any]]) -> Panel:
            table = Table.grid(padding=(0, 2))
            table.add_column(style="dim")
            table.add_column(justify="right", style="bold")
            for name, value in rows:
                table.add_row(name, value if isinstance(value, str) else _fmt(value))
            return Panel(table, title=title, title_align="left", border_style="blue")

        split = "/".join(f"{100 * m.get(f'perf/{k}_fraction', 0):.0f}" for k in ("sim", "inference", "learn")) + "%"
        boxes = [
            box("throughput", [("steps/s", m.get("perf/steps_per_second")), ("update", m.get("update")),
                               ("sim/act/learn", split)]),
            box("episodes", [("return (last 20)", m.get("episode/return_mean20")),
                             ("return (update)", m.get("episode/return")),
                             ("length", m.get("episode/length")), ("episodes", m.get("episode/total"))]),
            box("learning", [("policy loss", m.get("loss/policy")), ("value loss", m.get("loss/value")),
                             ("entropy", m.get("loss/entropy")), ("approx kl", m.get("loss/approx_kl")),
                             ("explained var", m.get("loss/explained_variance")), ("lr", m.get("lr"))]),
        ]
        title = Text(self.title, style="bold")  # as given: a run directory named "x[/y]" is no markup
        if self._console.width < 100:  # three boxes side by side would cut their labels and numbers
            return Panel(Group(self._progress, *boxes), title=title, border_style="cyan")
        grid = Table.grid(expand=True)
        for _ in range(3):
            grid.add_column(ratio=1)
        grid.add_row(*boxes)
        return Panel(Group(self._progress, grid), title=title, border_style="cyan")

    # ---------------------------------------------------------------- API

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one update's metrics at ``step`` (the global agent step)."""
        if not is_int(step) or step < 0 or not isinstance(metrics, dict) or not all(
                isinstance(key, str) for key in metrics):
            raise APIUsageError(f"Logger.log(step, metrics) takes an int step >= 0 and a dict of numbers by name, got "
                                f"{_short(step)} and {_short(metrics)}")
        if self._closed:
            raise APIUsageError("Logger.log on a closed Logger: make a new one (a resumed run passes start_step)")
        numbers = {key: _number(key, value) for key, value in metrics.items()}
        self.latest = {**numbers, "global_step": int(step)}
        self.open()
        if self._csv is not None:
            try:
                self._csv.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                                    for k, v in self.latest.items()})
                self._csv_file.flush()
            except OSError as error:  # a full disk says nothing of where
                raise _naming(error, self._csv_file.name) from None
        if self._tb is not None:
            for key, value in numbers.items():
                if not (isinstance(value, float) and math.isnan(value)):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in numbers.items() if not (isinstance(v, float) and math.isnan(v))},
                            step=step)
        if self._live is not None:
            self._progress.update(self._task, completed=min(step, self.total_steps or step))
            self._live.update(self._render())
        elif self._console is not None and time.monotonic() - self._last_print >= self.print_interval:
            self._print_summary()

    def _print_summary(self) -> None:
        self._last_print = time.monotonic()
        self._printed = self.summary_line()
        self._console.print(self._printed, highlight=False, markup=False, soft_wrap=True)

    def summary_line(self) -> str:
        """One plain line with the latest step, return, throughput and losses."""
        m = self.latest
        total = f"/{self.total_steps:,}" if self.total_steps else ""
        split = "/".join(f"{100 * m.get(f'perf/{part}_fraction', 0):.0f}" for part in ("sim", "inference", "learn"))
        return (f"step {m.get('global_step', 0):,}{total}  return(20) {_fmt(m.get('episode/return_mean20'))}  "
                f"length {_fmt(m.get('episode/length'))}  {_fmt(m.get('perf/steps_per_second'))} steps/s "
                f"(sim/act/learn {split}%)  policy loss {_fmt(m.get('loss/policy'))}  "
                f"value loss {_fmt(m.get('loss/value'))}  entropy {_fmt(m.get('loss/entropy'))}  "
                f"kl {_fmt(m.get('loss/approx_kl'))}")

    def message(self, text: str) -> None:
        """Print a line of text as given, above the dashboard or on its own (with ``dashboard=False`` too: the
        trainer's messages are rare events, such as solving the env)."""
        (self._console or _Console()).print(text, highlight=False, markup=False)

    def close(self) -> None:
        """Stop the dashboard and flush and close every sink. Closing again does nothing."""
        if self._closed:
            return
        self._closed, self._to_open = True, False
        # Every sink is closed, also after one fails (a full disk, a closed stdout).
        with contextlib.ExitStack() as sinks:
            if self._wandb is not None:
                sinks.callback(self._wandb.finish)
            if self._tb is not None:
                sinks.callback(self._tb.close)
            if self._csv_file is not None:
                sinks.callback(self._close_csv, self._csv_file)
            self._wandb = self._tb = self._csv_file = self._csv = None
            if self._live is not None:
                live, self._live = self._live, None
                live.stop()
            elif self._console is not None and self.latest and self.summary_line() != self._printed:  # not twice
                self._print_summary()

    @staticmethod
    def _close_csv(file) -> None:
        try:
            file.close()
        except OSError as error:  # the rows it still held could not be written
            raise _naming(error, file.name) from None

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- plots


def read_progress(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of ``RUN_DIR/progress.csv`` as floats (empty cells left out); APIUsageError for a file that is not
    such a CSV (not text, a row without its global_step, a cell that is not a number)."""
    path = Path(run_dir) / "progress.csv"
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise APIUsageError(f"{str(path)!r} {what}: expected a run directory written by `shoal train`")
    rows = []
    for line, row in _complete_rows(path):
        try:
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
        except (TypeError, ValueError):
            raise APIUsageError(f"{path}, line {line}: a cell that is not a number; progress.csv holds only "
                                f"numbers") from None
        if "global_step" not in rows[-1]:
            raise APIUsageError(f"{path}, line {line}: no global_step; expected a progress.csv written by "
                                f"`shoal train`, whose every row starts with one")
    return rows


def _complete_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every complete row of a progress.csv. A last line without its line end is a row
    cut short by a run killed while writing it (even mid-number, where it would still parse): left out."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:  # a byte-order mark an editor added: not data
            text = file.read()
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        return list(enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2))
    except (UnicodeDecodeError, csv.Error) as error:  # not UTF-8, or not CSV (a field past csv's size limit)
        raise APIUsageError(f"{path} is not a CSV text file ({type(error).__name__}: {error}): expected the "
                            f"progress.csv of a run of `shoal train`") from None


def plot_runs(run_dirs: Iterable[str | os.PathLike], out: str | os.PathLike,
              metric: str = "episode/return_mean20") -> Path:
    """Draw ``metric`` against ``global_step`` for each run (one line each) into the PNG ``out``.

    A run is its directory, or its ``progress.csv``; one given twice is drawn once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(run_dirs, (str, os.PathLike)) or not run_dirs:
        raise APIUsageError(f"plot_runs needs a list of run directories, got {run_dirs!r}")
    unique: dict[Path, Path] = {}
    for given in map(Path, run_dirs):
        run_dir = given.parent if given.name == "progress.csv" and not given.is_dir() else given
        unique.setdefault(run_dir.resolve(), run_dir)
    run_dirs = list(unique.values())
    names = [run_dir.resolve().name for run_dir in run_dirs]
    if len(set(names)) < len(names):  # runs/a/seed1 and runs/b/seed1: the paths tell them apart
        names = [str(run_dir) for run_dir in run_dirs]
    # a run directory (config.json: train wrote it) without a progress.csv yet, a run stopped before its first
    # update, is a run without points; any other directory is no run
    runs = [(name, [] if (run_dir / "config.json").is_file() and not (run_dir / "progress.csv").exists()
             else read_progress(run_dir)) for name, run_dir in zip(names, run_dirs)]
    if not any(math.isfinite(row.get(metric, math.nan)) for _, rows in runs for row in rows):
        if metric not in CSV_FIELDS and not any(metric in row for _, rows in runs for row in rows):
            raise APIUsageError(f"no run has a column {metric!r} in progress.csv: expected one of "
                                f"{', '.join(CSV_FIELDS)}")
        raise APIUsageError(f"nothing to draw: no run has a value of {metric!r} yet (an episode/ column fills "
                            f"once episodes end)")
    # A colour of its own for every run (the default cycle repeats after 10); beyond a few runs the legend
    # goes beside the axes, and the PNG grows to hold it.
    many = len(runs) > 6
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20" if len(runs) <= 20 else "turbo")
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for index, (name, rows) in enumerate(runs):
        points = [(row["global_step"], row[metric]) for row in rows if math.isfinite(row.get(metric, math.nan))]
        steps, values = zip(*points) if points else ((), ())
        colour = colours(index if len(runs) <= 20 else index / (len(runs) - 1))
        axis.plot(steps, values, color=colour, marker="o" if len(points) == 1 else None,  # one point draws no line
                  label=name if points else f"{name} (no {metric} yet)")
    axis.set_xlabel("agent steps")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    if many:
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.03, 1.0), ncol=1 + len(runs) // 30)
    else:
        axis.legend(fontsize="small")
    figure.tight_layout()
    given = str(out)
    out = Path(out)
    if out.is_dir() or given.endswith(("/", os.sep)):  # a directory, or one to make
        out = out / "learning_curves.png"
    elif out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # a file where a directory of the path goes: say that, not "exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), error.filename) from None
    figure.savefig(out, dpi=120, bbox_inches="tight" if many else None)
    plt.close(figure)
    return out
