"""Where a sweep's optuna study lives, named by a URL: `sqlite:///PATH` (the default, `sweep.db` in the
sweep dir: one machine), `postgresql://USER:PASSWORD@HOST:PORT/DB` or `mysql://...` (a database server
every worker reaches: any number of machines), or `journal:PATH` (optuna's journal file, for a shared
filesystem without a server). Every storage has trial heartbeats, so a dead worker's trial is marked
FAILED once its last beat is older than the grace period and queued again for another worker
(lrft.sweep.study). The password of a URL is masked in every message.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # the interface optuna's own storages implement
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lrft.errors import LrftError

STORAGE_ENV = "LRFT_SWEEP_STORAGE"  # a job script's storage URL, for every sweep it runs
DEFAULT_FILE = "sweep.db"  # the default study: SQLite in the sweep dir
SQL_SCHEMES = ("sqlite", "postgresql", "mysql")  # optuna's RDBStorage, through SQLAlchemy
MAX_RETRIES = 2  # retries of a trial whose worker died; one more death fails it for good (a point that kills it)
DRIVERS = {
    "postgresql": "psycopg (pip install 'lrft[postgres]')",
    "mysql": "PyMySQL (pip install pymysql; mysql+pymysql://...)",
}
URL_FORMS = "postgresql://USER:PASSWORD@HOST:PORT/DB, mysql+pymysql://..., sqlite:///PATH or journal:PATH"


def masked(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return re.sub(r"(\w[\w+.-]*://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def scheme(url: str) -> str:
    """The storage kind of a URL (its scheme without a driver: postgresql+psycopg2 → postgresql)."""
    if url.startswith("journal:"):
        return "journal"
    head = url.split("://", 1)[0] if "://" in url else ""
    return head.split("+", 1)[0]


def check_url(url: str, where: str) -> None:
    """A URL lrft can open, or one line naming it and the forms it takes."""
    kind = scheme(url)
    if kind not in (*SQL_SCHEMES, "journal") or (kind == "journal" and not url[len("journal:") :]):
        raise LrftError(f"{where}: {masked(url)!r} is not a storage lrft knows; give {URL_FORMS}")


def retry_stale(max_retry: int | None = MAX_RETRIES) -> RetryHeartbeatStaleTrialCallback:
    """Queue a dead worker's trial again (its params, point and the epochs it reported), for the next ask."""
    return RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)


class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """optuna's journal storage with the heartbeat its RDB storage has (optuna 5 gives the journal none):
    each beat is a system attribute of the trial, in wall-clock seconds, so the workers' clocks must
    agree to within the grace period (NTP on a cluster)."""

    BEAT = "lrft_heartbeat"

    def __init__(self, path: Path, interval: int, grace: int):
        super().__init__(JournalFileBackend(str(path)))
        self.interval, self.grace = interval, grace

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, self.BEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [
            self.get_trial_id_from_study_id_trial_number(study_id, t.number)
            for t in running
            if now - t.system_attrs.get(self.BEAT, now) > self.grace
        ]

    def get_heartbeat_interval(self) -> int:
        return self.interval

    def get_heartbeat_stale_trial_callback(self):
        return retry_stale()


def open_storage(url: str, interval: int, grace: int) -> optuna.storages.BaseStorage:
    """The storage at `url`, with heartbeats every `interval` s and a trial stale after `grace` s. A
    server that cannot be reached, refused credentials or a missing driver: one line, password masked."""
    kind = scheme(url)
    if kind == "journal":
        path = Path(url[len("journal:") :])
        if not path.parent.is_dir():
            raise LrftError(f"storage {url}: no directory {path.parent} for the journal file; create it first")
        return JournalHeartbeatStorage(path, interval, grace)
    import sqlalchemy.exc

    for attempt in (1, 2):  # two workers starting at once race to create the tables: the loser retries
        try:
            return RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": 600}} if kind == "sqlite" else {"pool_pre_ping": True},
                heartbeat_interval=interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=retry_stale(),
            )
        except ImportError as e:  # optuna's own, raised from SQLAlchemy's ModuleNotFoundError
            missing = getattr(e.__cause__, "name", None) or kind
            raise LrftError(
                f"storage {masked(url)}: the {kind} driver is not installed ({missing}); "
                f"install {DRIVERS.get(kind, missing)}"
            ) from None
        except sqlalchemy.exc.SQLAlchemyError as e:
            if attempt == 1:
                time.sleep(1.0)
                continue
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise LrftError(
                f"storage {masked(url)}: cannot open it ({masked(reason)}); check the host, port, user and password"
            ) from None
    raise AssertionError("unreachable")
