"""``flowcore.util.multiprocessing``: the standard library's
``multiprocessing.Pool`` API on flowcore actors, so a program using a
process pool runs across the cluster by changing its import."""
from multiprocessing import TimeoutError

from .pool import AsyncResult, IMapIterator, Pool

__all__ = ["Pool", "AsyncResult", "IMapIterator", "TimeoutError"]
