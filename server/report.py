"""Human-readable progress lines for a round and a run."""

from __future__ import annotations

from collections.abc import Callable

from server.history import MetricsHistory, RoundRecord


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def by_class(values: list[float]) -> str:
    """Return each structure's Dice in class order, as every report shows it."""
    return " / ".join(_num(v) for v in values)


def format_duration(seconds: float) -> str:
    """Return ``seconds`` as a person reads a wait: ``40 s``, ``3 min 20 s``, ``1 h 05 min``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def format_round(record: RoundRecord, num_rounds: int,
                 seconds_left: float | None = None) -> list[str]:
    """Return one header line and one line per site for a finished round.

    ``seconds_left``, when given and rounds remain, is shown as the time left.
    """
    status = "" if record.aggregated else "  (not aggregated: too few sites replied)"
    if record.retries:
        status += f"  (training sent {record.retries + 1} times)"
    took = ""
    if record.train_seconds is not None and record.evaluate_seconds is not None:
        left = ("" if seconds_left is None or record.round >= num_rounds
                else f", about {format_duration(seconds_left)} left")
        took = f"  ({record.train_seconds + record.evaluate_seconds:.0f} s{left})"
    lines = [f"round {record.round}/{num_rounds}: mean val Dice {_num(record.mean_val_dice)}"
             f"  mean train loss {_num(record.mean_train_loss)}{took}{status}"]
    for s in record.sites:
        privacy = "" if s.epsilon is None else f"  epsilon {s.epsilon:.2f} (delta {s.delta:g})"
        if s.error:
            lines.append(f"  {s.site:<14} FAILED {s.error}")
            continue
        if s.refused:
            lines.append(f"  {s.site:<14} val Dice {_num(s.val_dice)}  REFUSED to train: "
                         f"{s.refused}{privacy}")
            continue
        per_class = (f" [by class {by_class(s.val_dice_per_class)}]"
                     if s.val_dice_per_class else "")
        lines.append(
            f"  {s.site:<14} val Dice {_num(s.val_dice)}{per_class} ({s.num_val_cases or 0} cases)"
            f"  train loss {_num(s.train_loss)} ({s.num_train_cases or 0} cases,"
            f" {s.train_steps or 0} steps){privacy}"
        )
    return lines


class LineReporter:
    """Report every finished round as lines to one sink: the console or Flower's log."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self._round_seconds: list[float] = []

    def round_finished(self, record: RoundRecord, num_rounds: int) -> None:
        """Emit the round's header line, with the time left, and one line per site."""
        if record.train_seconds is not None and record.evaluate_seconds is not None:
            self._round_seconds.append(record.train_seconds + record.evaluate_seconds)
        left = None
        if self._round_seconds:
            # Rounds take alike (same sites, same steps), so the mean so far extrapolates.
            mean = sum(self._round_seconds) / len(self._round_seconds)
            left = mean * max(0, num_rounds - record.round)
        for line in format_round(record, num_rounds, left):
            self.emit(line)


def format_summary(history: MetricsHistory) -> list[str]:
    """Return a table of per-site validation Dice: first round, best, final."""
    if not history.rounds:
        return ["no rounds completed"]
    sites = sorted({s.site for r in history.rounds for s in r.sites})
    lines = [f"{'site':<14} {'first':>7} {'best':>7} {'final':>7} {'val cases':>9}"]
    for name in sites:
        series = [s for r in history.rounds for s in r.sites if s.site == name]
        dices = [s.val_dice for s in series if s.val_dice is not None]
        final = series[-1]
        lines.append(
            f"{name:<14} {_num(dices[0] if dices else None):>7} "
            f"{_num(max(dices) if dices else None):>7} {_num(final.val_dice):>7} "
            f"{final.num_val_cases or 0:>9}"
        )
    last = history.rounds[-1]
    lines.append(f"{'mean (cases)':<14} {'':>7} {'':>7} {_num(last.mean_val_dice):>7}")
    several = [s for s in last.sites if s.val_dice_per_class]
    if several:
        # Several structures: what each site's final model reaches on each of them.
        count = max(len(s.val_dice_per_class or []) for s in several)
        lines.append("final Dice by class: " + "  ".join(
            f"{s.site} {by_class(s.val_dice_per_class or [])}"
            for s in several) + f"  (classes 1 to {count})")
    return lines
