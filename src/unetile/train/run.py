"""``train()``: the run of a configuration, after ``--preset auto``'s race where it has one.

The race (:mod:`.race`) trains short runs of the loop (:mod:`.loop`) and picks
the weight map the rest of the budget trains with.
"""

from __future__ import annotations

import threading

from . import race
from .config import TrainConfig
from .loop import TrainingData, train_run


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    data: TrainingData | None = None,
    stop_after: int | None = None,
    overwrite: bool = False,
    notes=None,
    stop: threading.Event | None = None,
) -> dict:
    """Train a U-Net as configured; return the run summary.

    The run folder is locked while training (a second process training into
    it gets :class:`unetile.io.InputError` naming this one's PID); a new run
    refuses a folder that holds a run's files unless ``overwrite``.

    Parameters
    ----------
    config : TrainConfig
        All options; ``config.out`` is the run folder.
    resume : bool
        Continue the run in ``config.out`` from its checkpoint. With the same
        options it ends with the same weights as a run never interrupted.
    progress : bool
        Show a progress bar (tqdm) with loss and steps per second.
    data : TrainingData or None
        Data already read by :func:`prepare_data` (tests, the demo); None reads
        ``config.images`` / ``config.labels``.
    stop_after : int or None
        Stop (with a checkpoint, as on Ctrl-C) once this step is reached,
        without changing the schedule (tests of resume).
    overwrite : bool
        Start afresh in a folder that holds another run or model, removing
        its files (:data:`RUN_FILES`) first.
    notes : callable or None
        Called with each one-line note for the user before training (the
        validation held out, :func:`holdout_note`); None keeps them silent.
    stop : threading.Event or None
        Set from another thread (a GUI's Stop button) to stop after the current
        step as on Ctrl-C: with a checkpoint and the model saved.

    Returns
    -------
    dict
        ``run_dir``, ``step``, ``steps``, ``loss`` (mean of the last log
        interval), ``best_metric``, ``best_value``, ``best_step``,
        ``validation`` (last metrics), ``seconds`` (time in training steps;
        validation, checkpoints and plots excluded), ``steps_per_second``,
        ``data_fraction`` (share of step time outside forward/backward/update:
        sampling, augmentation, transfers), ``interrupted`` (Ctrl-C or
        ``stop_after``), ``out_of_time`` (``max_minutes`` reached),
        ``wall_seconds`` (all of it, over resumed parts), ``input_shape``,
        ``output_shape``, ``num_parameters``.
    """
    if data is None and race.should_race(config, resume):
        config = race.race(config, train, progress, notes)
    summary = train_run(config, resume, progress, data, stop_after, overwrite, notes, stop)
    poor = race.poor_result(summary) if config.auto is not None else None
    if poor and notes:
        notes(poor)
    return summary
