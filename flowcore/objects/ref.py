"""``ObjectRef``: a future for one object in the cluster."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator, Generic, TypeVar

# this process's client (flowcore.context) counts the references
from ..context import current_client, set_client  # noqa: F401 - named here too
from . import serialization

if TYPE_CHECKING:
    import asyncio  # loaded by as_future/__await__: not before init() launches
    import concurrent.futures
    from ..client.core import CoreClient

T = TypeVar("T")


class ObjectRef(Generic[T]):
    """A reference to an object that exists, or will, somewhere in the cluster.

    Hashable and comparable by id; ``await ref`` and ``ref.future()`` wait for
    the value.  Passing a ref to ``.remote()`` at the top level passes its
    value; refs nested in containers stay refs.
    """

    __slots__ = ("_id", "_client", "__weakref__")

    def __init__(self, oid: bytes, client: CoreClient | None = None, *,
                 counted: bool = False):
        self._id = oid
        self._client = client if client is not None else current_client()
        if self._client is not None:
            self._client.add_local_ref(oid, counted)

    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    @property
    def task_id(self) -> str:
        return self._id[:16].hex()

    def __repr__(self) -> str:
        return f"ObjectRef({self._id.hex()})"

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __lt__(self, other: "ObjectRef") -> bool:
        return self._id < other._id

    def __del__(self) -> None:
        c = self._client
        if c is not None:
            try:
                c.remove_local_ref(self._id)
            except Exception:
                pass

    def __reduce__(self) -> Any:
        serialization.note_contained_ref(self._id)
        return (_rebuild_ref, (self._id,))

    def __copy__(self) -> "ObjectRef[T]":
        return ObjectRef(self._id, self._client)

    def __deepcopy__(self, memo: dict) -> "ObjectRef[T]":
        return ObjectRef(self._id, self._client)

    def future(self) -> "concurrent.futures.Future[T]":
        """A ``concurrent.futures.Future`` resolved with the value (or error)."""
        client = self._client or current_client()
        if client is None:
            raise RuntimeError("flowcore is not initialized: call flowcore.init() first")
        return client.objects.future_for(self)

    def as_future(self) -> "asyncio.Future[T]":
        """An ``asyncio.Future`` (of the running event loop) resolved with the
        value or error, for ``asyncio.wait``/``gather`` and callbacks."""
        import asyncio
        return asyncio.wrap_future(self.future())

    def __await__(self) -> Generator[Any, None, T]:
        import asyncio
        return asyncio.wrap_future(self.future()).__await__()


def _rebuild_ref(oid: bytes) -> ObjectRef:
    return ObjectRef(oid)
