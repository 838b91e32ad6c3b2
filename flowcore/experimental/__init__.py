"""Experimental public APIs, spelled as Ray spells them
(``flowcore.experimental.internal_kv``)."""
