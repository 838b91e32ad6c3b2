"""A node: the local worker pool (``pool``, IO-free), the Tornado node
server (``server``), the worker process (``worker``) and the CLI (``cli``)."""
