"""The wire: frames, mutual token authentication and Tornado connections."""
