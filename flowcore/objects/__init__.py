"""Per-node shared-memory object store and the object layout.

Submodules: ``serialization`` (object layout, pickle protocol 5 with
out-of-band buffers), ``arena`` (IO-free range allocator), ``store`` (the
node's store: arena file, spilling, disk fallback) and ``mapping`` (client
side mmaps).  Nothing heavy is imported here.
"""
