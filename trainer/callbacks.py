"""Keras callbacks of a training phase (best weights, time budget, cosine decay, weight averaging, resolution)."""
from __future__ import annotations

import json
import math
import os
import time

import keras
import numpy as np

from . import files
from .config import Config


def log(msg: str) -> None:
    print(msg, flush=True)


def budget_spent(deadline: float, budget_min: float) -> float:
    """Share of the run's time budget spent so far (a resume counts the minutes already spent)."""
    budget_s = budget_min * 60
    return (time.time() - (deadline - budget_s)) / budget_s


def cosine_rate(base_lr: float, epoch: float, last_epoch: float, floor: float = 0.0) -> float:
    """Half a cosine from base_lr at epoch 0 down to floor (at least base_lr / 1000) at last_epoch and after."""
    progress = min(1.0, epoch / last_epoch) if last_epoch > 0 else 1.0
    return max(floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress)), base_lr * 1e-3)


class EpochClock:
    """Times epochs and says how many more fit before a deadline (0 = no deadline: unlimited)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.durations: list[float] = []
        self.started = 0.0

    def begin(self) -> None:
        self.started = time.time()

    def end(self) -> None:
        self.durations.append(time.time() - self.started)

    def epochs_left(self) -> int:
        if not self.deadline:
            return 1 << 30
        if not self.durations:
            return 1 << 30 if time.time() < self.deadline else 0
        # The slowest recent epoch, so the deadline holds when the machine slows down mid-run.
        per_epoch = max(self.durations[-3:])
        return max(0, int((self.deadline - time.time()) // per_epoch))


def budget_forecast(clock: EpochClock, epochs_done: int, epochs: int) -> str | None:
    """After the first epoch: how far the time budget will let the phase go, when it will not reach the end.

    Said at once, so a slow machine shows in minutes, not at the end of the hour.
    """
    if not clock.deadline or not clock.durations:
        return None
    left = clock.epochs_left()
    last = epochs_done + left
    if left < 1 or last >= epochs:  # none left: the stop line says so; all fit: nothing to say
        return None
    return (f"time budget: at {clock.durations[-1]:.0f} s an epoch, training will stop near epoch {last} of "
            f"{epochs}; fewer epochs usually score lower: a larger --time-budget-min or a faster machine fits more")


class Progress:
    """Share of the phase done at an epoch: of the time budget when there is one, else of the epochs."""

    def __init__(self, deadline: float, budget_min: float, epochs: int):
        self.deadline, self.budget_min, self.epochs = deadline, budget_min, epochs

    def __call__(self, epoch: int) -> float:
        return budget_spent(self.deadline, self.budget_min) if self.deadline else epoch / self.epochs


class BestWeights(keras.callbacks.Callback):
    """Keeps the best val-accuracy weights on disk, and remembers the best across a resume."""

    def __init__(self, phase_dir: str):
        super().__init__()
        self.weights_path = os.path.join(phase_dir, "best.weights.h5")
        self.state_path = os.path.join(phase_dir, "best.json")
        self.best = -1.0
        if os.path.exists(self.state_path) and os.path.exists(self.weights_path):
            with open(self.state_path) as fh:
                self.best = json.load(fh)["val_accuracy"]

    def on_epoch_end(self, epoch, logs=None):
        score = (logs or {}).get("val_accuracy", -1.0)
        if score > self.best:
            self.best = score
            tmp = self.weights_path + ".tmp.weights.h5"
            self.model.save_weights(tmp)
            os.replace(tmp, self.weights_path)
            files.write_json(self.state_path, {"val_accuracy": score, "epoch": epoch + 1})


class TimeBudget(keras.callbacks.Callback):
    """Stops the phase when no further epoch fits the deadline; once, after forecast_epoch, says where it will stop.

    forecast_epoch None: not yet (a Resolution callback sets it at the first full-size epoch, since
    low-resolution epochs would forecast too many).
    """

    def __init__(self, clock: EpochClock, epochs: int, on_epoch_end=None, forecast_epoch: int | None = 0):
        super().__init__()
        self.clock, self.epochs, self.after_epoch, self.forecast_epoch = clock, epochs, on_epoch_end, forecast_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.clock.begin()

    def on_epoch_end(self, epoch, logs=None):
        self.clock.end()
        if self.after_epoch is not None:
            self.after_epoch()
        if epoch == self.forecast_epoch:
            warning = budget_forecast(self.clock, epoch + 1, self.epochs)
            if warning:
                log(warning)
        if self.clock.epochs_left() < 1:
            durations = self.clock.durations
            log(f"time budget: no room for another epoch after epoch {epoch + 1} of {self.epochs} (epochs of "
                f"{min(durations):.0f}-{max(durations):.0f} s); stopping with the best weights so far. Fewer "
                "epochs usually score lower: a larger --time-budget-min fits more")
            self.model.stop_training = True


class Resolution(keras.callbacks.Callback):
    """low_res_size for the first low_res_share of the phase (of its time budget, or of its epochs), then 96."""

    def __init__(self, size, low_res_size: int, low_res_share: float, progress: Progress,
                 budget: TimeBudget | None = None):
        super().__init__()
        self.size, self.low, self.share, self.progress, self.budget = size, low_res_size, low_res_share, progress, \
            budget
        self.said = None

    def on_epoch_begin(self, epoch, logs=None):
        target = self.low if self.progress(epoch) < self.share else 96
        self.size.assign(target)
        if target != self.said:
            self.said = target
            log(f"resolution: {target}x{target} from epoch {epoch + 1}")
        if target == 96 and self.budget is not None and self.budget.forecast_epoch is None:
            self.budget.forecast_epoch = epoch


class CosineDecay(keras.callbacks.Callback):
    """Cosine decay of the learning rate to zero at the last epoch that fits, by count or by time budget.

    Measured epoch times set the horizon, so a slow or shared machine still ends on a small learning rate instead
    of being cut off at a large one. by_time: the horizon is the budget itself (epochs change cost when the
    resolution switches, so an epoch count would put it in the wrong place). tail > 0 (weight averaging): the
    cosine reaches tail_lr * base_lr at 1 - tail of the horizon and holds there; `averaging` says whether the
    current epoch is in that tail.
    """

    def __init__(self, base_lr: float, epochs: int, clock: EpochClock, progress: Progress | None = None,
                 tail: float = 0.0, tail_lr: float = 0.0):
        super().__init__()
        self.base_lr, self.epochs, self.clock, self.by_time = base_lr, epochs, clock, progress
        self.tail, self.tail_rate = tail, tail_lr * base_lr
        self.rate, self.averaging = base_lr, False

    def on_epoch_begin(self, epoch, logs=None):
        if self.by_time is not None:
            progress = self.by_time(epoch)  # holds at the floor past 1
        else:
            progress = epoch / max(1, min(self.epochs, epoch + self.clock.epochs_left()))
        # Once in the tail it stays there: a machine that speeds up moves the horizon out, which must not stop
        # the averaging half way and send the rate back up the cosine.
        self.averaging = self.averaging or (self.tail > 0 and progress >= 1 - self.tail)
        if self.averaging:
            self.rate = self.tail_rate
        elif self.tail > 0:
            self.rate = cosine_rate(self.base_lr, progress, 1 - self.tail, floor=self.tail_rate)
        else:
            self.rate = cosine_rate(self.base_lr, progress, 1.0)
        self.model.optimizer.learning_rate = self.rate

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.rate  # for the CSV history, as ReduceLROnPlateau does


AVERAGE_FILE = "average.npz"


def load_average(path: str) -> tuple[list[np.ndarray], int, list[int]]:
    """A phase's weight average on disk: the mean weights (in model.get_weights() order), steps and epochs."""
    with np.load(path) as data:
        n = sum(1 for key in data.files if key.startswith("w"))
        return [data[f"w{i}"] for i in range(n)], int(data["steps"]), [int(e) for e in data["epochs"]]


