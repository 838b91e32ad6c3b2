"""Graph algorithms and drawing for the futures DAG.

``flowcore.graph.algorithms`` holds pure functions over a dependency mapping
(node -> the nodes it depends on); ``flowcore.graph.draw`` turns an exported
DAG into a Graphviz picture and imports ``graphviz`` only when called.
"""

from .algorithms import CycleError, ancestors, dependents, descendants, find_cycle, toposort
from .draw import to_digraph, write

__all__ = [
    "CycleError",
    "toposort",
    "find_cycle",
    "ancestors",
    "descendants",
    "dependents",
    "to_digraph",
    "write",
]
