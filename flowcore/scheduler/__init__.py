"""The head scheduler: IO-free state machine (``machine``), task states
(``states``), the Tornado server (``server``) and its CLI (``cli``)."""
