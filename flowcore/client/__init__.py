"""The client side shared by drivers and workers: the IO thread, the
connections to the head and the local node, reference counting, get/put/wait."""
