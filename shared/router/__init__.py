"""Choosing a worker for a request: load tracking, selection policies, busy detection."""

from shared.router.load import ActiveRequest, LoadTracker, WorkerLoad
from shared.router.selector import BusyError, RouterMode, Selector, WorkerCandidate

__all__ = [
    "ActiveRequest",
    "BusyError",
    "LoadTracker",
    "RouterMode",
    "Selector",
    "WorkerCandidate",
    "WorkerLoad",
]
