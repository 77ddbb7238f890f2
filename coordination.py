"""How the processes of one training run act together, so that the trainer reads the same for
one process and for several workers.

* ``Solo``: one process; every agreement is with itself, so each method does nothing.
* ``Workers``: the tasks of a multi-worker run (TF_CONFIG), on cluster.py's collectives: they
  agree on the start point before anything is built, stop after the same iteration, leave
  together, and a collective that fails because a task went away is one line.
* ``coordinator(strategy)``: the one a strategy needs.
"""

import contextlib
import signal

import cluster
from cli import UserError


class Solo:
    """One process. ``chief``: whether it writes (a task of a TF_CONFIG run outside a
    multi-worker strategy may not)."""

    def __init__(self, chief: bool = True, chief_name: str = "worker 0"):
        self.chief, self.chief_name = chief, chief_name
        self.tasks = 1

    def agree_on_start(self, prepare, args) -> None:
        """Run ``prepare()`` (the run's own checks, returning its Start)."""
        prepare()

    def agreed_stop(self, reason):
        return reason

    def barrier(self, when: str) -> None:
        pass

    @contextlib.contextmanager
    def lost_peer(self, when: str):
        yield


class Workers:
    """The tasks of a multi-worker run, this process being ``found.me``."""

    def __init__(self, strategy, found):
        self.strategy, self.cluster = strategy, found
        self.chief, self.chief_name = found.is_chief, found.chief.name
        self.tasks = len(found)

    def agree_on_start(self, prepare, args) -> None:
        """Every task must start from what the chief starts from (same kind, checkpoint files and
        settings): compared across the tasks before anything is built or written; on a
        difference every task stops with one line. A task whose own checks failed says so after
        the others have learnt of it, so that no task waits for it."""
        failure, start = None, None
        try:
            start = prepare()
        except UserError as err:
            failure = err
        row = cluster.start_row(args, start)
        with self.lost_peer("before training"):
            rows = cluster.exchange(self.strategy, self.cluster, row)
        if failure is not None:
            raise failure
        problem = cluster.start_disagreement(rows, self.cluster, args)
        if problem:
            raise UserError(problem)

    def agreed_stop(self, reason):
        """The stop every task agrees on after a step: a Ctrl-C / SIGTERM on any task stops all of
        them after the same iteration (one small all-reduce per step), naming where it came from."""
        code = 0 if reason is None else getattr(signal.Signals, str(reason), signal.SIGTERM).value
        codes = cluster.exchange(self.strategy, self.cluster, [code])[:, 0]
        for task, value in zip(self.cluster.tasks, codes):
            if value:
                return f"{signal.Signals(int(value)).name} on {task.name}"
        return None

    def barrier(self, when: str) -> None:
        """Wait until every task is here (the chief has saved) before leaving; see
        cluster.leave_together."""
        with self.lost_peer(when):
            cluster.leave_together(self.strategy, self.cluster)

    @contextlib.contextmanager
    def lost_peer(self, when: str):
        """A collective that failed because another task went away, as one line."""
        try:
            yield
        except Exception as exc:
            message = cluster.lost_peer(exc, self.cluster, when)
            if message is None:
                raise
            raise UserError(message) from None


def coordinator(strategy):
    """Workers when ``strategy`` runs over several tasks, else Solo (the chief unless TF_CONFIG
    names another task)."""
    found = cluster.multi_worker_cluster(strategy)
    if found is not None:
        return Workers(strategy, found)
    config = cluster.read_tf_config()
    return Solo(chief=config is None or config.is_chief, chief_name=config.chief.name if config else "worker 0")