class WeightAverage(keras.callbacks.Callback):
    """The mean of the weights after every training step in the schedule's averaging tail (stochastic weight
    averaging), saved at each epoch end so that a resumed phase goes on with it.

    Listed after BackupAndRestore: a process killed between the two saves loses that epoch's steps from the mean
    (the backup has them), never counts one twice. BatchNorm statistics are averaged too, but they do not belong
    to the mean weights; precise BatchNorm recomputes them after training.
    """

    def __init__(self, phase_dir: str, schedule: CosineDecay):
        super().__init__()
        self.path, self.schedule = os.path.join(phase_dir, AVERAGE_FILE), schedule
        self.mean, self.steps, self.epochs = None, 0, []
        if os.path.exists(self.path):
            mean, self.steps, self.epochs = load_average(self.path)
            self.mean = [m.astype(np.float64) for m in mean]

    def on_train_batch_end(self, batch, logs=None):
        if not self.schedule.averaging:
            return
        weights = self.model.get_weights()
        self.steps += 1
        if self.mean is None:
            self.mean = [w.astype(np.float64) for w in weights]
            return
        for mean, w in zip(self.mean, weights):
            mean += (w - mean) / self.steps

    def on_epoch_end(self, epoch, logs=None):
        if self.schedule.averaging and self.mean is not None:
            self.epochs.append(epoch + 1)
            files.save_npz(self.path, steps=np.array(self.steps), epochs=np.array(self.epochs),
                           **{f"w{i}": mean.astype(np.float32) for i, mean in enumerate(self.mean)})


def callbacks_for(cfg: Config, phase_dir: str, deadline: float, base_lr: float, epochs: int,
                  on_epoch_end=None, size=None) -> list:
    """The callbacks of one phase, in the order they must run."""
    clock = EpochClock(deadline)
    progress = Progress(deadline, cfg.time_budget_min, epochs)
    budget = TimeBudget(clock, epochs, on_epoch_end, forecast_epoch=None if size is not None else 0)
    before, after, averaging = [], [], []
    if cfg.schedule == "cosine":
        # First, so that its learning_rate is in the logs when CSVLogger writes them.
        cosine = CosineDecay(base_lr, epochs, clock, progress if size is not None and deadline else None,
                             tail=cfg.swa, tail_lr=cfg.swa_lr)
        before.append(cosine)
        if cfg.swa:
            averaging.append(WeightAverage(phase_dir, cosine))
    else:  # plateau
        after = [keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=cfg.patience,
                                               restore_best_weights=True),
                 keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=cfg.lr_factor,
                                                   patience=cfg.lr_patience, min_lr=1e-7, verbose=1)]
    if size is not None:
        before.append(Resolution(size, cfg.low_res_size, cfg.low_res_share, progress, budget))
    return before + [keras.callbacks.BackupAndRestore(os.path.join(phase_dir, "backup"))] + averaging + \
        [keras.callbacks.CSVLogger(os.path.join(phase_dir, "history.csv"), append=True), BestWeights(phase_dir),
         budget] + after
